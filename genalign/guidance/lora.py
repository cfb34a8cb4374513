"""LoRA (peft) state for guidance: which adapters a denoiser holds, and the two ways of evaluating several of
them on one input.

- Sequential: one forward per model, the adapter state of every LoRA layer set for that pass (base: adapters
  disabled; expert k: only adapter k active) and restored afterwards. Works for any peft layer.
- Mixed-adapter batch: ONE forward over the inputs repeated once per pass (one adapter name per row, "__base__"
  for no adapter): plain LoRA Linear / Conv layers compute the base output for all rows and add each adapter's
  delta to its own rows; other LoRA layers get peft's `adapter_names`, injected by a forward pre-hook as peft's own
  `PeftModel.forward(adapter_names=...)` does (diffusers models hold peft layers without a PeftModel around them).
  Needs plain LoRA (no DoRA), unmerged weights and eval mode (tested against the sequential result).

Layer state is set directly on each layer (`_active_adapter`, `_disable_adapters`) rather than through
`set_adapter`/`set_adapters`: those also change `requires_grad` and diffusers' per-adapter weights, which
guidance must leave as the user set them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch

from .core import BASE, GuidanceError


def lora_layers(modules: Iterable[torch.nn.Module]) -> list:
    """Every peft tuner layer (LoRA Linear/Conv/Embedding ...) inside the modules."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    out = []
    for m in modules:
        if m is None:
            continue
        out.extend(layer for layer in m.modules() if isinstance(layer, BaseTunerLayer))
    return out


def loaded_adapters(modules: Iterable[torch.nn.Module]) -> set[str]:
    names: set[str] = set()
    for layer in lora_layers(modules):
        for attr in ("lora_A", "lora_embedding_A"):
            names |= set(getattr(layer, attr, {}).keys())
    return names


def active_adapters(modules: Iterable[torch.nn.Module]) -> list[str]:
    """The adapters that a plain forward applies now ([] when none is loaded or adapters are disabled)."""
    layers = lora_layers(modules)
    if not layers or all(layer.disable_adapters for layer in layers):
        return []
    seen: list[str] = []
    for layer in layers:
        if layer.disable_adapters:
            continue
        for name in layer.active_adapters:
            if name not in seen:
                seen.append(name)
    return seen


def check_adapters_loaded(modules: Sequence[torch.nn.Module], names: Iterable[str]) -> None:
    loaded = loaded_adapters(modules)
    missing = [n for n in names if n not in loaded]
    if missing:
        hint = f"loaded: {sorted(loaded)}" if loaded else "no LoRA adapter is loaded (pipe.load_lora_weights(...))"
        raise GuidanceError(f"RLG expert adapter(s) {missing} are not loaded in the denoiser; {hint}")


def check_not_merged(modules: Sequence[torch.nn.Module]) -> None:
    if any(getattr(layer, "merged", False) for layer in lora_layers(modules)):
        raise GuidanceError("RLG needs the base and the LoRA outputs separately, but a LoRA is fused into the "
                            "weights: call pipe.unfuse_lora() first")


def mixed_batch_problem(modules: Sequence[torch.nn.Module], names: Iterable[str]) -> str | None:
    """Why peft's mixed-adapter batch cannot evaluate these passes (None when it can)."""
    names = [n for n in names if n != BASE]
    layers = lora_layers(modules)
    if not layers:
        return "the denoiser holds no LoRA layer"
    if any(m.training for m in modules if m is not None):
        return "the denoiser is in training mode (peft refuses adapter_names then)"
    for layer in layers:
        if getattr(layer, "merged", False):
            return "a LoRA is merged into the weights"
        if not hasattr(layer, "_mixed_batch_forward"):
            return f"{type(layer).__name__} layers do not support mixed-adapter batches"
        if type(layer).__name__ == "MultiheadAttention":
            return "LoRA on nn.MultiheadAttention does not support mixed-adapter batches"
        use_dora = getattr(layer, "use_dora", {})
        if any(use_dora.get(n, False) for n in names):
            return "DoRA adapters do not support mixed-adapter batches"
        variants = getattr(layer, "lora_variant", {})
        if any(n in variants for n in names):
            return "LoRA variants (DoRA, aLoRA, ...) are evaluated sequentially"
    return None


@contextlib.contextmanager
def adapter_state(modules: Sequence[torch.nn.Module], name: str | None, layers: list | None = None):
    """Every LoRA layer set for one pass: BASE = adapters disabled; an adapter name = only that adapter;
    None = leave the state as the user set it. Restored on exit. `layers`: lora_layers(modules), if known."""
    if layers is None:
        layers = lora_layers(modules)
    if name is None or not layers:
        yield
        return
    saved = [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]
    try:
        for layer in layers:
            if name == BASE:
                layer._disable_adapters = True
            else:
                layer._disable_adapters = False
                layer._active_adapter = [name]
        yield
    finally:
        for layer, active, disabled in saved:
            layer._active_adapter = active
            layer._disable_adapters = disabled


def row_sliceable(layer) -> bool:
    """Whether a LoRA layer's mixed batch can be computed as base output + per-slice LoRA delta: plain (no
    DoRA / variant) LoRA on a Linear or Conv layer, where the delta is lora_B(lora_A(dropout(x))) * scaling."""
    try:
        from peft.tuners.lora.layer import Linear, _ConvNd
    except ImportError:  # pragma: no cover - an older peft: use adapter_names everywhere
        return False
    if type(layer) is not Linear and not isinstance(layer, _ConvNd):  # not bnb / other Linear subclasses
        return False
    return not any(getattr(layer, "use_dora", {}).values()) and not getattr(layer, "lora_variant", {})


def row_runs(adapter_names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Consecutive rows with the same adapter as (name, start, stop), BASE runs left out."""
    runs: list[tuple[str, int, int]] = []
    start = 0
    for i in range(1, len(adapter_names) + 1):
        if i == len(adapter_names) or adapter_names[i] != adapter_names[start]:
            if adapter_names[start] != BASE:
                runs.append((adapter_names[start], start, i))
            start = i
    return runs


class MixedBatchMismatch(ValueError):
    """A LoRA layer saw another number of rows than the mixed batch has (the caller falls back to sequential)."""


class MixedBatchHooks:
    """Hooks on every LoRA layer that evaluate one forward over rows with different adapters while `rows(...)` is
    active (otherwise the layers run as usual). Registered once for a whole generation.

    Plain LoRA Linear / Conv layers (`row_sliceable`) compute the base layer once for all rows and add each
    adapter's delta to its own slice of rows only. The RLG passes are contiguous row blocks, so this is the cost of
    a plain LoRA forward, where peft's `adapter_names` path gathers and scatters the rows of every layer per
    adapter (on an H100 at 512 px it made the mixed batch 1.39x a CFG step; benchmarks/rlg_step.py). Other layers
    (embeddings, ...) get peft's `adapter_names` injected by a forward pre-hook, as `PeftModel.forward(
    adapter_names=...)` does. `row_slices=False` uses `adapter_names` everywhere (the benchmark's comparison).
    """

    def __init__(self, layers: list, row_slices: bool = True):
        self.layers = layers
        self.sliced = [layer for layer in layers if row_slices and row_sliceable(layer)]
        sliced_ids = {id(layer) for layer in self.sliced}
        self.named = [layer for layer in layers if id(layer) not in sliced_ids]
        self.names: list[str] | None = None
        self.runs: list[tuple[str, int, int]] = []
        self._handles: list = []

    def _pre_hook(self, module, args, kwargs):
        if self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs

    def _slice_hook(self, module, args, output):
        if self.names is None:
            return output
        x = args[0]
        if x.shape[0] != len(self.names) or output.shape[0] != len(self.names):
            raise MixedBatchMismatch(f"a LoRA layer got {x.shape[0]} rows, the mixed batch has {len(self.names)}")
        # Out of place when autograd records (the base output may be a view it needs); in place otherwise.
        out = output.clone() if torch.is_grad_enabled() else output
        for name, start, stop in self.runs:
            if name not in module.lora_A:
                continue  # this layer has no weights for that adapter: base output, as peft does
            lora_A, lora_B = module.lora_A[name], module.lora_B[name]
            xs = x[start:stop].to(lora_A.weight.dtype)
            delta = lora_B(lora_A(module.lora_dropout[name](xs))) * module.scaling[name]
            out[start:stop] += delta.to(out.dtype)
        return out

    def __enter__(self):
        self._handles = [layer.register_forward_pre_hook(self._pre_hook, with_kwargs=True) for layer in self.named]
        self._handles += [layer.register_forward_hook(self._slice_hook) for layer in self.sliced]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self.names = [], None

    @contextlib.contextmanager
    def rows(self, adapter_names: list[str]):
        """Row i of every LoRA layer's input uses adapter adapter_names[i] ("__base__": none). The sliced layers
        run their base layer only (adapters disabled) and the hook adds the deltas; the others have adapters
        enabled for the duration (a disabled peft layer ignores adapter_names)."""
        saved = [(layer, layer._disable_adapters) for layer in self.layers]
        try:
            for layer in self.sliced:
                layer._disable_adapters = True
            for layer in self.named:
                layer._disable_adapters = False
            self.names, self.runs = list(adapter_names), row_runs(adapter_names)
            yield
        finally:
            self.names, self.runs = None, []
            for layer, disabled in saved:
                layer._disable_adapters = disabled


@contextlib.contextmanager
def mixed_adapter_batch(modules: Sequence[torch.nn.Module], adapter_names: list[str], row_slices: bool = True):
    """One-off form of MixedBatchHooks: every LoRA layer computes row i with adapter adapter_names[i]."""
    with MixedBatchHooks(lora_layers(modules), row_slices) as hooks, hooks.rows(adapter_names):
        yield
