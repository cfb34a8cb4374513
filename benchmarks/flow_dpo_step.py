"""Flow-DPO training step: genalign's trainer vs the way public implementations do it.

genalign: FlowDPOTrainer on a latent + text-embedding cache (`genalign cache`); the reference is the same
network with its LoRA switched off (no copy); winner and loser in one batched forward, shared noise and t.
peer: a separate full frozen copy of the network as the reference; winner and loser in separate forwards (policy
and reference); the VAE encodes both images and the text encoders encode the prompt at every step; no cache.

Both variants train the same LoRA on the same model and batch. Each runs in its own subprocess so that its peak
memory is its own; genalign's cache is written first by another process, as `genalign cache` does before
`genalign train`, and genalign then releases the text encoders as `genalign train` does on a cache.

On the CPU, two models (`--model`): the world's image model at 32 px (its transformer is nearly all of it: the VAE
and text encoders are tiny), and "sd35m-proportions", a random-init SD3 at 256 px with SD3.5-medium's components in
its proportions (T5 and CLIP text towers 3.0x the transformer's parameters, real 2.5x; each way's share of the
arithmetic within 0.02 of the real model's at 512 px: VAE encoding 0.15, text encoders 0.15 of genalign's step;
peer / genalign 1.30x, real 1.31x). Memory, three ways. Tensor memory, the GPU figures' measure
(torch.cuda.max_memory_allocated): the tensors kept between steps (weights, optimizer state) plus the highest rise of
one more step's tensors, from the allocator's events in torch's profiler. And, above the process before the model
was loaded with the libraries both use imported first: the peak *live* heap (glibc's bytes in use, `HeapPeak`, over
the timed steps and over the whole run; it also counts Python objects, compiled code and the data held in host
memory) and the peak RSS, which also holds what glibc keeps after frees (about twice the live peak here, and
varying with the heap's layout from run to run). Also: the FLOPs of one step of each (FlopCounterMode with
attention on SDPA's math path: torch counts nothing for the CPU's fused attention kernel), the bound on the
speed-up where compute is the limit, and genalign with gradient checkpointing of all blocks ("genalign_ckpt") or
every other one ("_half": checkpoint_share=0.5), with `compile=full` ("genalign_compile") and with both. Printed
last: a table with ratios.

At scale (`--device cuda`, issue 3): genalign's FlowDPOTrainer step on an SD3.5-medium-sized MMDiT with random
weights (GPU.md's config, 2.24 B params), bf16 mixed precision, LoRA rank 16 on the attention projections,
reference = the same network with the LoRA switched off, winners + losers in one batched forward, AdamW, on a
synthetic bf16 latent cache (latents 16 x px/8 x px/8, T5 + CLIP text 333 x 4096, pooled 2048), 2 pairs per step,
at 512 and 1024 px. Reported per variant: ms/step (CUDA events, after warm-up), FLOPs of one step (torch's
FlopCounterMode, counted once per resolution on the eager step, outside timing), TFLOP/s, share of the measured
bf16 matmul ceiling (8192^3), peak memory (torch.cuda.max_memory_allocated over the timed steps), compile time,
and ratios to GPU.md's anchor (plain eager loop, H100: 319 ms / 101 TFLOP/s at 512 px, 714 ms / 228 TFLOP/s at
1024 px, peak 15.9 / 41.5 GiB; target >= 2x the TFLOP/s at 512 px, >= 1.4x at 1024 px, peak no higher).
Variants: eager (the trainer's step as is), raw (the same compute_loss + backward + AdamW without the loop's
bookkeeping), ckpt (gradient_checkpointing=True), compile (torch.compile of each transformer block, default
mode), compile_ckpt, compile_full (the whole transformer). At 512 px the eager step is launch-bound and its time
depends on what ran before it in the process: in two runs on one H200 the same computation took 401 / 372 ms
when timed first and 245 / 327 ms when timed again in the same process (cause not isolated), so compare eager
variants at 512 px from separate runs with care. Each configuration that fails (OOM, a missing package) is recorded in the JSON and the
run goes on; the JSON is rewritten after every configuration.

    python benchmarks/flow_dpo_step.py                 # CPU, the world's image model
    python benchmarks/flow_dpo_step.py --model sd35m-proportions   # CPU, SD3.5-medium's proportions, scaled down
    python benchmarks/flow_dpo_step.py --tiny          # the at-scale code path on the CPU, tiny config (< 1 min)
    python benchmarks/flow_dpo_step.py --device cuda --quick --out $OUT   # ~4-6 min on an H100 (2 compiles)
    python benchmarks/flow_dpo_step.py --device cuda --px 1024 --variants eager compile_ckpt
    python benchmarks/flow_dpo_step.py --count-real-size   # both ways' TFLOP and weights at SD3.5-medium size

`--count-real-size` answers what the CPU run at the world's size cannot: how the two ways compare at a real
model's proportions, where the text encoders (T5-XXL and two CLIPs, 5.6 B parameters) outweigh the transformer
(2.2 B). It counts on the meta device (shapes only), so it runs anywhere in seconds.
JSON: $OUT/flow_dpo_step_cpu_MODEL.json (CPU), flow_dpo_step_real_size_count.json, flow_dpo_step_cuda.json / flow_dpo_step_tiny_cpu.json, or --out x.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_common, rlg_step

# ------------------------------------------------------------------------------------------- the CPU models
# "world": the shipped world image model (SD3 family; a 2.3M-parameter transformer, text encoders of 0.02M: the
# transformer is nearly all of it). "sd35m-proportions": a random-init SD3 pipeline with SD3.5-medium's components
# in its proportions, scaled down to run on a CPU (a 3.9M-parameter MMDiT): T5 2.6x the transformer's parameters
# (T5-XXL: 2.1x), two CLIP text towers 0.37x (real 0.37x), a 4-level 8x VAE with 16 latent channels, dual-attention
# blocks in the first half, qk RMS-norm, text tokens a third of the image tokens (333 : 1024 at 512 px). Sized so
# that the shares of the arithmetic match the real model's at 512 px (the module docstring; `count_two_ways`).
CPU_MODELS = {"world": {"px": 32, "max_sequence_length": 1},
              "sd35m-proportions": {"px": 256, "max_sequence_length": 64}}
PROPORTIONED_TRANSFORMER = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 6,
                            "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 256,
                            "caption_projection_dim": 128, "pooled_projection_dim": 192, "out_channels": 16,
                            "pos_embed_max_size": 32, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1, 2)}
PROPORTIONED_T5 = {"d_model": 256, "d_kv": 32, "num_heads": 8, "d_ff": 768, "num_layers": 12,
                   "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "vocab_size": 32}
PROPORTIONED_CLIPS = ({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 2,
                       "projection_dim": 64, "vocab_size": 32, "max_position_embeddings": 16},
                      {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 4,
                       "projection_dim": 128, "hidden_act": "gelu", "vocab_size": 32, "max_position_embeddings": 16})
PROPORTIONED_VAE = {"block_out_channels": [4, 12, 24, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
                    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 16,
                    "norm_num_groups": 4, "use_quant_conv": False, "use_post_quant_conv": False,
                    "scaling_factor": 1.5305, "shift_factor": 0.0609}


def save_proportioned_pipeline(out: str, seed: int = 0) -> str:
    """Write the "sd35m-proportions" pipeline (random init, seeded) to `out`; both ways load it from there."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from genalign.models.tiny import clip_tokenizer, t5_tokenizer

    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(CPU_MODELS["sd35m-proportions"]["max_sequence_length"])
    assert len(clip_tok) <= PROPORTIONED_CLIPS[0]["vocab_size"] and len(t5_tok) <= PROPORTIONED_T5["vocab_size"]
    assert clip_tok.model_max_length == PROPORTIONED_CLIPS[0]["max_position_embeddings"]
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(bos_token_id=clip_tok.bos_token_id,
                                                        eos_token_id=clip_tok.eos_token_id,
                                                        pad_token_id=clip_tok.pad_token_id, **cfg))
             for cfg in PROPORTIONED_CLIPS]
    t5 = T5EncoderModel(T5Config(**PROPORTIONED_T5))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**PROPORTIONED_TRANSFORMER), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**PROPORTIONED_VAE), text_encoder=clips[0], tokenizer=clip_tok, text_encoder_2=clips[1],
        tokenizer_2=copy.deepcopy(clip_tok), text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(out)
    return out


def model_folder(model: str, workdir: str) -> str:
    from genalign.world import world_model_path

    if model == "world":
        return str(world_model_path("image"))
    return save_proportioned_pipeline(str(Path(workdir) / model))


def random_pairs(n: int, size: int, seed: int = 0):
    from genalign.data.preference import PreferencePair
    from genalign.world.grammar import image_splits

    rng = np.random.default_rng(seed)
    prompts = image_splits().train
    return [PreferencePair(prompts[i % len(prompts)], rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                           rng.integers(0, 256, (size, size, 3), dtype=np.uint8), 1.0) for i in range(n)]


@contextlib.contextmanager
def cpu_flop_counter():
    """FlopCounterMode with attention on SDPA's math path: torch counts no FLOPs for the CPU's fused attention
    kernel (0 for a 4 x 4 x 336 x 32 attention that does 0.23 GFLOP), so attention would be left out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS record afresh (Linux: "5" to clear_refs), so that the peak read later is that
    of training, not of loading. False where the kernel refuses (the peak then includes loading)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_in_use_mb() -> float | None:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2: in-use chunks of every arena plus mmapped
    blocks): the process's live memory, where the resident size also holds what glibc keeps after frees (on this
    workload the resident peak was about twice the live one). None off glibc."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


@functools.cache
def _mallinfo2():
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


class HeapPeak:
    """The peak of `heap_in_use_mb` while the block runs, sampled every 2 ms by a thread (torch's kernels
    release the GIL; the peak of a training step lasts from the end of the forward into the backward, far longer
    than a sample). The CPU's analogue of torch.cuda.max_memory_allocated. `restart()` (after the warm-up steps)
    starts a new peak, as torch.cuda.reset_peak_memory_stats does; `run_peak` keeps the peak of the whole block,
    which on the CPU also holds the compiler's own working memory while it compiles in the first step."""

    def __enter__(self):
        self.peak = self.run_peak = heap_in_use_mb()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a restart must not be overwritten by a sample taken before it
        if self.peak is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            with self._lock:
                self.peak = max(self.peak, heap_in_use_mb())

    def restart(self) -> None:
        if self.peak is not None:
            with self._lock:
                self.run_peak = max(self.run_peak, self.peak)
                self.peak = heap_in_use_mb()

    def above(self, baseline: float | None, whole_run: bool = False) -> float | None:
        """The peak's rise over `baseline` (MB), since the last restart or `whole_run`; None off glibc."""
        if self.peak is None or baseline is None:
            return None
        return (max(self.peak, self.run_peak) if whole_run else self.peak) - baseline

    def __exit__(self, *exc):
        self._stop.set()
        if self.peak is not None:
            self._thread.join()
            self.peak = max(self.peak, heap_in_use_mb())


def resident_tensor_mb(modules, optimizers) -> float:
    """MB of the distinct tensor storages the training keeps between steps: the modules' parameters and buffers
    and the optimizers' state (tensors on the meta device hold no memory). What torch.cuda.memory_allocated
    would count before a step on a GPU; the data waiting in host memory is not part of it."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [v for opt in optimizers for state in opt.state.values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if not t.is_meta}
    return sum(storages.values()) / 2**20


def modules_of(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def step_tensor_rise_mb(step) -> float:
    """The highest rise of tensor memory during `step()` above what was allocated before it (MB), from the
    allocations and frees torch's CPU allocator reports to the profiler: tensors only, as
    torch.cuda.max_memory_allocated minus memory_allocated would count on a GPU (no compiler buffers, no
    Python objects, no data held in host memory)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    in_use = peak = 0
    for e in events:
        in_use += e.nbytes()
        peak = max(peak, in_use)
    return peak / 2**20


# ------------------------------------------------------------------------------------------- variants (CPU)
# Memory, both ways alike: the peak resident memory during the training steps, above the process before the
# model was loaded (its ~1 GB of libraries is the same in both). It counts what each way keeps resident while it
# trains: the weights (the peer: two transformers, the text encoders, the VAE; genalign on a cache: one
# transformer and the VAE, the text encoders released after the cache's check) and the activations.
def preload_libraries() -> None:
    """Import, before the memory baseline, the libraries both ways use (the public scripts run on accelerate too),
    so that their ~300 MB of code and tables are counted in neither way's memory; diffusers loads its modules
    lazily, on first use, which would otherwise land on one side of the baseline or the other."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: F401
    from transformers import CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401


def write_cache(model_dir: str, px: int, max_sequence_length: int, num_pairs: int, out: str, threads: int) -> None:
    """The latent + text-embedding cache of the benchmark's pairs (what `genalign cache` writes)."""
    from genalign.data import build_cache
    from genalign.models import load_adapter

    torch.set_num_threads(threads)
    adapter = load_adapter(model_dir, max_sequence_length=max_sequence_length)
    build_cache(adapter, random_pairs(num_pairs, px), out, resolution=px, progress=False)


# genalign's CPU variants: trainer options on top of the default step
GENALIGN_CPU_VARIANTS = {
    "genalign": {},
    "genalign_ckpt": {"gradient_checkpointing": True},
    "genalign_compile": {"compile": "full"},
    "genalign_compile_ckpt": {"compile": "full", "gradient_checkpointing": True},
    "genalign_ckpt_half": {"gradient_checkpointing": True, "checkpoint_share": 0.5},
    "genalign_compile_ckpt_half": {"compile": "full", "gradient_checkpointing": True, "checkpoint_share": 0.5},
    "genalign_compile_ckpt_third": {"compile": "full", "gradient_checkpointing": True, "checkpoint_share": 1 / 3},
    "genalign_ckpt_ff": {"gradient_checkpointing": True, "checkpoint_unit": "feedforward"},
    "genalign_compile_ckpt_ff": {"compile": "full", "gradient_checkpointing": True, "checkpoint_unit": "feedforward"},
    "genalign_qk": {"recompute_attention_inputs": True},
    "genalign_compile_qk": {"compile": "full", "recompute_attention_inputs": True},
    "genalign_ckpt_ff_qk": {"gradient_checkpointing": True, "checkpoint_unit": "feedforward",
                            "recompute_attention_inputs": True},
    "genalign_compile_ckpt_ff_qk": {"compile": "full", "gradient_checkpointing": True,
                                    "checkpoint_unit": "feedforward", "recompute_attention_inputs": True},
    "genalign_compile_ckpt_ff_half_qk": {"compile": "full", "gradient_checkpointing": True, "checkpoint_share": 0.5,
                                         "checkpoint_unit": "feedforward", "recompute_attention_inputs": True},
    "genalign_compile_ckpt_ff_third_qk": {"compile": "full", "gradient_checkpointing": True, "checkpoint_share": 1 / 3,
                                          "checkpoint_unit": "feedforward", "recompute_attention_inputs": True},
    "genalign_compile_budget50": {"compile": "full", "compile_memory_budget": 0.5},
    "genalign_compile_budget30": {"compile": "full", "compile_memory_budget": 0.3},
}


def run_genalign(model_dir: str, px: int, max_sequence_length: int, pairs: int, steps: int, warmup: int,
                 threads: int, **options) -> dict:

    from genalign.data import load_cache
    from genalign.models import load_adapter
    from genalign.trainers import FlowDPOConfig, FlowDPOTrainer
    from genalign.trainers.loop import to_device

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp())
    # The cache is built once, before training and in its own process (`genalign cache` then `genalign train`),
    # so the VAE and text-encoder work and the memory it leaves with the allocator are not part of the step.
    t0 = time.perf_counter()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import flow_dpo_step as b; "
            f"b.write_cache({model_dir!r}, {px}, {max_sequence_length}, {pairs * (steps + 1)}, "
            f"{str(tmp / 'cache')!r}, {threads})")
    subprocess.run([sys.executable, "-c", code], check=True)
    cache_s = time.perf_counter() - t0
    preload_libraries()
    baseline, baseline_live = rss_mb(), heap_in_use_mb()
    # as `genalign train flow-dpo` on a cache does (FlowDPOTrainer.from_config)
    adapter = load_adapter(model_dir, max_sequence_length=max_sequence_length, text_encoders="empty")
    dataset = load_cache(tmp / "cache", adapter=adapter, resolution=px)
    adapter.release_text_encoders()
    cfg = FlowDPOConfig(output_dir=str(tmp / "run"), max_steps=steps, batch_size=pairs, lr=1e-4, log_every=1,
                        checkpoint_every=10**6, report_to="none", progress_bar=False, num_threads=threads,
                        lora_rank=16, seed=0, resolution=px, **options)
    trainer = FlowDPOTrainer(adapter, cfg, dataset)
    peak_reset = reset_peak_rss()
    with HeapPeak() as live:
        def restart_after_warmup(step, on_step_end=trainer.on_step_end):
            on_step_end(step)
            if step == warmup:
                live.restart()

        trainer.on_step_end = restart_after_warmup
        trainer.train()
    peak = peak_rss_mb() - baseline
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records}
    step_s = (elapsed[steps] - elapsed[warmup]) / (steps - warmup)
    # Tensor memory of one more step of the same loop (the cache holds a batch beyond the timed ones)
    resting = resident_tensor_mb(modules_of(trainer.adapter.pipe), [trainer.optimizer])
    rise = step_tensor_rise_mb(lambda: trainer._train_step(trainer._batch_stream(trainer.state.consumed_batches)))
    # The arithmetic of one step (matmuls, convolutions, attention), after the timed run
    batch = to_device(next(trainer._batch_stream(0)), trainer.device)
    with cpu_flop_counter() as counter:
        loss, _ = trainer.compute_loss(batch)
        loss.backward()
    return {"step_s": step_s, "cache_build_s": cache_s, "peak_mb": peak, "peak_reset": peak_reset,
            "live_peak_mb": live.above(baseline_live), "live_peak_run_mb": live.above(baseline_live, whole_run=True),
            "tensor_peak_mb": resting + rise, "tensor_resting_mb": resting,
            "gflop_per_step": counter.get_total_flops() / 1e9}


def run_peer(model_dir: str, px: int, max_sequence_length: int, pairs: int, steps: int, warmup: int,
             threads: int) -> dict:
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig

    from genalign import flow
    from genalign.losses import flow_dpo_loss
    from genalign.models.base import read_model_index

    torch.set_num_threads(threads)
    preload_libraries()
    baseline, baseline_live = rss_mb(), heap_in_use_mb()
    absent = {k: None for k, v in read_model_index(model_dir).items() if v == [None, None]}  # the world's: no T5
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, **absent)
    transformer = pipe.transformer
    reference = copy.deepcopy(transformer).requires_grad_(False).eval()  # the peer's separate full copy
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = random_pairs(pairs * (steps + 1), px)
    g = torch.Generator().manual_seed(0)
    vae = pipe.vae
    shift = vae.config.shift_factor or 0.0

    def one_step(step: int) -> None:
        batch = data[step * pairs : (step + 1) * pairs]
        with torch.no_grad():  # VAE and text encoders every step: no cache
            def px(key, batch=batch):
                return torch.from_numpy(np.stack([getattr(p, key) for p in batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
            lat_w = (vae.encode(px("media_a")).latent_dist.sample() - shift) * vae.config.scaling_factor
            lat_l = (vae.encode(px("media_b")).latent_dist.sample() - shift) * vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt([p.prompt for p in batch], None, None,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=max_sequence_length)
        t = flow.sample_logit_normal(pairs, generator=g)
        noise = torch.randn(lat_w.shape, generator=g)
        errs = {}
        for name, x0 in (("w", lat_w), ("l", lat_l)):
            x_t = flow.interpolate(x0, noise, t)
            target = flow.velocity_target(x0, noise)
            kw = {"hidden_states": x_t, "timestep": t * 1000, "encoder_hidden_states": embeds,
                  "pooled_projections": pooled}
            errs[f"model_{name}"] = ((transformer(**kw).sample - target) ** 2).mean(dim=(1, 2, 3))
            with torch.no_grad():
                errs[f"ref_{name}"] = ((reference(**kw).sample - target) ** 2).mean(dim=(1, 2, 3))
        loss, _ = flow_dpo_loss(errs["model_w"], errs["model_l"], errs["ref_w"], errs["ref_l"], beta=100.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    peak_reset = reset_peak_rss()
    times = []
    with HeapPeak() as live:
        for step in range(steps):
            t0 = time.perf_counter()
            one_step(step)
            times.append(time.perf_counter() - t0)
            if step + 1 == warmup:
                live.restart()
    peak = peak_rss_mb() - baseline
    resting = resident_tensor_mb([*modules_of(pipe), reference], [opt])
    rise = step_tensor_rise_mb(lambda: one_step(steps))
    with cpu_flop_counter() as counter:
        one_step(steps)
    return {"step_s": float(np.mean(times[warmup:])), "peak_mb": peak, "peak_reset": peak_reset,
            "live_peak_mb": live.above(baseline_live), "live_peak_run_mb": live.above(baseline_live, whole_run=True),
            "tensor_peak_mb": resting + rise, "tensor_resting_mb": resting,
            "gflop_per_step": counter.get_total_flops() / 1e9}


# ------------------------------------------------------------------------------------------- at scale (GPU / --tiny)
# GPU.md's anchors: a plain eager loop on an H100 80GB (torch 2.11), 2 pairs per step, bf16, SDPA.
ANCHORS = {
    512: {"ms": 319.0, "tflops": 101.0, "peak_gib": 15.9, "ckpt_ms": 591.0, "ckpt_peak_gib": 15.4},
    1024: {"ms": 714.0, "tflops": 228.0, "peak_gib": 41.5, "ckpt_ms": 926.0, "ckpt_peak_gib": 39.1},
}
TARGET_TFLOPS_RATIO = {512: 2.0, 1024: 1.4}  # issue 3: vs the anchor's TFLOP/s, peak memory no higher
# All three kinds of SD3.5 blocks (dual attention, plain, context_pre_only last), tiny: the CPU check of the path.
TINY = {"sample_size": 16, "patch_size": 2, "in_channels": 16, "num_layers": 3, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 64, "caption_projection_dim": 32,
        "pooled_projection_dim": 32, "out_channels": 16, "pos_embed_max_size": 32, "qk_norm": "rms_norm",
        "dual_attention_layers": (0,)}
# name -> (what differs from the trainer's default step). "raw" is the same compute_loss + backward + AdamW on a
# batch already on the device, without the loop's bookkeeping (data loading, metric syncs, clipping, finiteness
# checks, LR schedule): the difference to "eager" is what genalign's loop costs.
VARIANTS = {
    "eager": {},
    "raw": {"raw": True},
    "ckpt": {"ckpt": True},
    "compile": {"compile": "blocks"},
    "compile_ckpt": {"compile": "blocks", "ckpt": True},
    "compile_full": {"compile": "full"},
    "ckpt_half": {"ckpt": True, "share": 0.5},  # checkpoint_share=0.5: every other block
    "compile_full_budget50": {"compile": "full", "budget": 0.5},  # compile_memory_budget=0.5
    "compile_full_ckpt_ff": {"compile": "full", "ckpt": True, "unit": "feedforward"},  # checkpoint_unit=feedforward
    # and recompute_attention_inputs=True
    "compile_full_ckpt_ff_qk": {"compile": "full", "ckpt": True, "unit": "feedforward", "qk": True},
}
# run in this order (cheap and certain first: a run cut short by a timeout still has the baselines)
QUICK_PLAN = [("eager", 512), ("eager", 1024), ("ckpt", 1024), ("raw", 512), ("compile", 512), ("compile", 1024),
              ("ckpt_half", 1024)]
FULL_PLAN = [("eager", 512), ("eager", 1024), ("ckpt", 512), ("ckpt", 1024), ("raw", 512), ("raw", 1024),
             ("compile", 512), ("compile", 1024), ("compile_ckpt", 1024)]
TINY_PLAN = [("eager", 64), ("raw", 64), ("eager", 128), ("ckpt", 128)]


def scale_pipeline(cfg: dict, device, seed: int = 0):
    """SD3 pipeline around a random-init transformer built on `device` in bf16; no text encoders (the cache holds
    the embeddings) and no VAE (latents are cached; the pipeline's VAE scale factor is then 8, as SD3's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from gpu_common import build_on

    torch.manual_seed(seed)
    with build_on(device, torch.bfloat16):
        transformer = SD3Transformer2DModel(**cfg)
    transformer.eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def synthetic_cache(n: int, latent_shape, tokens: int, cfg: dict, seed: int = 0) -> list[dict]:
    """Items as `genalign.data.load_cache` returns them for a bf16 cache: latents of both sides, the prompt's
    cached text embeddings (SD3: T5 + CLIP joint sequence and the pooled CLIP vector), a label (A or B wins)."""
    g = torch.Generator().manual_seed(seed)
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    return [{"latents_a": randn(*latent_shape), "latents_b": randn(*latent_shape), "label": float(i % 2),
             "prompt": f"prompt {i}",
             "cond": {"prompt_embeds": randn(tokens, cfg["joint_attention_dim"], scale=0.5),
                      "pooled_prompt_embeds": randn(cfg["pooled_projection_dim"], scale=0.5)}}
            for i in range(n)]


def dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "graph_break_reasons": sorted(counters["graph_break"])[:5]}


def measure_steps(step, args, device, warmup: int) -> dict:
    from gpu_common import peak_gib, reset_peak, time_calls, wall

    warmup_s = [wall(step, device) for _ in range(warmup)]
    reset_peak(device)
    times = time_calls(step, args.steps, device)
    ms = sorted(times)[len(times) // 2] * 1e3
    return {"ms_per_step": round(ms, 2), "ms_mean": round(sum(times) / len(times) * 1e3, 2),
            "ms_all": [round(t * 1e3, 2) for t in times], "warmup_s": [round(w, 3) for w in warmup_s],
            "peak_gib": peak_gib(device)}


def run_scale_variant(name: str, px: int, cfg: dict, args, device, tokens: int, flops_cache: dict) -> list[dict]:
    """Build the model and genalign's FlowDPOTrainer (LoRA rank 16 on the attention projections, reference =
    the adapter switched off, winners + losers in one batched forward, AdamW, bf16 mixed precision) on a
    synthetic latent cache; count one step's FLOPs (eager, once per resolution), warm up, time `args.steps`."""
    import tempfile

    from gpu_common import allocated_gib, reset_peak

    from genalign.models import SD3Adapter
    from genalign.trainers import FlowDPOConfig, FlowDPOTrainer
    from genalign.trainers.loop import compile_model, to_device

    spec = VARIANTS[name]
    t0 = time.perf_counter()
    pipe = scale_pipeline(cfg, device, seed=args.seed)
    adapter = SD3Adapter(pipe)
    latent_shape = adapter.latent_shape(px, px)
    data = synthetic_cache(4 * args.pairs, latent_shape, tokens, cfg, seed=args.seed)
    config = FlowDPOConfig(output_dir=tempfile.mkdtemp(prefix="flow-dpo-bench-"), max_steps=10**6,
                           batch_size=args.pairs, lr=1e-4, lora_rank=16, mixed_precision="bf16",
                           gradient_checkpointing=bool(spec.get("ckpt")), checkpoint_share=spec.get("share", 1.0),
                           checkpoint_unit=spec.get("unit", "block"),
                           recompute_attention_inputs=bool(spec.get("qk")), report_to="none", progress_bar=False, checkpoint_every=0, log_every=10**6, seed=args.seed)
    trainer = FlowDPOTrainer(adapter, config, data)
    build_s = time.perf_counter() - t0
    batches = trainer._batch_stream(0)

    def trainer_step():
        _, abort = trainer._train_step(batches)
        if abort is not None:
            raise abort

    if spec.get("raw"):
        fixed = to_device(next(batches), trainer.device)

        def step():
            with trainer.accelerator.autocast():
                loss, _ = trainer.compute_loss(fixed)
            loss.backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
    else:
        step = trainer_step

    reset_peak(device)
    flops_note = "counted on this variant"
    if px not in flops_cache:
        from torch.utils.flop_counter import FlopCounterMode

        # on CUDA torch counts flash attention; on the CPU (--tiny) only SDPA's math path is counted
        with cpu_flop_counter() if device.type == "cpu" else FlopCounterMode(display=False) as counter:
            step()  # eager (compilation is applied below), outside any timing
        by_op = counter.get_flop_counts().get("Global", {})
        flops_cache[px] = {"flops": counter.get_total_flops(), "variant": name,
                           "by_op": {str(op): int(n) for op, n in by_op.items()}}
        if spec.get("ckpt"):
            flops_note += " (includes the checkpointing recompute)"
    else:
        flops_note = f"from {flops_cache[px]['variant']} at this resolution (same math)"
    flops = flops_cache[px]["flops"]
    if spec.get("compile"):
        from torch._dynamo.utils import counters

        counters.clear()
        # what the trainer's compile= does, after the FLOP count
        compile_model(adapter.denoiser, spec["compile"], spec.get("budget", 1.0))
    common = {
        "px": px, "pairs": args.pairs, "latent_shape": list(latent_shape), "flops_per_step": flops,
        "flops_note": flops_note, "flops_by_op": flops_cache[px]["by_op"], "build_s": round(build_s, 2),
        "transformer_params": sum(p.numel() for p in adapter.denoiser.parameters()),
        "lora_params": sum(p.numel() for _, p in trainer.named_trainable),
        "gradient_checkpointing": bool(spec.get("ckpt")), "checkpoint_share": spec.get("share", 1.0),
        "checkpoint_unit": spec.get("unit", "block"), "recompute_attention_inputs": bool(spec.get("qk")),
        "compile": spec.get("compile"), "compile_memory_budget": spec.get("budget", 1.0),
    }

    def row(variant: str, m: dict, compiled_now: bool) -> dict:
        r = {"variant": variant, **common, **m, "tflops": flops / (m["ms_per_step"] / 1e3) / 1e12,
             "allocated_after_gib": allocated_gib(device), "nonfinite_skipped": trainer.state.nonfinite_total}
        r["compile_s"] = (round(sum(m["warmup_s"]) - len(m["warmup_s"]) * m["ms_per_step"] / 1e3, 2)
                          if compiled_now else None)
        if spec.get("compile"):
            r["dynamo"] = dynamo_stats()
        if device.type == "cpu":
            from gpu_common import max_rss_mb

            r["max_rss_mb"] = round(max_rss_mb(), 1)
        return r

    shutil.rmtree(config.output_dir, ignore_errors=True)  # nothing is written there (no checkpoint, no log)
    return [row(name, measure_steps(step, args, device, args.warmup), bool(spec.get("compile")))]


def scale_main(args) -> None:
    from gpu_common import (
        device_name,
        error_record,
        free_memory,
        log,
        matmul_ceiling,
        output_path,
        versions,
        write_json,
    )
    from rlg_step import SD35_MEDIUM

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else SD35_MEDIUM
    tokens = args.text_tokens or (16 if args.tiny else 333)
    if args.px:
        plan = [(v, px) for px in args.px for v in (args.variants or ["eager", "compile"])]
    elif args.variants:
        pxs = [64, 128] if args.tiny else [512, 1024]
        plan = [(v, px) for px in pxs for v in args.variants]
    else:
        plan = TINY_PLAN if args.tiny else QUICK_PLAN if args.quick else FULL_PLAN
    unknown = sorted({v for v, _ in plan} - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    args.steps = args.steps or (3 if args.tiny else 5 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2 if args.quick else 3)
    args.pairs = args.pairs or 2
    tag = "tiny_" + device.type if args.tiny else device.type
    path = output_path(args.out, f"flow_dpo_step_{tag}.json")
    report = {"meta": {"device": device_name(device), "versions": versions(), "dtype": "bfloat16 (mixed precision: "
                       "frozen weights bf16, LoRA float32)", "config": {k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in cfg.items()},
                       "tiny": args.tiny, "quick": args.quick, "pairs_per_step": args.pairs, "text_tokens": tokens,
                       "steps_timed": args.steps, "warmup_steps": args.warmup, "lora_rank": 16,
                       "plan": [f"{v}@{px}" for v, px in plan], "anchors": ANCHORS,
                       "target_tflops_ratio": TARGET_TFLOPS_RATIO},
              "ceiling": None, "results": []}
    log(f"flow-dpo step at scale on {report['meta']['device']}: {report['meta']['plan']}")
    try:
        report["ceiling"] = matmul_ceiling(device, torch.bfloat16)
        log(f"bf16 matmul ceiling: {report['ceiling']['tflops']:.1f} TFLOP/s (n={report['ceiling']['n']})")
    except Exception as e:  # noqa: BLE001 - recorded; the step timings stand on their own
        report["ceiling"] = error_record(e)
    write_json(path, report)
    flops_cache: dict[int, dict] = {}
    ceiling = (report["ceiling"] or {}).get("tflops")
    for name, px in plan:
        log(f"{name} @ {px} px ...")
        try:
            rows = run_scale_variant(name, px, cfg, args, device, tokens, flops_cache)
        except Exception as e:  # noqa: BLE001 - OOM, a missing package, a compile failure: recorded, go on
            rows = [{"variant": name, "px": px, **error_record(e)}]
            log(f"{name} @ {px} FAILED: {rows[0]['error']}")
            del e
        for r in rows:
            if "error" in r:
                report["results"].append(r)
                continue
            if ceiling:
                r["share_of_ceiling"] = r["tflops"] / ceiling
            anchor = ANCHORS.get(px)
            if anchor and not args.tiny:
                r["tflops_vs_anchor"] = r["tflops"] / anchor["tflops"]
                r["speed_vs_anchor"] = anchor["ms"] / r["ms_per_step"]
                r["anchor_flops_per_step"] = anchor["ms"] * 1e-3 * anchor["tflops"] * 1e12
                r["flops_vs_anchor_count"] = r["flops_per_step"] / r["anchor_flops_per_step"]
                if r["peak_gib"] is not None:
                    r["peak_vs_anchor"] = r["peak_gib"] / anchor["peak_gib"]
                    fits = r["peak_gib"] <= anchor["peak_gib"]
                    r["meets_target"] = bool(r["tflops_vs_anchor"] >= TARGET_TFLOPS_RATIO[px] and fits)
                    # the same target on time alone (independent of how FLOPs are counted)
                    r["meets_target_by_time"] = bool(r["speed_vs_anchor"] >= TARGET_TFLOPS_RATIO[px] and fits)
            log(f"{r['variant']} @ {px}: {r['ms_per_step']:.1f} ms/step, {r['tflops']:.1f} TFLOP/s, peak "
                f"{r['peak_gib']} GiB, compile {r['compile_s']} s, nonfinite {r['nonfinite_skipped']}")
            report["results"].append(r)
        free_memory(device)
        if device.type == "cuda":  # a leak between variants would inflate every later peak: recorded
            report.setdefault("allocated_after_cleanup_gib", []).append(
                {"after": f"{name}@{px}", "gib": round(torch.cuda.memory_allocated() / 2**30, 3)})
        write_json(path, report)
    print_scale_table(report)


def print_scale_table(report: dict) -> None:
    meta, ceiling = report["meta"], (report["ceiling"] or {}).get("tflops")
    print(f"\nFlow-DPO LoRA step at scale, {meta['device']}, {meta['pairs_per_step']} pairs, bf16; ceiling "
          f"{ceiling or float('nan'):.3g} TFLOP/s (bf16 matmul)" + (" [tiny config]" if meta["tiny"] else ""))
    print(f"{'variant':18s}{'px':>6s}{'ms/step':>10s}{'TFLOP/s':>10s}{'%ceil':>7s}{'xTFLOP/s':>10s}{'xspeed':>8s}"
          f"{'peak GiB':>10s}{'anchor':>16s}{'compile s':>11s}  target (TFLOP/s | time)")
    flops = {}
    for r in report["results"]:
        if "error" in r:
            print(f"{r['variant']:18s}{r['px']:>6d}  {r['error_kind']}: {r['error'][:80]}")
            continue
        flops.setdefault(r["px"], (r["flops_per_step"], r.get("anchor_flops_per_step")))
        a = ANCHORS.get(r["px"]) if not meta["tiny"] else None
        anchor = f"{a['ms']:.0f}ms/{a['peak_gib']}G" if a else "-"
        share = f"{100 * r['share_of_ceiling']:.0f}" if r.get("share_of_ceiling") else "-"
        ratio = f"{r['tflops_vs_anchor']:.2f}x" if r.get("tflops_vs_anchor") else "-"
        speed = f"{r['speed_vs_anchor']:.2f}x" if r.get("speed_vs_anchor") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        comp = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else "-"
        target = (f"{'met' if r['meets_target'] else 'no'} | {'met' if r['meets_target_by_time'] else 'no'}"
                  if "meets_target" in r else "-")
        tf = f"{r['tflops']:.1f}" if r["tflops"] >= 1 else f"{r['tflops']:.4f}"
        print(f"{r['variant']:18s}{r['px']:>6d}{r['ms_per_step']:>10.1f}{tf:>10s}{share:>7s}{ratio:>10s}{speed:>8s}"
              f"{peak:>10s}{anchor:>16s}{comp:>11s}  {target}")
    for px, (ours, theirs) in sorted(flops.items()):
        implied = f"; the anchor's ms x TFLOP/s imply {theirs / 1e12:.1f} TFLOP" if theirs else ""
        print(f"FLOPs per step at {px} px (FlopCounterMode): {ours / 1e12:.4g} TFLOP{implied}")
    if not meta["tiny"]:
        print(f"targets: TFLOP/s >= {TARGET_TFLOPS_RATIO[512]}x the anchor at 512 px, >= {TARGET_TFLOPS_RATIO[1024]}x at "
              "1024 px, peak memory no higher than the anchor's (anchor = GPU.md's plain eager loop, H100); "
              "'time': the same ratios on ms/step")


# ------------------------------------------------------------------------------------------- at SD3.5-medium size, counted
# The other components of SD3.5-medium (published configs): T5-XXL encoder, CLIP-L and OpenCLIP bigG text towers,
# the 16-channel VAE. Text: 77 CLIP tokens, 256 T5 tokens (the pipeline's default).
T5_XXL = {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 24,
          "feed_forward_proj": "gated-gelu", "vocab_size": 32128}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "projection_dim": 1280, "hidden_act": "gelu"}
SD3_VAE = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 16,
           "use_quant_conv": False, "use_post_quant_conv": False}


def count_at_real_size(pairs: int = 2, resolutions=(512, 1024)) -> dict:
    """The arithmetic (FlopCounterMode) and resident weights of one step of each way at SD3.5-medium's real
    proportions, on the meta device (shapes only: seconds, no memory). genalign: policy forward + backward
    (frozen base, LoRA rank 16) and the reference forward on the cached latents and embeddings; the peer adds the
    VAE encoding of both images and the three text encoders on the prompts, every step. On hardware where the step
    is compute-bound, the ratio of the two counts bounds the speed-up any implementation of the same loss gets
    from the cache and the shared reference; the weights each must keep resident bound the memory ratio."""
    from rlg_step import SD35_MEDIUM

    return count_two_ways(SD35_MEDIUM, T5_XXL, 256, (CLIP_L, CLIP_BIGG), 77, SD3_VAE, pairs, resolutions)


def count_two_ways(transformer_cfg: dict, t5_cfg: dict, t5_tokens: int, clip_cfgs, clip_tokens: int, vae_cfg: dict,
                   pairs: int, resolutions) -> dict:
    """`count_at_real_size` for any SD3 pipeline's component configs (the CPU's proportioned one too)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def tflop(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    def billions(module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e9

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**transformer_cfg).requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        encoders = [(T5EncoderModel(T5Config(**t5_cfg)), t5_tokens),
                    *[(CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), clip_tokens) for cfg in clip_cfgs]]
        vae = AutoencoderKL(**vae_cfg)
    n = 2 * pairs  # winners and losers
    text_tokens, latent_channels = clip_tokens + t5_tokens, transformer_cfg["in_channels"]
    text_inputs = {"encoder_hidden_states": torch.zeros(n, text_tokens, transformer_cfg["joint_attention_dim"], device="meta"),
                   "pooled_projections": torch.zeros(n, transformer_cfg["pooled_projection_dim"], device="meta"),
                   "timestep": torch.ones(n, device="meta")}

    def denoise(latents):
        return transformer(hidden_states=latents, **text_inputs).sample

    def encode_text():
        with torch.no_grad():
            for model, tokens in encoders:
                model(input_ids=torch.zeros(pairs, tokens, dtype=torch.long, device="meta"))

    weights = {"transformer": billions(transformer), "vae": billions(vae),
               "text_encoders": sum(billions(m) for m, _ in encoders)}
    out = {"pairs": pairs, "params_billion": weights, "resolutions": {}}
    for px in resolutions:
        latents = torch.zeros(n, latent_channels, px // 8, px // 8, device="meta")

        def policy_step(latents=latents):
            denoise(latents).sum().backward()

        def reference(latents=latents):
            with torch.no_grad():
                denoise(latents)

        def encode_images(px=px):
            with torch.no_grad():
                vae.encode(torch.zeros(n, 3, px, px, device="meta"))

        parts = {"policy_forward_backward": tflop(policy_step), "reference_forward": tflop(reference),
                 "vae_encode": tflop(encode_images), "text_encoders": tflop(encode_text)}
        genalign = parts["policy_forward_backward"] + parts["reference_forward"]
        peer = genalign + parts["vae_encode"] + parts["text_encoders"]
        out["resolutions"][px] = {"tflop": parts, "genalign_tflop": genalign, "peer_tflop": peer,
                                  "arithmetic_ratio": peer / genalign}
    # genalign on a cache keeps the transformer (+ LoRA) and the VAE; the peer a second transformer and the encoders
    genalign_weights = weights["transformer"] + weights["vae"]
    peer_weights = 2 * weights["transformer"] + weights["vae"] + weights["text_encoders"]
    out["resident_weights_gib_bf16"] = {"genalign": genalign_weights * 2e9 / 2**30, "peer": peer_weights * 2e9 / 2**30}
    out["resident_weights_ratio"] = genalign_weights / peer_weights
    return out


def print_real_size_count(count: dict) -> None:
    w = count["params_billion"]
    print(f"\nAt SD3.5-medium size (counted on the meta device, {count['pairs']} pairs): transformer {w['transformer']:.2f} B, "
          f"text encoders {w['text_encoders']:.2f} B, VAE {w['vae']:.3f} B parameters")
    print(f"{'px':>6s}{'policy f+b':>12s}{'reference':>11s}{'VAE enc':>9s}{'text enc':>10s}{'genalign':>10s}"
          f"{'peer':>8s}{'peer/genalign':>15s}   (TFLOP per step)")
    for px, r in count["resolutions"].items():
        t = r["tflop"]
        print(f"{px:>6d}{t['policy_forward_backward']:>12.2f}{t['reference_forward']:>11.2f}{t['vae_encode']:>9.2f}"
              f"{t['text_encoders']:>10.2f}{r['genalign_tflop']:>10.2f}{r['peer_tflop']:>8.2f}{r['arithmetic_ratio']:>14.2f}x")
    m = count["resident_weights_gib_bf16"]
    print(f"resident weights in bf16: genalign {m['genalign']:.1f} GiB, peer {m['peer']:.1f} GiB "
          f"({count['resident_weights_ratio']:.2f}x); a compute-bound step cannot beat the arithmetic ratio")


# ------------------------------------------------------------------------------------------- driver
def child(args) -> None:
    spec = CPU_MODELS[args.model]
    common = (args.model_dir, spec["px"], spec["max_sequence_length"], args.pairs, args.steps, args.warmup, args.threads)
    if args.variant == "peer":
        result = run_peer(*common)
    else:
        result = run_genalign(*common, **GENALIGN_CPU_VARIANTS[args.variant])
    print("RESULT " + json.dumps(result))


def measure(variant: str, model_dir: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--model", args.model, "--model-dir", model_dir,
           "--pairs", str(args.pairs), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def peak_ratio(result: dict, peer: dict, key: str) -> float | None:
    return result[key] / peer[key] if result.get(key) and peer.get(key) else None


def cpu_main(args) -> None:
    """Both ways on the CPU, each variant in its own process, on one model; a table with the ratios."""
    # the eager step always runs: the arithmetic bound and the README's rows are stated against it
    names = ["peer", "genalign", *(v for v in (args.variants or GENALIGN_CPU_VARIANTS) if v != "genalign")]
    unknown = set(names) - {"peer", *GENALIGN_CPU_VARIANTS}
    if unknown:
        raise SystemExit(f"--variants: unknown CPU variant(s) {sorted(unknown)}; choose from {list(GENALIGN_CPU_VARIANTS)}")
    workdir = tempfile.mkdtemp(prefix="flow-dpo-bench-")
    try:
        model_dir = model_folder(args.model, workdir)
        # Rounds of every variant in turn: on a CPU shared with other work the load drifts, and a ratio of two
        # runs minutes apart carries that drift; the median of the per-round ratios does much less.
        rounds = [{v: measure(v, model_dir, args) for v in names} for _ in range(args.rounds)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    round_speedups = {v: [r["peer"]["step_s"] / r[v]["step_s"] for r in rounds] for v in names[1:]}
    # memory is the same in every round (the first round's); step times: the rounds' medians
    results = {v: {**rounds[0][v], "step_s": statistics.median(r[v]["step_s"] for r in rounds),
                   "step_s_per_round": [r[v]["step_s"] for r in rounds]} for v in names}
    p = results["peer"]
    summary = {
        "device": "cpu", "model": args.model, "px": CPU_MODELS[args.model]["px"], "threads": args.threads,
        "pairs_per_step": args.pairs, "steps_timed": args.steps - args.warmup, "results": results,
        # per genalign variant: peer's step time / its step time (the median over rounds of each round's ratio),
        # its peak memory / peer's
        "rounds": args.rounds, "speedup_per_round": round_speedups,
        "speedup": {v: statistics.median(round_speedups[v]) for v in names[1:]},
        "memory_ratio": {v: results[v]["peak_mb"] / p["peak_mb"] for v in names[1:]},
        # the same on live memory (malloc's bytes in use, without what glibc keeps after frees; None off glibc):
        # over the timed steps, as the GPU figures' max_memory_allocated, and over the whole run (compilation too)
        "live_memory_ratio": {v: peak_ratio(results[v], p, "live_peak_mb") for v in names[1:]},
        "live_memory_ratio_run": {v: peak_ratio(results[v], p, "live_peak_run_mb") for v in names[1:]},
        # tensor memory (resident tensors + the rise of one step's tensors): what max_memory_allocated counts
        "tensor_memory_ratio": {v: peak_ratio(results[v], p, "tensor_peak_mb") for v in names[1:]},
        # On a compute-bound CPU an eager step cannot get faster than its share of the arithmetic: this is the
        # bound on the eager `speedup` that batching and the cache alone can reach.
        "arithmetic_ratio": p["gflop_per_step"] / results["genalign"]["gflop_per_step"],
    }
    from gpu_common import output_path, write_json

    write_json(output_path(args.out, f"flow_dpo_step_cpu_{args.model}.json"), summary)
    print(f"\nFlow-DPO step on the CPU, model {args.model} at {summary['px']} px, {args.pairs} pairs, {args.threads} "
          "thread(s); memory above the process before the model was loaded: peak RSS during training, peak live "
          "heap (malloc's bytes in use) over the timed steps and over the whole run (a compiled variant's first "
          "step holds the compiler's working memory), tensor memory (the tensors kept between steps plus the "
          "highest rise of one step's: the GPU figures' max_memory_allocated)")
    print(f"{'variant':26s} {'s/step':>7s} {'pairs/s':>7s} {'RSS MB':>7s} {'live MB':>7s} {'run MB':>7s} "
          f"{'tensor':>7s} {'GFLOP':>7s} {'speedup':>7s} {'RSS':>6s} {'live':>6s} {'run':>6s} {'tensor':>6s}")

    def fmt(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))

    for name in names:
        r = results[name]
        ratios = "" if name == "peer" else (f"{summary['speedup'][name]:6.2f}x {summary['memory_ratio'][name]:5.2f}x "
                                            f"{fmt(summary['live_memory_ratio'][name], '5.2f')}x "
                                            f"{fmt(summary['live_memory_ratio_run'][name], '5.2f')}x "
                                            f"{summary['tensor_memory_ratio'][name]:5.2f}x")
        print(f"{name:26s} {r['step_s']:7.3f} {args.pairs / r['step_s']:7.1f} {r['peak_mb']:7.0f} "
              f"{fmt(r.get('live_peak_mb'), '7.0f')} {fmt(r.get('live_peak_run_mb'), '7.0f')} "
              f"{r['tensor_peak_mb']:7.0f} {r['gflop_per_step']:7.2f} {ratios}")
    if args.rounds > 1:
        print(f"speedup per round ({args.rounds} rounds, the table shows their median and the median step times): "
              + "; ".join(f"{v} " + " ".join(f"{x:.2f}x" for x in round_speedups[v]) for v in names[1:]))
    print(f"targets: speedup >= 1.5x, memory <= 0.7x the peer's; the peer does {summary['arithmetic_ratio']:.2f}x "
          "genalign's arithmetic (at SD3.5-medium's real size: 1.31x at 512 px, 1.16x at 1024; --count-real-size)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=None, help="pairs per step (default 8 on the CPU, 2 at scale)")
    parser.add_argument("--steps", type=int, default=None, help="steps (CPU: 25 in all; at scale: timed steps)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (CPU: 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="CPU: run every variant this many times in turn and "
                                                             "report the median speedup (for a busy machine)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="a folder, or a .json file (at scale)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="cuda: the SD3.5-medium-sized transformer (GPU.md), bf16, at 512 and 1024 px")
    parser.add_argument("--gpu", action="store_true", help="same as --device cuda")
    parser.add_argument("--tiny", action="store_true", help="the at-scale code path with a tiny config (CPU check)")
    parser.add_argument("--quick", action="store_true", help="at scale: fewer steps and variants (a few minutes)")
    parser.add_argument("--px", type=int, nargs="*", help="at scale: resolutions (default 512 1024; tiny 64 128)")
    parser.add_argument("--variants", nargs="*", help=f"at scale: any of {', '.join(VARIANTS)}; CPU: any of "
                                                      f"{', '.join(GENALIGN_CPU_VARIANTS)} (the peer always runs)")
    parser.add_argument("--text-tokens", type=int, default=None, help="at scale: text tokens (default 333)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count-real-size", action="store_true",
                        help="only count both ways' arithmetic and weights at SD3.5-medium size (meta device, ~20 s)")
    parser.add_argument("--model", choices=tuple(CPU_MODELS), default="world",
                        help="CPU: the world's image model, or a random-init SD3 with SD3.5-medium's proportions")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from gpu_common import offline_env

    offline_env()
    if args.gpu:
        args.device = "cuda"
    if args.count_real_size:
        from gpu_common import output_path, write_json

        count = count_at_real_size()
        write_json(output_path(args.out, "flow_dpo_step_real_size_count.json"), count)
        return print_real_size_count(count)
    if args.device == "cuda" or args.tiny:
        args.device = args.device or "cpu"
        return scale_main(args)
    args.pairs = args.pairs or 8
    args.steps = args.steps or 25
    args.warmup = 5 if args.warmup is None else args.warmup
    if args.child:
        return child(args)
    return cpu_main(args)


if __name__ == "__main__":
    main()
