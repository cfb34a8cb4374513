"""RLG and NRG at the level of one denoiser call: the mechanism the pipelines and the adapter sampler share.

RLG commutes with CFG (both are affine combinations whose weights sum to 1), and the NRG term is the same for
the conditional and the unconditional call (CFG(u + a, c + a) = CFG(u, c) + a). So instead of rewriting each
pipeline's denoising loop, every call of the denoiser is replaced, for the duration of one generation, by

    out(x, t, cond) = sum_p a_p(t) denoiser_p(x, t, cond)        p in {base, expert_1, ...}, zero a_p skipped
                      + NRG term(x, t)                           (flow families only)

and the stock loop around it (CFG, true CFG, skip-layer guidance, the scheduler, callbacks, offloading...) stays as
it is. `denoiser_p` is the same network with its LoRA state set per pass, evaluated either as one forward over
the inputs repeated once per pass with peft's mixed-adapter batch (`adapter_names`), or as sequential forwards.

The family conventions at the denoiser's boundary (timestep units, FLUX's packed tokens) live in `DenoiserSpec`.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import flow
from .core import (
    BASE,
    GuidanceError,
    NRGSettings,
    check_weight,
    check_window,
    combine,
    expert_weights_at,
    nonzero,
    nrg_correction,
    pass_weights,
)
from .lora import (
    MixedBatchHooks,
    MixedBatchMismatch,
    active_adapters,
    adapter_state,
    check_adapters_loaded,
    check_not_merged,
    lora_layers,
    mixed_batch_problem,
    row_sliceable,
)

CURRENT = "__current__"  # the fine-tuned model as the user configured the pipeline (active adapters as they are)

# rlg_mixed_batch="auto" on CUDA. Measured on an SD3.5-medium-sized MMDiT, bf16, CFG 4.5 (benchmarks/rlg_step.py,
# H200, 2026-11-26), per denoising step vs the stock CFG step (88 / 90 ms at 512 / 1024 px):
#   row-sliced mixed batch (MixedBatchHooks): 0.69x at 512 px, 1.81x at 1024 px
#   peft's `adapter_names` mixed batch:       0.93x,            2.12x
#   two sequential passes:                    1.17x,            1.90x
# So a mixed batch whose LoRA layers are all row-sliced is used at every size; where some layer needs peft's
# path (DoRA, other layer types), only up to this many latent elements per sample (512 px: 16x64x64 = 65536).
# On the CPU the mixed batch is never slower: always used there.
MIXED_BATCH_AUTO_MAX_ELEMENTS = 131072


# ------------------------------------------------------------------------------------------- family specs
@dataclass
class DenoiserSpec:
    """How one family's denoiser call maps to flow quantities."""

    family: str
    sample_key: str  # the noisy-input argument of forward
    flow_t: Callable[[torch.Tensor], float]  # the forward's timestep argument -> flow time t
    unbatched: frozenset = frozenset()  # tensor arguments without a batch axis
    to_flow: Callable[[torch.Tensor, dict], torch.Tensor] | None = None  # sample rows -> (N, *latent) flow latents
    from_flow: Callable[[torch.Tensor, dict], torch.Tensor] | None = None  # inverse, for the NRG term
    timestep_key: str = "timestep"


def denoiser_spec(adapter) -> DenoiserSpec:
    """The spec for a genalign model adapter (SD3, FLUX, Wan, UNet)."""
    from ..models import FluxAdapter, SD3Adapter, UNetAdapter, WanAdapter

    num_train = float(adapter.pipe.scheduler.config.get("num_train_timesteps", 1000))
    def ident(x, _kw):
        return x

    if isinstance(adapter, FluxAdapter):
        def to_flow(x, kw):
            h, w = _flux_latent_hw(kw["img_ids"])
            return FluxAdapter.unpack(x, h, w)

        return DenoiserSpec("flux", "hidden_states", lambda ts: float(ts.reshape(-1)[0]),
                            frozenset({"img_ids", "txt_ids"}), to_flow, lambda v, kw: FluxAdapter.pack(v))
    if isinstance(adapter, (SD3Adapter, WanAdapter)):
        # Wan 2.2 TI2V feeds one timestep per token (N, seq); masked tokens get 0, so take the largest.
        return DenoiserSpec(adapter.family, "hidden_states",
                            lambda ts: float(torch.as_tensor(ts).reshape(ts.shape[0] if ts.ndim else 1, -1)[0].max())
                            / num_train, frozenset(), ident, ident)
    if isinstance(adapter, UNetAdapter):
        log_snr = torch.log(adapter.alphas_cumprod / (1 - adapter.alphas_cumprod))

        def unet_t(ts):
            s = float(torch.as_tensor(ts, dtype=torch.float64).reshape(-1)[0].cpu())
            s = min(max(s, 0.0), len(log_snr) - 1.0)
            i = min(int(s), len(log_snr) - 2)
            ls = log_snr[i] + (s - i) * (log_snr[i + 1] - log_snr[i])  # log-SNR interpolation, as the adapter
            return float(flow.flow_t_from_alpha_bar(torch.sigmoid(ls)))

        return DenoiserSpec("unet", "sample", unet_t, frozenset())
    raise GuidanceError(f"no guidance spec for {type(adapter).__name__}")


def _flux_latent_hw(img_ids: torch.Tensor) -> tuple[int, int]:
    ids = img_ids.reshape(-1, img_ids.shape[-1])
    return 2 * (int(ids[:, 1].max()) + 1), 2 * (int(ids[:, 2].max()) + 1)


# ------------------------------------------------------------------------------------------- plans
@dataclass
class RLGPlan:
    """Validated RLG settings over one denoiser (possibly split over several modules, Wan 2.2).

    weights: expert -> w. An expert is a LoRA adapter name, or CURRENT (the denoiser as the user configured it:
    the active adapters at their set weights, or full fine-tuned weights with `reference` as the base).
    reference: an optional separate base denoiser (same class and inputs) for fully fine-tuned models.
    """

    weights: dict[str, float]
    window: tuple[float, float] | None = None
    mixed: bool = False  # evaluate the passes in one peft mixed-adapter batch
    auto: bool = True  # mixed batch chosen per call by size on CUDA (MIXED_BATCH_AUTO_MAX_ELEMENTS)
    reference: torch.nn.Module | None = None
    current_name: str | None = None  # the single active adapter standing for CURRENT in a mixed batch
    mixed_reason: str | None = None  # why not mixed (for logs and the benchmark)
    row_sliced: bool = False  # every LoRA layer takes the row-sliced mixed batch (no peft adapter_names path)

    @classmethod
    def build(cls, modules: Sequence[torch.nn.Module], *, scale=None, experts: Mapping[str, float] | None = None,
              window=None, mixed_batch: bool | str = "auto", reference: torch.nn.Module | None = None) -> RLGPlan:
        """Validate against the denoiser modules; raises GuidanceError (before any denoising)."""
        modules = [m for m in modules if m is not None]
        if scale is not None and experts:
            raise GuidanceError("give either rlg_scale (one fine-tuned model: the active LoRA, or the pipeline's "
                                "weights with rlg_reference) or rlg_experts (adapter name -> weight), not both")
        if scale is None and not experts:
            raise GuidanceError("RLG needs rlg_scale or rlg_experts")
        if mixed_batch not in ("auto", True, False):
            raise GuidanceError(f"rlg_mixed_batch must be 'auto', True or False, got {mixed_batch!r}")
        if reference is not None:
            if experts:
                raise GuidanceError("rlg_reference is the base of a fully fine-tuned denoiser: use it with "
                                    "rlg_scale, not with rlg_experts (LoRA experts share the base weights)")
            if len(modules) != 1:
                raise GuidanceError("rlg_reference needs a pipeline with one denoiser")
            if type(reference) is not type(modules[0]):
                raise GuidanceError(f"rlg_reference is a {type(reference).__name__}, the pipeline's denoiser a "
                                    f"{type(modules[0]).__name__}")
        window = check_window("rlg_window", window)
        check_not_merged(modules)
        current_name = None
        if experts:
            if not isinstance(experts, Mapping):
                raise GuidanceError("rlg_experts must be a dict adapter name -> weight")
            weights = {str(k): check_weight(f"rlg_experts[{k!r}]", w) for k, w in experts.items()}
            check_adapters_loaded(modules, weights)
        else:
            weights = {CURRENT: check_weight("rlg_scale", scale)}
            active = active_adapters(modules)
            if reference is None and not active:
                raise GuidanceError("rlg_scale needs a fine-tuned model: load and activate a LoRA "
                                    "(pipe.load_lora_weights), name adapters in rlg_experts, or pass the base "
                                    "denoiser as rlg_reference for a fully fine-tuned one")
            if reference is None and len(active) == 1:
                current_name = active[0]
        reason = None
        if reference is not None:
            reason = "the base is a separate model (rlg_reference)"
        elif CURRENT in weights and current_name is None:
            reason = "several adapters are active together (one pass per adapter name in a mixed batch)"
        else:
            reason = mixed_batch_problem(modules, [current_name] if CURRENT in weights else list(weights))
        if mixed_batch is True and reason is not None:
            raise GuidanceError(f"rlg_mixed_batch=True is not possible: {reason}")
        mixed = mixed_batch is not False and reason is None
        row_sliced = all(row_sliceable(layer) for layer in lora_layers(modules))
        return cls(weights, window, mixed, mixed_batch == "auto", reference, current_name,
                   reason if mixed_batch is not False else "off", row_sliced)

    def use_mixed(self, sample: torch.Tensor) -> bool:
        """Whether this call runs as one mixed-adapter batch (see MIXED_BATCH_AUTO_MAX_ELEMENTS)."""
        if not self.mixed:
            return False
        if self.auto and sample.is_cuda and not self.row_sliced:
            return sample[0].numel() <= MIXED_BATCH_AUTO_MAX_ELEMENTS
        return True

    def weights_at(self, t: float) -> dict[str, float]:
        """Nonzero pass weights at flow time t: {BASE or expert: a_p}."""
        return nonzero(pass_weights(expert_weights_at(t, self.weights, self.window)))


@dataclass
class NRGPlan:
    reward: Any  # a latent reward model: reward(x_t, t, cond) -> {dim: (B,)}
    settings: NRGSettings
    cond: Any  # the reward's conditioning for the generated batch (Cond dict, prompts, or None)
    batch: int  # rows of the generated batch (prompts * images per prompt)


# ------------------------------------------------------------------------------------------- the wrapper
@dataclass
class GuidedDenoiser:
    """Replaces the forward of the denoiser modules while installed (see the module docstring)."""

    modules: list[torch.nn.Module]
    spec: DenoiserSpec
    rlg: RLGPlan | None = None
    nrg: NRGPlan | None = None
    stats: dict = field(default_factory=lambda: {"calls": 0, "forwards": 0, "rows": 0, "nrg_evals": 0,
                                                 "mixed_forwards": 0})
    _nrg_cache: tuple | None = None
    _layers: list | None = None
    _hooks: MixedBatchHooks | None = None

    def __post_init__(self):
        self._layers = lora_layers(self.modules)

    @contextlib.contextmanager
    def installed(self):
        """Patch `forward` of every module (on top of accelerate's offload hooks, if any) and restore it."""
        saved = []
        try:
            if self.rlg is not None and self.rlg.mixed:
                self._hooks = MixedBatchHooks(self._layers).__enter__()
            for m in self.modules:
                had = "forward" in m.__dict__
                orig = m.forward
                sig = inspect.signature(type(m).forward)
                saved.append((m, had, m.__dict__.get("forward")))
                m.forward = self._make_forward(m, orig, sig)
            yield self
        finally:
            for m, had, prev in saved:
                if had:
                    m.forward = prev
                else:
                    del m.forward
            if self._hooks is not None:
                self._hooks.__exit__(None, None, None)
                self._hooks = None
            self._nrg_cache = None

    # ------------------------------------------------------------------------- one call
    def _make_forward(self, module, orig, sig):
        def forward(*args, **kwargs):
            bound = sig.bind(module, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(sig.parameters)))  # self
            var_kw = [p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
            for name in var_kw:
                arguments.update(arguments.pop(name, {}))
            t = self.spec.flow_t(arguments[self.spec.timestep_key])
            self.stats["calls"] += 1
            if self.rlg is None:
                out = self._forward(orig, arguments)
            else:
                out = self._rlg_forward(module, orig, arguments, t)
            if self.nrg is not None:
                out = self._add_nrg(out, arguments, t)
            return out

        return forward

    def _forward(self, fn, arguments: dict, count_rows: int | None = None):
        self.stats["forwards"] += 1
        self.stats["rows"] += count_rows or _batch(arguments[self.spec.sample_key])
        return fn(**arguments)

    def _rlg_forward(self, module, orig, arguments: dict, t: float):
        a = self.rlg.weights_at(t)
        if len(a) == 1 and next(iter(a.values())) == 1.0:
            (name,) = a
            if name != BASE or self.rlg.reference is None:
                with adapter_state(self.modules, None if name == CURRENT else name, self._layers):
                    return self._forward(orig, arguments)
        if self._hooks is not None and self.rlg.use_mixed(arguments[self.spec.sample_key]):
            try:
                outs = self._mixed(orig, arguments, list(a))
            except ValueError as e:  # a LoRA layer that sees another batch size than the denoiser's input
                # (MixedBatchMismatch from the row slices; peft's own error names `adapter_names`)
                if not isinstance(e, MixedBatchMismatch) and "adapter_names" not in str(e):
                    raise
                warnings.warn(f"mixed-adapter batch failed ({e}); evaluating RLG passes sequentially", stacklevel=2)
                self.rlg.mixed, self.rlg.mixed_reason = False, f"runtime: {e}"
                outs = None
            if outs is not None:
                res, chunks = outs
                return _rebuild(res, combine(dict(zip(a, chunks)), a))
        results = {}
        first = None
        for name in a:
            if name == BASE and self.rlg.reference is not None:
                self.stats["forwards"] += 1
                self.stats["rows"] += _batch(arguments[self.spec.sample_key])
                res = self.rlg.reference(**arguments)
            else:
                with adapter_state(self.modules, None if name == CURRENT else name, self._layers):
                    res = self._forward(orig, arguments)
            first = first if first is not None else res
            results[name] = _first(res)
        return _rebuild(first, combine(results, a))

    def _mixed(self, orig, arguments: dict, names: list[str]):
        n = _batch(arguments[self.spec.sample_key])
        p = len(names)
        rep = {k: (v if k in self.spec.unbatched else _repeat(v, n, p)) for k, v in arguments.items()}
        row_names = []
        for name in names:
            row_names += [self.rlg.current_name if name == CURRENT else name] * n
        with self._hooks.rows(row_names):
            res = self._forward(orig, rep, count_rows=n * p)
        self.stats["mixed_forwards"] += 1
        return res, _first(res).split(n)

    # ------------------------------------------------------------------------- NRG
    def _add_nrg(self, out, arguments: dict, t: float):
        plan = self.nrg
        x_in = arguments[self.spec.sample_key]
        n, b = _batch(x_in), plan.batch
        if n % b:
            raise GuidanceError(f"the denoiser got {n} rows, not a multiple of the batch of {b}")
        rows = x_in[-b:]
        cache = self._nrg_cache
        if cache is not None and cache[0] == t and cache[1].shape == rows.shape and torch.equal(cache[1], rows):
            corr = cache[2]
        else:
            x_flow = self.spec.to_flow(rows, arguments)
            c = nrg_correction(plan.reward, x_flow, torch.full((b,), t, device=x_flow.device), plan.cond,
                               plan.settings)
            corr = None if c is None else self.spec.from_flow(c, arguments)
            self.stats["nrg_evals"] += c is not None
            self._nrg_cache = (t, rows.detach().clone(), corr)
        if corr is None:
            return out
        o = _first(out)
        return _rebuild(out, o + corr.to(o).repeat(n // b, *([1] * (o.ndim - 1))))


# ------------------------------------------------------------------------------------------- helpers
def _batch(x) -> int:
    return int(x.shape[0])


def _repeat(v, n: int, p: int):
    """Repeat every tensor whose first axis is the batch p times along it (recursing into dicts and lists)."""
    if isinstance(v, torch.Tensor):
        return v.repeat(p, *([1] * (v.ndim - 1))) if v.ndim >= 1 and v.shape[0] == n else v
    if isinstance(v, Mapping):
        return {k: _repeat(x, n, p) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_repeat(x, n, p) for x in v)
    return v


def _first(res) -> torch.Tensor:
    if isinstance(res, torch.Tensor):
        return res
    if isinstance(res, (tuple, list)):
        return res[0]
    return res.sample


def _rebuild(like, tensor: torch.Tensor):
    """An output of the same structure as `like` (tuple, tensor or a diffusers output) holding `tensor`."""
    if isinstance(like, torch.Tensor):
        return tensor
    if isinstance(like, tuple):
        return (tensor, *like[1:])
    if isinstance(like, list):
        return [tensor, *like[1:]]
    return type(like)(sample=tensor)
