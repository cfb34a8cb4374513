"""Model adapters: one interface, `velocity(x_t, t, cond)` + `encode_prompt`, over SD3, FLUX, Wan and UNet pipelines.

Importing this package imports torch only; diffusers, transformers and peft are imported when a model is built.
"""

from __future__ import annotations

import os

from .base import FlowAdapter, LoraSpec, ModelLoadError, read_model_index
from .flux import FluxAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter

ADAPTERS: tuple[type[FlowAdapter], ...] = (SD3Adapter, FluxAdapter, WanAdapter, UNetAdapter)


def adapter_class_for(pipeline_class_name: str) -> type[FlowAdapter] | None:
    """The adapter class for a diffusers pipeline class name (model_index.json's `_class_name`), or None."""
    for cls in ADAPTERS:
        if pipeline_class_name in cls.pipeline_class_names:
            return cls
    return None


def default_device() -> str:
    """Where the commands put a model unless told: the first GPU when torch sees one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_adapter(path_or_id: str | os.PathLike, **kwargs) -> FlowAdapter:
    """Load a diffusers pipeline folder (or cached hub id) and wrap it in the adapter of its family.

    The family is read from model_index.json's `_class_name`. Keyword arguments go to the adapter's
    `from_pretrained` (torch_dtype, device, max_sequence_length, ...).
    """
    index = read_model_index(path_or_id)
    if index is None:
        if os.path.exists(path_or_id):
            raise ModelLoadError(f"{str(path_or_id)!r} has no model_index.json: not a diffusers pipeline folder")
        from diffusers import DiffusionPipeline

        try:  # a hub id: its model_index.json from the local cache (or the hub when online)
            index = DiffusionPipeline.load_config(str(path_or_id))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not read model_index.json of {str(path_or_id)!r}: {e}") from e
    name = index.get("_class_name", "?")
    cls = adapter_class_for(name)
    if cls is None:
        supported = ", ".join(n for c in ADAPTERS for n in c.pipeline_class_names)
        raise ModelLoadError(f"{str(path_or_id)!r} holds a {name}, which genalign does not support (supported: {supported})")
    return cls.from_pretrained(path_or_id, **kwargs)


__all__ = [
    "ADAPTERS",
    "FlowAdapter",
    "FluxAdapter",
    "LoraSpec",
    "ModelLoadError",
    "SD3Adapter",
    "UNetAdapter",
    "WanAdapter",
    "adapter_class_for",
    "default_device",
    "load_adapter",
]
