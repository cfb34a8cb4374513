"""The one training loop every genalign trainer runs on (Flow-DPO, Flow-RWR, reward models, Diff-Instruct*, ...).

A trainer is a subclass of `Trainer` with a config dataclass derived from `TrainConfig`; it implements
`compute_loss(batch) -> (loss, metrics)` and may override a few hooks (`prepare_model`, `save_model`,
`extra_state` / `load_extra_state`, `on_step_end`). The loop does the rest, once for all of them:

- accelerate: mixed precision ("no" | "fp16" | "bf16"; trainable parameters are always kept in float32),
  gradient accumulation, gradient clipping, an LR schedule (constant / linear / cosine after a linear warmup),
  optional EMA of the trainable parameters, gradient checkpointing, SDPA attention (xformers only when asked for
  and only when it loads), multi-process data parallelism (each process reads its own slice of every batch);
- logging: `output_dir/metrics.jsonl` (one JSON object per logged step, flushed on write) and accelerate's
  trackers (tensorboard when installed, wandb when asked for), a tqdm progress bar;
- checkpoints every `checkpoint_every` steps, written to a temporary folder and renamed into place, so that a
  folder named `checkpoint-{step}` is always complete (see `save_checkpoint` for the layout); `resume="latest"`
  continues from the newest complete one exactly: N steps + resume + N steps gives the weights of 2N steps;
- non-finite losses: the step is skipped (no update), counted and logged; `max_nonfinite_in_a_row` in a row
  stop the run with a message naming the step and the likely cause.

Why the model is not passed through `accelerator.prepare`: adapters call their denoiser directly (not a DDP
wrapper), and accelerate's checkpoint would store every weight of a multi-gigabyte base model for a LoRA of a
few megabytes. So the loop keeps the model as is, saves only the trainable parameters, and averages gradients
across processes itself (one all-reduce per optimizer step, cheap for adapters). The optimizer and LR schedule
do go through accelerate (gradient scaling for fp16, and their state in `save_state`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, save_config
from ..files import TRASH_PREFIX, publish_dir, remove_dir

logger = logging.getLogger("genalign.trainers")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks a complete one
METRICS_FILE = "metrics.jsonl"
LR_SCHEDULERS = ("constant", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION_BACKENDS = ("sdpa", "xformers")
TRACKERS = ("tensorboard", "wandb")


def option(default, help: str, **kw):
    """A config field with its help text (shown by `config_help`, and by the CLI)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Settings of the shared loop; every trainer's config extends it."""

    output_dir: str = option("runs/train", "run folder: checkpoints, metrics.jsonl, config.yaml, final weights")
    max_steps: int = option(1000, "optimizer steps to train for")
    batch_size: int = option(4, "items per process per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch_size x grad_accum x processes)")
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    lr_scheduler: str = option("constant", "LR schedule after warmup: constant | linear | cosine (decay to 0 at max_steps)")
    warmup_steps: int = option(0, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping; the norm is logged either way)")
    mixed_precision: str = option("no", "no | fp16 (GPU only) | bf16; trainable parameters stay float32")
    ema_decay: float = option(0.0, "EMA of the trainable parameters (0: off; e.g. 0.999); saved next to the weights")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, slower)")
    checkpoint_share: float = option(1.0, "with gradient_checkpointing: the share of a diffusers network's blocks "
                                          "checkpointed, evenly spread (1: all; 0.5: every other block)")
    checkpoint_unit: str = option("block", "with gradient_checkpointing: what a chosen block recomputes: block (all "
                                           "of it) | feedforward (only its feed-forward networks: their 4x-wide "
                                           "hidden activations for 5% more arithmetic; diffusers models)")
    recompute_attention_inputs: bool = option(False, "rebuild SDPA's normalised, concatenated q / k / v in the "
                                                     "backward pass instead of keeping them (elementwise work; "
                                                     "SD3 / SD3.5, FLUX, Wan; genalign.models.attention)")
    attention_backend: str = option("sdpa", "sdpa (PyTorch, default) | xformers (used only if it loads; else SDPA with a warning)")
    compile: str = option("no", "torch.compile the trained network: no | blocks (each transformer block; compiles "
                                "once per block kind) | full (the whole network: the fastest measured at 512 px)")
    compile_memory_budget: float = option(1.0, "with compile: the share of the activation memory the compiled "
                                               "backward may keep (below 1, torch.compile recomputes the ops that "
                                               "are cheapest to redo until it fits; 1: its default choice)")
    checkpoint_every: int = option(500, "write a checkpoint every N steps (and at the end); 0: only at the end")
    keep_checkpoints: int = option(3, "keep the newest N checkpoints (0: keep all)")
    log_every: int = option(10, "append to metrics.jsonl and the trackers every N steps")
    seed: int = option(0, "seed of weights initialisation, data order and noise")
    shuffle: bool = option(True, "shuffle the data (a seeded permutation per epoch)")
    num_workers: int = option(0, "DataLoader worker processes")
    num_threads: int = option(0, "torch CPU threads (0: torch's default; 1-2 on a busy shared CPU, where waiting "
                                 "threads make small models many times slower)")
    resume: str | None = option(None, "'latest' (newest complete checkpoint in output_dir, or a fresh start if none) or a checkpoint folder")
    max_nonfinite_in_a_row: int = option(5, "abort after this many consecutive steps with a non-finite loss")
    report_to: str = option("auto", "trackers: auto (tensorboard if installed) | none | tensorboard | wandb | tensorboard,wandb")
    progress_bar: bool = option(True, "show a tqdm progress bar")

    def __post_init__(self):
        def bad(key, msg):
            raise ConfigError(f"config key {key!r}: {msg}")

        for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "num_workers", "num_threads",
                    "max_grad_norm", "weight_decay"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            bad("lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            bad("mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", f"must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        if self.compile not in COMPILE_MODES:
            bad("compile", f"must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.compile_memory_budget <= 1:
            bad("compile_memory_budget", f"must be in [0, 1], got {self.compile_memory_budget}")
        if not 0 < self.checkpoint_share <= 1:
            bad("checkpoint_share", f"must be in (0, 1], got {self.checkpoint_share}")
        if self.checkpoint_unit not in CHECKPOINT_UNITS:
            bad("checkpoint_unit", f"must be one of {', '.join(CHECKPOINT_UNITS)}, got {self.checkpoint_unit!r}")
        if self.max_nonfinite_in_a_row < 1:
            bad("max_nonfinite_in_a_row", f"must be >= 1, got {self.max_nonfinite_in_a_row}")
        trackers_from_config(self.report_to, check_installed=False)


def config_help(cls) -> str:
    """One line per config key: name, type, default and help text."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{f.name} ({f.type}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def trackers_from_config(report_to: str, check_installed: bool = True) -> list[str]:
    import importlib.util

    value = (report_to or "none").strip().lower()
    if value == "none":
        return []
    if value == "auto":  # wandb is never picked silently: it may try to log in over the network
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"config key 'report_to': unknown tracker {name!r} (auto, none, {', '.join(TRACKERS)})")
        if check_installed and importlib.util.find_spec(name) is None:
            raise ConfigError(f"config key 'report_to': {name} is not installed (pip install {name}), "
                              "or use report_to=auto / none")
    return names


# ----------------------------------------------------------------------------------------------- errors
class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss (or gradient)."""


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or does not fit the model being trained."""


# ----------------------------------------------------------------------------------------------- checkpoints on disk
def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (`checkpoint-{step}` folders holding trainer_state.json), oldest first.

    Temporary folders of interrupted writes (`.tmp-*`) and folders being deleted (`.trash-*`) never match."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that a checkpoint folder is complete: every file listed in its trainer_state.json is present with
    its recorded size, and every safetensors file has a readable header. Returns the trainer state."""
    from safetensors import safe_open

    path = Path(path)
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not state_file.is_file():
        hint = "; pass a checkpoint-{step} folder, or resume=latest" if list_checkpoints(path) else ""
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint (no {STATE_FILE}){hint}")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: unreadable ({e})") from e
    for rel, size in state.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {rel} has {f.stat().st_size} bytes, "
                                  f"expected {size}")
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
            except Exception as e:  # any parse failure means a damaged file
                raise CheckpointError(f"checkpoint {str(path)!r}: {rel} is not a readable safetensors file ({e})") from e
    return state


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------------------------- helpers
def lr_lambda(kind: str, warmup_steps: int, max_steps: int):
    """Multiplier of the peak LR after `step` optimizer steps: linear warmup, then constant / linear / cosine
    decay reaching 0 at max_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def to_device(obj, device):
    """Move the tensors of a (nested) batch to `device`; everything else is returned as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict)) for v in obj):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _has_nonfinite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.is_floating_point() and not bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return any(_has_nonfinite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_nonfinite(v) for v in obj)
    return False


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Run `module` in eval mode (no dropout) inside the block, restoring its training flag after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def checkpointable_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a diffusers model hands to its checkpointing function, in forward order: the members of the
    ModuleLists of each submodule that has a `gradient_checkpointing` switch (SD3/FLUX/Wan transformer blocks, a
    UNet block's resnets and attentions)."""
    return [block for module in model.modules() if hasattr(module, "gradient_checkpointing")
            for blocks in module.children() if isinstance(blocks, torch.nn.ModuleList) for block in blocks]


def evenly_spread(n: int, share: float) -> list[int]:
    """round(n * share) of range(n) (at least one), evenly spread and ending with the last: share 0.5 of 6 is
    [1, 3, 5], share 1/3 of 6 is [2, 5]."""
    k = min(n, max(1, round(n * share)))
    return [i for i in range(n) if (i + 1) * k // n > i * k // n]


CHECKPOINT_UNITS = ("block", "feedforward")


def feedforward_modules(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The feed-forward networks in a block: diffusers' FeedForward (SD3's ff / ff_context, FLUX's double-stream
    blocks, Wan's ffn, the UNet transformer blocks' ff). FLUX's single-stream blocks fuse theirs: none there."""
    from diffusers.models.attention import FeedForward

    return [m for m in block.modules() if isinstance(m, FeedForward)]


def checkpoint_forward(module: torch.nn.Module) -> None:
    """Run `module`'s forward under activation checkpointing when gradients are on: it keeps only its inputs for
    the backward pass and runs again there. (No-grad forwards, such as the reference's, run as they are.) The
    wrapper is an attribute of this module object: a deep copy of it would still call the original's forward."""
    from torch.utils.checkpoint import checkpoint

    forward = module.forward

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed_forward


def enable_gradient_checkpointing(model: torch.nn.Module, share: float = 1.0, unit: str = "block") -> None:
    """Activation checkpointing of `share` of the model's blocks, evenly spread: those are recomputed in the
    backward pass, the others keep their activations (memory and time in between all and none).

    unit "feedforward": of each chosen block only the feed-forward networks. Their hidden activations are 4x the
    model width, the largest saved tensors of an SD3 block (a fifth of a Flow-DPO step's), while redoing their
    first matmul adds 5.5% to the step's arithmetic (benchmarks/flow_dpo_step.py, SD3.5-medium's proportions)."""
    from torch.utils.checkpoint import checkpoint

    if unit == "feedforward":
        if not hasattr(model, "enable_gradient_checkpointing"):
            raise ConfigError(f"config key 'checkpoint_unit': feedforward is for diffusers models, not "
                              f"{type(model).__name__}")
        blocks = checkpointable_blocks(model)
        chosen = [feedforward_modules(blocks[i]) for i in evenly_spread(len(blocks), share)]
        if not any(chosen):
            raise ConfigError(f"config key 'checkpoint_unit': {type(model).__name__}'s blocks have no diffusers "
                              "FeedForward modules; use checkpoint_unit=block")
        for modules in chosen:
            for module in modules:
                checkpoint_forward(module)
        return
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers ModelMixin
        blocks = checkpointable_blocks(model)
        chosen = set(evenly_spread(len(blocks), share))
        for i, block in enumerate(blocks):
            block._genalign_checkpointed = i in chosen  # read by the function below, on every call

        def checkpoint_block(block, *args):
            if getattr(block, "_genalign_checkpointed", True):
                return checkpoint(block.__call__, *args, use_reentrant=False)
            return block(*args)

        model.enable_gradient_checkpointing(checkpoint_block)
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers PreTrainedModel
        if share != 1.0:
            raise ConfigError(f"config key 'checkpoint_share': only for diffusers models, not {type(model).__name__}")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError(f"config key 'gradient_checkpointing': {type(model).__name__} does not support it")


COMPILE_MODES = ("no", "blocks", "full")


def compile_model(model: torch.nn.Module, how: str, memory_budget: float = 1.0) -> None:
    """torch.compile (default mode), in place: parameter names and checkpoints stay as they were.

    "full": the whole network. On an H200, an SD3.5-medium-sized Flow-DPO LoRA step with 2 pairs at 512 px took
    147 ms compiled whole, 193 ms compiled per block and 401 ms eager (benchmarks/flow_dpo_step.py; the eager
    step is launch-bound there); at 1024 px per block 421 ms vs 694 ms eager. "blocks": every member of the
    network's `*blocks` / `layers` lists (regional compilation: identical blocks share their code, so compile
    time is that of the distinct block kinds: 44-54 s vs 177 s whole at that size)."""
    import torch._dynamo
    import torch._functorch.config

    if how == "no":
        return
    # one static graph per shape (a dynamic-shape recompile is slower), and room for the shapes of eval batches
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False
    # Read when the joint forward/backward graph is partitioned (the first step), process-wide.
    torch._functorch.config.activation_memory_budget = memory_budget
    if how == "full":
        model.compile()
        return
    blocks = repeated_blocks(model)
    if not blocks:
        raise ConfigError(f"config key 'compile': {type(model).__name__} has no '*blocks' / 'layers' module lists "
                          "to compile one by one; use compile=full")
    for block in blocks:
        block.compile()


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The members of every module list named `*blocks` or `layers` (diffusers' transformer_blocks /
    single_transformer_blocks / blocks, transformers' encoder.layers / language_model.layers / visual.blocks),
    outermost lists only: the units regional compilation compiles one by one."""
    found: list[torch.nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, torch.nn.ModuleList) or not (leaf.endswith("blocks") or leaf == "layers"):
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue  # a list inside a block already taken (a UNet block's resnets, say)
        taken.append(name)
        found.extend(module)
    return found


def configure_attention(model: torch.nn.Module, backend: str) -> str:
    """SDPA is diffusers' default; xformers only when asked for AND its extension loads. Returns the backend used."""
    if backend != "xformers":
        return "sdpa"
    try:
        import xformers.ops  # noqa: F401

        model.enable_xformers_memory_efficient_attention()
        return "xformers"
    except Exception as e:  # noqa: BLE001 - xformers fails in many ways (no CUDA, ABI mismatch): fall back
        logger.warning("attention_backend=xformers: xformers does not load here (%s: %s); using PyTorch SDPA",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return "sdpa"


@dataclass
class TrainState:
    """What the loop itself must restore to continue exactly (besides weights, optimizer, schedule, RNG)."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    consumed_batches: int = 0  # micro-batches read, per process: the data position
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    first_nonfinite_step: int | None = None  # first step of the current run of non-finite steps


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    last_checkpoint: Path | None
    final_model_dir: Path | None
    nonfinite_total: int
    last_metrics: dict[str, Any]


# ----------------------------------------------------------------------------------------------- the loop
class Trainer:
    """Base class of every genalign trainer. Subclasses implement `compute_loss` (and may override the hooks).

    model: the torch module whose parameters with `requires_grad` are trained (its other parameters are frozen).
    train_dataset: a map-style dataset; `collate_fn` turns a list of its items into a batch.
    """

    config_class: type[TrainConfig] = TrainConfig
    model_subdir = "model"  # folder name of `save_model`'s output inside a checkpoint and the run folder

    def __init__(self, config: TrainConfig, model: torch.nn.Module, train_dataset, collate_fn=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig (or subclass), got {type(config).__name__}")
        self.config = config
        self.model = model
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn
        self.output_dir = Path(config.output_dir)
        self.trackers = trackers_from_config(config.report_to)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)

        self.accelerator = self._make_accelerator()
        from accelerate.utils import set_seed

        set_seed(config.seed)  # before prepare_model: adapter initialisation is seeded
        self.prepare_model()
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, config.checkpoint_share, config.checkpoint_unit)
        self.attention_backend = configure_attention(self.model, config.attention_backend)
        if config.recompute_attention_inputs:
            if self.attention_backend != "sdpa":
                raise ConfigError("config key 'recompute_attention_inputs': needs attention_backend=sdpa")
            from ..models.attention import recompute_attention_inputs

            recompute_attention_inputs(self.model)

        self.named_trainable = self.trainable_parameters()
        if not self.named_trainable:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameters (requires_grad)")
        with torch.no_grad():  # master weights in float32 whatever the model's dtype (mixed precision)
            for _, p in self.named_trainable:
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        self.params = [p for _, p in self.named_trainable]
        compile_model(self.model, config.compile, config.compile_memory_budget)

        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.lr_scheduler, config.warmup_steps, config.max_steps)
        )
        # Both go through accelerate: fp16 gradient scaling, and their states in save_state / load_state.
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.optimizer, self.lr_scheduler)

        self.ema_params = [p.detach().clone().float() for p in self.params] if config.ema_decay > 0 else None
        # The trainer's own generator for noise / timesteps: its state is checkpointed, so resumed runs draw
        # the same numbers whatever else consumed the global RNG.
        self.generator = torch.Generator(device=self.device).manual_seed(
            config.seed + 1_000_003 * self.accelerator.process_index)
        self.state = TrainState()
        self._last_metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------- setup
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        cfg = self.config
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("config key 'mixed_precision': fp16 needs a GPU (PyTorch has no fp16 autocast on "
                              "CPU); use bf16 or no")
        # AcceleratorState is a per-process singleton that refuses a second, different mixed precision (e.g. a
        # notebook or a test running two trainers): reset it, keeping the distributed state (PartialState).
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != cfg.mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=self.trackers or None,
            project_dir=str(self.output_dir),
            step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the processes
        )

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype for FROZEN weights under mixed precision (trainable ones stay float32)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.mixed_precision, torch.float32)

    # ------------------------------------------------------------------------------------- hooks
    def prepare_model(self) -> None:
        """Called once the accelerator exists and the seed is set: move the model, attach adapters, cast frozen
        weights to `weight_dtype`. The default moves `self.model` to the device."""
        self.model.to(self.device)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return (scalar loss, metrics) for one micro-batch (already on the device, inside autocast)."""
        raise NotImplementedError

    def save_model(self, directory: Path) -> None:
        """Write the trained weights in their user-facing format. Default: the trainable parameters."""
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors(dict(self.named_trainable), directory / "trainable.safetensors")

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors a subclass needs to continue exactly (e.g. a reference snapshot); saved with checkpoints."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step (skipped ones included) with the new step number."""

    def nonfinite_hint(self) -> str:
        """A trainer-specific likely cause of non-finite losses, added to the abort message."""
        return ""

    # ------------------------------------------------------------------------------------- data
    def _global_batch_size(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes

    def batches_per_epoch(self) -> int:
        return len(self.train_dataset) // self._global_batch_size()

    def _epoch_batches(self, epoch: int, start: int) -> list[list[int]]:
        """This process's index lists for `epoch`, from batch `start` on. The order is a function of (seed, epoch)
        only, so the data position is one number (`consumed_batches`) and resuming needs no sampler state."""
        n, gbs, bs = len(self.train_dataset), self._global_batch_size(), self.config.batch_size
        if self.config.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()
        else:
            order = list(range(n))
        rank = self.accelerator.process_index
        out = []
        for b in range(start, n // gbs):  # drop_last: every step sees full batches
            chunk = order[b * gbs:(b + 1) * gbs]
            out.append(chunk[rank * bs:(rank + 1) * bs])
        return out

    def _batch_stream(self, consumed: int) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        per_epoch = self.batches_per_epoch()
        epoch, start = divmod(consumed, per_epoch)
        while True:
            loader = DataLoader(self.train_dataset, batch_sampler=self._epoch_batches(epoch, start),
                                collate_fn=self.collate_fn, num_workers=self.config.num_workers)
            yield from loader
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------------------------- EMA
    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.config.ema_decay
        for e, p in zip(self.ema_params, self.params):
            e.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily put the EMA weights into the model (for saving or evaluating them)."""
        if self.ema_params is None:
            raise RuntimeError("ema_decay is 0: there are no EMA weights")
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema_params):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    # ------------------------------------------------------------------------------------- checkpoints
    def _checkpoint_files(self, directory: Path) -> dict[str, int]:
        return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-{step}/` atomically (all processes must call this). Layout:

            trainer_state.json        step, data position, counters, the list of files with sizes (written last)
            config.yaml               the resolved config
            trainable.safetensors     the trainable parameters by name (float32)
            ema.safetensors           their EMA (ema_decay > 0)
            extra_state.safetensors   the trainer's extra state (if any)
            generator_{rank}.safetensors  the noise generator of each process
            optimizer.bin, scheduler.bin, random_states_{rank}.pkl [, scaler.pt]   accelerator.save_state
            metrics.jsonl             the run's metrics up to this step
            <model_subdir>/ [<model_subdir>_ema/]   save_model's output (Flow-DPO: a diffusers LoRA folder)
        """
        acc, step = self.accelerator, self.state.step
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f"{TMP_PREFIX}checkpoint-{step}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        save_tensors({"state": self.generator.get_state()}, tmp / f"generator_{acc.process_index}.safetensors")
        if self.is_main:
            save_tensors(dict(self.named_trainable), tmp / "trainable.safetensors")
            if self.ema_params is not None:
                names = [n for n, _ in self.named_trainable]
                save_tensors(dict(zip(names, self.ema_params)), tmp / "ema.safetensors")
            extra = self.extra_state()
            if extra:
                save_tensors(extra, tmp / "extra_state.safetensors")
            save_config(self.config, tmp / "config.yaml")
            metrics = self.output_dir / METRICS_FILE
            if metrics.is_file():
                shutil.copyfile(metrics, tmp / METRICS_FILE)
            self._save_model_dirs(tmp)
        acc.wait_for_everyone()
        if self.is_main:
            state = {**dataclasses.asdict(self.state), "num_processes": acc.num_processes,
                     "batch_size": self.config.batch_size, "grad_accum": self.config.grad_accum,
                     "files": self._checkpoint_files(tmp)}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            publish_dir(tmp, final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _save_model_dirs(self, parent: Path) -> None:
        self.save_model(parent / self.model_subdir)
        if self.ema_params is not None:
            with self.ema_weights():
                self.save_model(parent / f"{self.model_subdir}_ema")

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        if keep <= 0:
            return
        for _, path in list_checkpoints(self.output_dir)[:-keep]:
            remove_dir(path)

    def _resolve_resume(self) -> Path | None:
        resume = self.config.resume
        if resume in (None, "", "none"):
            existing = latest_checkpoint(self.output_dir)
            if existing is not None:
                raise CheckpointError(
                    f"output_dir {str(self.output_dir)!r} already holds checkpoints (newest: {existing.name}); "
                    "continue with resume=latest, or choose another output_dir")
            return None
        if resume == "latest":
            found = latest_checkpoint(self.output_dir)
            if found is None:
                logger.info("resume=latest: no checkpoint in %s yet, starting from scratch", self.output_dir)
            return found
        return Path(resume)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything `save_checkpoint` wrote (all processes must call this)."""
        path = Path(path)
        saved = verify_checkpoint(path)
        acc = self.accelerator
        tensors = load_tensors(path / "trainable.safetensors")
        names = [n for n, _ in self.named_trainable]
        missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit this model: {len(missing)} trainable parameters missing "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it made with "
                "another LoRA rank / targets or another model?")
        with torch.no_grad():
            for n, p in self.named_trainable:
                if tensors[n].shape != p.shape:
                    raise CheckpointError(f"checkpoint {str(path)!r}: {n} has shape {tuple(tensors[n].shape)}, "
                                          f"the model's is {tuple(p.shape)}")
                p.copy_(tensors[n])
        acc.load_state(str(path))  # optimizer, LR schedule, global RNGs (and fp16 scaler)
        if self.ema_params is not None:
            ema_file = path / "ema.safetensors"
            if ema_file.is_file():
                ema = load_tensors(ema_file)
                for n, e in zip(names, self.ema_params):
                    e.copy_(ema[n])
            else:
                logger.warning("%s has no EMA weights: the EMA restarts from the current weights", path)
                for e, p in zip(self.ema_params, self.params):
                    e.copy_(p.detach())
        extra_file = path / "extra_state.safetensors"
        self.load_extra_state(load_tensors(extra_file) if extra_file.is_file() else {})
        gen_file = path / f"generator_{acc.process_index}.safetensors"
        if gen_file.is_file():
            self.generator.set_state(load_tensors(gen_file)["state"])
        else:
            logger.warning("%s has no noise-generator state for process %d (saved with %d processes): noise "
                           "will differ from an uninterrupted run", path, acc.process_index, saved["num_processes"])
        self.state = TrainState(**{k: saved[k] for k in (f.name for f in dataclasses.fields(TrainState))})
        self._warn_on_changed_settings(path, saved)

    def _warn_on_changed_settings(self, path: Path, saved: dict) -> None:
        changed = [f"{k}: {saved.get(k)} -> {v}" for k, v in (
            ("num_processes", self.accelerator.num_processes), ("batch_size", self.config.batch_size),
            ("grad_accum", self.config.grad_accum)) if saved.get(k) is not None and saved.get(k) != v]
        if changed:
            logger.warning("resuming %s with different settings (%s): training continues, but not exactly as an "
                           "uninterrupted run would", path.name, "; ".join(changed))

    # ------------------------------------------------------------------------------------- logging
    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop the records a killed run wrote after its last checkpoint (no duplicated steps)."""
        metrics = self.output_dir / METRICS_FILE
        if not metrics.is_file():
            return
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = metrics.with_name(f"{TMP_PREFIX}{METRICS_FILE}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)

    def _log(self, record: dict[str, Any]) -> None:
        self._last_metrics = record
        if not self.is_main:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with open(self.output_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
            fh.flush()
        if self.trackers:
            self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=record["step"])

    def _reduce_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        means = {k: v / max(count, 1) for k, v in sums.items()}
        if self.accelerator.num_processes > 1 and means:
            keys = sorted(means)
            vec = torch.tensor([means[k] for k in keys], device=self.device, dtype=torch.float64)
            vec = self.accelerator.reduce(vec, reduction="mean")
            means = dict(zip(keys, vec.tolist()))
        return means

    # ------------------------------------------------------------------------------------- the step
    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _average_gradients(self) -> None:
        """Mean of the trainable gradients over processes (the model is not DDP-wrapped, see the module doc)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def _likely_cause(self, batch_nonfinite: bool, grad_only: bool) -> str:
        cfg = self.config
        if batch_nonfinite:
            return "the data: the batch itself holds NaN/inf values (check the media or the latent cache)"
        if any(not bool(torch.isfinite(p).all()) for p in self.params):
            return (f"the weights diverged (non-finite trainable parameters): lower lr (now {cfg.lr:g}) or keep "
                    f"max_grad_norm > 0 (now {cfg.max_grad_norm:g})")
        parts = []
        if cfg.mixed_precision == "fp16":
            parts.append("fp16 overflow: try mixed_precision=bf16")
        if grad_only:
            parts.append("exploding gradients (the loss itself was finite): lower lr or set max_grad_norm")
        hint = self.nonfinite_hint()
        if hint:
            parts.append(hint)
        parts.append(f"a learning rate too high (lr={cfg.lr:g})")
        return "; or ".join(parts)

    def _train_step(self, batches: Iterator[Any]) -> tuple[dict[str, Any], NonFiniteLossError | None]:
        """One optimizer step over grad_accum micro-batches: (the step's record, an error to raise after
        logging it when too many non-finite steps came in a row)."""
        cfg, acc = self.config, self.accelerator
        self.model.train()
        sums: dict[str, float] = {}
        nonfinite_loss = batch_nonfinite = False
        for _ in range(cfg.grad_accum):
            batch = to_device(next(batches), self.device)
            self.state.consumed_batches += 1
            with acc.autocast():
                loss, metrics = self.compute_loss(batch)
            for k, v in {"loss": loss, **metrics}.items():  # a non-finite loss is logged too (as null)
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
            if not bool(torch.isfinite(loss.detach()).all()):
                # Keep reading the remaining micro-batches (every process must consume the same data) but never
                # backpropagate a non-finite loss: it would poison the gradients of the whole step.
                nonfinite_loss = True
                batch_nonfinite = batch_nonfinite or _has_nonfinite(batch)
                continue
            if loss.requires_grad:
                acc.backward(loss / cfg.grad_accum)

        skip = self._any_process(nonfinite_loss)
        grad_norm = float("nan")
        grad_only = False
        if not skip:
            self._average_gradients()
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
            # Under fp16 the gradient scaler handles inf gradients itself (it skips the update, lowers the scale);
            # otherwise a non-finite gradient with a finite loss is treated like a non-finite loss.
            if not math.isfinite(grad_norm) and acc.scaler is None:
                skip = grad_only = True
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            if self.ema_params is not None and not acc.optimizer_step_was_skipped:
                self._update_ema()
        lr = self.lr_scheduler.get_last_lr()[0]
        # The schedule advances on skipped steps too: the LR stays a function of the step number.
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        step = self.state.step

        abort = None
        if skip:
            self.state.nonfinite_total += 1
            self.state.nonfinite_in_a_row += 1
            if self.state.nonfinite_in_a_row == 1:
                self.state.first_nonfinite_step = step
            what = "gradient" if grad_only else "loss"
            logger.warning("step %d: non-finite %s, step skipped (%d in a row, %d in total)", step, what,
                           self.state.nonfinite_in_a_row, self.state.nonfinite_total)
            if self.state.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                cause = self._likely_cause(self._any_process(batch_nonfinite), grad_only)
                abort = NonFiniteLossError(
                    f"training stopped at step {step}: the {what} was not finite in {self.state.nonfinite_in_a_row} "
                    f"steps in a row (steps {self.state.first_nonfinite_step}-{step}; max_nonfinite_in_a_row="
                    f"{cfg.max_nonfinite_in_a_row}). Likely cause: {cause}. The last checkpoint before it is "
                    f"{latest_checkpoint(self.output_dir) or 'none (no checkpoint yet)'}.")
        else:
            self.state.nonfinite_in_a_row = 0
            self.state.first_nonfinite_step = None

        record: dict[str, Any] = {"step": step}
        record.update(self._reduce_metrics(sums, cfg.grad_accum))
        record.update({"lr": lr, "grad_norm": grad_norm, "epoch": self.state.consumed_batches / self.batches_per_epoch(),
                       "nonfinite_skipped": self.state.nonfinite_total})
        if skip:
            record["skipped_nonfinite"] = True
        return record, abort

    # ------------------------------------------------------------------------------------- train
    def train(self, stop_at_step: int | None = None) -> TrainResult:
        """Train to `max_steps` (or stop early after `stop_at_step`, with a checkpoint there)."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        target = cfg.max_steps if stop_at_step is None else min(stop_at_step, cfg.max_steps)
        if self.batches_per_epoch() == 0:
            raise ValueError(f"the dataset has {len(self.train_dataset)} items, fewer than one global batch "
                             f"(batch_size {cfg.batch_size} x {acc.num_processes} processes)")
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for p in self.output_dir.iterdir():  # leftovers of a killed run: never checkpoints
                if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        acc.wait_for_everyone()
        resume_from = self._resolve_resume()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            logger.info("resumed from %s at step %d", resume_from, self.state.step)
        if self.is_main:
            # Records past the restored step (or any, on a fresh start) come from a run killed before it could
            # checkpoint them: they are written again, so drop them (no duplicated steps).
            self._truncate_metrics(self.state.step)
            save_config(self.config, self.output_dir / "config.yaml")
        if self.trackers:
            acc.init_trackers("genalign", config=_flat_config(cfg))

        last_checkpoint = resume_from
        batches = self._batch_stream(self.state.consumed_batches)
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, desc=type(self).__name__, dynamic_ncols=True,
                   disable=not (cfg.progress_bar and self.is_main))
        start = time.perf_counter()
        try:
            while self.state.step < target:
                record, abort = self._train_step(batches)
                step = self.state.step
                if step % cfg.log_every == 0 or step == target or record.get("skipped_nonfinite"):
                    record["elapsed_s"] = round(time.perf_counter() - start, 3)
                    self._log(record)
                if abort is not None:
                    raise abort
                self.on_step_end(step)
                bar.update(1)
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == target:
                    last_checkpoint = self.save_checkpoint()
        finally:
            bar.close()
        final_dir = None
        if self.state.step >= cfg.max_steps:
            final_dir = self._save_final_model()
        if self.trackers:
            acc.end_training()
        return TrainResult(self.state.step, self.output_dir, last_checkpoint, final_dir, self.state.nonfinite_total,
                           self._last_metrics)

    def _save_final_model(self) -> Path:
        """The finished run's weights at `output_dir/<model_subdir>` (+ `_ema`), written atomically."""
        final = self.output_dir / self.model_subdir
        if self.is_main:
            tmp = self.output_dir / f"{TMP_PREFIX}final"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model_dirs(tmp)
            for sub in sorted(tmp.iterdir()):
                publish_dir(sub, self.output_dir / sub.name)
            tmp.rmdir()
        self.accelerator.wait_for_everyone()
        return final


def _flat_config(cfg) -> dict[str, Any]:
    """Tracker-friendly config: scalars and strings only."""
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
