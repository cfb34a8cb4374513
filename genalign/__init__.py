"""genalign: align diffusion and flow-matching generators (images and video) with human feedback.

`import genalign` stays light (no diffusers, gradio or open_clip import); the parts live in subpackages:
genalign.flow, genalign.models, genalign.data, genalign.world, genalign.eval, genalign.rewards,
genalign.pipelines, genalign.app.
"""

__version__ = "0.1.0"

