"""diffusers pipelines with genalign's guidance: RLG (all families) and Flow-NRG (flow families).

    from genalign.pipelines import RLGStableDiffusion3Pipeline, RLGFluxPipeline, RLGWanPipeline
    from genalign.pipelines import RLGStableDiffusionPipeline, RLGStableDiffusionXLPipeline

Subclasses of the concrete diffusers pipelines: from_pretrained, from_pipe, load_lora_weights, offloading,
output_type, return_dict and callbacks work as in the stock class; with no guidance argument the call IS the stock
call. Guidance arguments: see `genalign.pipelines.guided`. Importing this package imports diffusers lazily.

Note: diffusers' `from_pipe` casts the SHARED components to float32 unless given a dtype; for a bf16 pipeline use
`RLGStableDiffusion3Pipeline.from_pipe(pipe, torch_dtype=torch.bfloat16)` (or `guided_pipeline_class(pipe)`).
"""

from __future__ import annotations

_CLASSES = {
    "RLGStableDiffusion3Pipeline": "flow_pipelines",
    "RLGFluxPipeline": "flow_pipelines",
    "RLGWanPipeline": "flow_pipelines",
    "RLGStableDiffusionPipeline": "unet_pipelines",
    "RLGStableDiffusionXLPipeline": "unet_pipelines",
    "GuidedPipelineMixin": "guided",
}

__all__ = [
    "GuidedPipelineMixin",
    "RLGFluxPipeline",
    "RLGStableDiffusion3Pipeline",
    "RLGStableDiffusionPipeline",
    "RLGStableDiffusionXLPipeline",
    "RLGWanPipeline",
    "guided_pipeline_class",
]


def __getattr__(name):
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(f".{_CLASSES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def guided_pipeline_class(pipeline_or_class) -> type:
    """The genalign guided class for a stock diffusers pipeline (instance or class), e.g. for
    `guided_pipeline_class(pipe).from_pipe(pipe)`."""
    cls = pipeline_or_class if isinstance(pipeline_or_class, type) else type(pipeline_or_class)
    for klass in cls.__mro__:
        for name in _CLASSES:
            guided = __getattr__(name)
            if getattr(guided, "_stock_class", None) is klass:
                return guided
    raise ValueError(f"no genalign guided pipeline for {cls.__name__} (supported: StableDiffusion3Pipeline, "
                     "FluxPipeline, WanPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)")
