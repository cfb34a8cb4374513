"""genalign: align diffusion and flow-matching generators (images and video) with human feedback.

`import genalign` stays light (no diffusers, gradio or open_clip import); the parts live in subpackages:
genalign.flow, genalign.models, genalign.data, genalign.world, genalign.eval, genalign.rewards,
genalign.pipelines, genalign.app.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # diffusers records custom component classes by their top-level module when a pipeline is saved, so the
    # world's video autoencoder must be reachable as `genalign.FramewiseAutoencoderKL` (imported on demand).
    if name == "FramewiseAutoencoderKL":
        from .world.video_vae import FramewiseAutoencoderKL

        return FramewiseAutoencoderKL
    raise AttributeError(f"module 'genalign' has no attribute {name!r}")
