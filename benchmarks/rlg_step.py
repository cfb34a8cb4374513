"""Time per denoising step: stock CFG vs genalign CFG vs RLG (public method and genalign) vs NRG, side by side.

Variants, all on the same SD3 transformer with one trained-looking LoRA ("dpo", random B), one prompt (CFG batch 2):

    a_stock_cfg         stock diffusers StableDiffusion3Pipeline step (LoRA active): the baseline
    b_genalign_cfg      genalign's sampler step: cfg_velocity over SD3Adapter.velocity + scheduler step
    c_public_rlg        the public RLG method: two sequential CFG-batched calls per step, LoRA toggled with
                        disable_adapters()/enable_adapters(), then v_base + w (v_ft - v_base)
    d_genalign_rlg      RLGStableDiffusion3Pipeline(rlg_scale=w, rlg_mixed_batch=True): base + fine-tuned in ONE
                        mixed-adapter batch (base layer once for all rows, the LoRA delta added to its own rows)
    d3_rlg_peft_mixed   the same mixed batch through peft's `adapter_names` in every LoRA layer (what genalign
                        did before: per-layer gather / scatter of each adapter's rows)
    d2_genalign_rlg_seq the same with rlg_mixed_batch=False (sequential passes; the public method's arithmetic).
                        The default "auto" picks d or d2 by latent size on CUDA (genalign.guidance.denoiser).
    e_nrg               RLGStableDiffusion3Pipeline with Flow-NRG: a latent reward whose trunk is the first k blocks
                        of the transformer; its gradient w.r.t. x_t every step
    e2_rlg_nrg          RLG (mixed) and NRG together

Per-step times are the medians of the intervals between consecutive steps (pipeline callbacks / loop iterations),
first step of each run dropped, variants interleaved over several rounds so background load hits all of them.
Checks before timing: one step of c and d give the same velocity. Printed last: a table with ratios to a.

    python benchmarks/rlg_step.py                     # CPU, a small SD3 config (random weights)
    python benchmarks/rlg_step.py --gpu               # SD3.5-medium-sized MMDiT (GPU.md), bf16, 512 and 1024 px
    python benchmarks/rlg_step.py --smoke             # the --gpu path's block types and bf16, tiny, on the CPU
JSON goes to $OUT/rlg_step.json or --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SMALL = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 6, "attention_head_dim": 32,
         "num_attention_heads": 4, "joint_attention_dim": 128, "caption_projection_dim": 128,
         "pooled_projection_dim": 64, "out_channels": 16, "pos_embed_max_size": 64}
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
               "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
               "dual_attention_layers": tuple(range(13))}  # GPU.md
# --smoke: SD3.5-medium's block types (dual attention in the first half, qk rms-norm) at a few layers and small
# widths, in bf16 on the CPU: the --gpu path's code, checked where no GPU is (not a timing)
SD35_SHAPED_TINY = {**SMALL, "num_layers": 4, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(cfg: dict, device, dtype, text_tokens: int, vae_factor: int, lora_rank: int, seed: int = 0):
    """An RLGStableDiffusion3Pipeline without text encoders (embeddings are passed in), a tiny VAE only for its
    scale factor (outputs stay latents), and a LoRA with random B."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from genalign.pipelines import RLGStableDiffusion3Pipeline

    from genalign.models import LoraSpec, SD3Adapter

    torch.manual_seed(seed)
    with torch.device(device):  # random init directly on the device (a 2.2 B model inits slowly on the CPU)
        transformer = SD3Transformer2DModel(**cfg).to(dtype).eval()
    blocks = {2: ("DownEncoderBlock2D",) * 2, 8: ("DownEncoderBlock2D",) * 4}[vae_factor]
    vae = AutoencoderKL(down_block_types=blocks, up_block_types=("UpDecoderBlock2D",) * len(blocks),
                        block_out_channels=(8,) * len(blocks), latent_channels=cfg["in_channels"], norm_num_groups=4,
                        layers_per_block=1).to(device, dtype).eval()
    pipe = RLGStableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                       vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                       tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    adapter = SD3Adapter(pipe)
    adapter.add_lora(LoraSpec(rank=lora_rank, adapter_name="dpo"))
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in transformer.named_parameters():
        if "lora_B" in n:
            p.data.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    transformer.eval()
    g = torch.Generator().manual_seed(seed + 2)
    def emb(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(device, dtype)

    embeds = {"prompt_embeds": emb(1, text_tokens, cfg["joint_attention_dim"]),
              "pooled_prompt_embeds": emb(1, cfg["pooled_projection_dim"]),
              "negative_prompt_embeds": emb(1, text_tokens, cfg["joint_attention_dim"]),
              "negative_pooled_prompt_embeds": emb(1, cfg["pooled_projection_dim"])}
    return pipe, adapter, embeds


# ------------------------------------------------------------------------------------------- the variants
class StepTimer:
    def __init__(self, device):
        self.device, self.marks = device, []

    def mark(self):
        sync(self.device)
        self.marks.append(time.perf_counter())

    def callback(self, pipe, i, t, kw):
        self.mark()
        return {}

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.marks[1:], self.marks[2:])]  # drop the first step


def time_pipeline(pipe, embeds, px: int, steps: int, device, guidance: float, **guidance_kw) -> list[float]:
    timer = StepTimer(device)
    timer.mark()
    pipe(height=px, width=px, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=timer.callback, **embeds, **guidance_kw)
    return timer.intervals()


def loop_setup(pipe, adapter, embeds, px: int, steps: int, device, dtype):
    from genalign.models import FlowAdapter

    cond = {"prompt_embeds": embeds["prompt_embeds"], "pooled_prompt_embeds": embeds["pooled_prompt_embeds"]}
    uncond = {"prompt_embeds": embeds["negative_prompt_embeds"],
              "pooled_prompt_embeds": embeds["negative_pooled_prompt_embeds"]}
    both = FlowAdapter.cat_cond([uncond, cond])
    x = torch.randn((1, *adapter.latent_shape(px, px)), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    sched = adapter.sampling_scheduler()
    adapter.set_schedule(sched, steps, x)
    return cond, uncond, both, x, sched


@torch.no_grad()
def time_genalign_cfg(pipe, adapter, embeds, px, steps, device, dtype, guidance) -> list[float]:
    from genalign.sampling import cfg_velocity

    cond, uncond, _, x, sched = loop_setup(pipe, adapter, embeds, px, steps, device, dtype)
    timer = StepTimer(device)
    timer.mark()
    for ts in sched.timesteps:
        t = (ts / sched.config.num_train_timesteps).to(device, dtype).expand(1)
        x = sched.step(cfg_velocity(adapter, x, t, cond, uncond, guidance), ts, x, return_dict=False)[0]
        timer.mark()
    return timer.intervals()


def public_rlg_velocity(transformer, x, ts, both, guidance: float, w: float):
    """The public RLG step: CFG on the base (LoRA off), CFG on the fine-tuned (LoRA on), then combine."""
    def cfg_call():
        out = transformer(hidden_states=torch.cat([x, x]), timestep=ts.expand(2), return_dict=False,
                          encoder_hidden_states=both["prompt_embeds"],
                          pooled_projections=both["pooled_prompt_embeds"])[0]
        u, c = out.chunk(2)
        return u + guidance * (c - u)

    transformer.disable_adapters()
    try:
        v_base = cfg_call()
    finally:
        transformer.enable_adapters()
    v_ft = cfg_call()
    return v_base + w * (v_ft - v_base)


@torch.no_grad()
def time_public_rlg(pipe, adapter, embeds, px, steps, device, dtype, guidance, w) -> list[float]:
    _, _, both, x, sched = loop_setup(pipe, adapter, embeds, px, steps, device, dtype)
    timer = StepTimer(device)
    timer.mark()
    for ts in sched.timesteps:
        v = public_rlg_velocity(pipe.transformer, x, ts.to(device, dtype), both, guidance, w)
        x = sched.step(v, ts, x, return_dict=False)[0]
        timer.mark()
    return timer.intervals()


@torch.no_grad()
def check_rlg_agrees(pipe, adapter, embeds, px, device, dtype, guidance, w) -> float:
    """One step's combined velocity: the public method vs genalign's mixed batch (relative max difference)."""
    _, _, both, x, sched = loop_setup(pipe, adapter, embeds, px, 4, device, dtype)
    ts = sched.timesteps[1].to(device, dtype)
    want = public_rlg_velocity(pipe.transformer, x, ts, both, guidance, w)
    # the pipelines' per-call wrapper on the same CFG call (RLG commutes with CFG)
    from genalign.guidance import GuidedDenoiser, RLGPlan, denoiser_spec

    plan = RLGPlan.build([pipe.transformer], scale=w, mixed_batch=True)
    guided = GuidedDenoiser([pipe.transformer], denoiser_spec(adapter), rlg=plan)
    with guided.installed():
        out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=ts.expand(2), return_dict=False,
                               encoder_hidden_states=both["prompt_embeds"],
                               pooled_projections=both["pooled_prompt_embeds"])[0]
    u, c = out.chunk(2)
    got = u + guidance * (c - u)
    assert plan.mixed and guided.stats["forwards"] == 1, guided.stats
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


def make_reward(pipe, adapter, px, blocks: int):
    from genalign.guidance import LatentRewardModel, latent_space_id

    reward = LatentRewardModel.from_transformer(pipe.transformer, blocks, latent_space=latent_space_id(adapter),
                                                latent_shape=adapter.latent_shape(px, px), hidden=64)
    return reward.to(pipe.transformer.device).eval()


# ------------------------------------------------------------------------------------------- one resolution
def bench(built, device, dtype, px: int, steps: int, rounds: int, guidance: float, w: float,
          reward_blocks: int) -> dict:
    pipe, adapter, embeds, stock = built
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reward = make_reward(pipe, adapter, px, reward_blocks)
    rel = check_rlg_agrees(pipe, adapter, embeds, px, device, dtype, guidance, w)
    variants = {
        "a_stock_cfg": lambda: time_pipeline(stock, embeds, px, steps, device, guidance),
        "b_genalign_cfg": lambda: time_genalign_cfg(pipe, adapter, embeds, px, steps, device, dtype, guidance),
        "c_public_rlg": lambda: time_public_rlg(pipe, adapter, embeds, px, steps, device, dtype, guidance, w),
        "d_genalign_rlg": lambda: time_pipeline(pipe, embeds, px, steps, device, guidance, rlg_scale=w,
                                                rlg_mixed_batch=True),
        "d2_genalign_rlg_seq": lambda: time_pipeline(pipe, embeds, px, steps, device, guidance, rlg_scale=w,
                                                     rlg_mixed_batch=False),
        "d3_rlg_peft_mixed": lambda: time_peft_mixed(pipe, embeds, px, steps, device, guidance, w),
        "e_nrg": lambda: time_pipeline(pipe, embeds, px, steps, device, guidance, nrg_reward_model=reward,
                                       nrg_weights={"VQ": 0.5, "MQ": 0.5, "TA": 0.0}, nrg_scale=1.0),
        "e2_rlg_nrg": lambda: time_pipeline(pipe, embeds, px, steps, device, guidance, rlg_scale=w,
                                            rlg_mixed_batch=True, nrg_reward_model=reward, nrg_scale=1.0),
    }
    for fn in variants.values():  # warm-up (kernels, allocator)
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            samples[k] += fn()
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["a_stock_cfg"]
    result = {
        "px": px, "latent": list(adapter.latent_shape(px, px)), "steps_timed": {k: len(v) for k, v in samples.items()},
        "step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "ratio_to_stock_cfg": {k: round(v / base, 3) for k, v in med.items()},
        "check_public_vs_mixed_rel_maxdiff": rel,
        "reward_trunk_blocks": reward_blocks,
    }
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def time_peft_mixed(pipe, embeds, px, steps, device, guidance, w) -> list[float]:
    """d_genalign_rlg with peft's adapter_names path in every LoRA layer instead of the row slices."""
    import functools

    from genalign.guidance import denoiser
    from genalign.guidance.lora import MixedBatchHooks

    denoiser.MixedBatchHooks = functools.partial(MixedBatchHooks, row_slices=False)
    try:
        return time_pipeline(pipe, embeds, px, steps, device, guidance, rlg_scale=w, rlg_mixed_batch=True)
    finally:
        denoiser.MixedBatchHooks = MixedBatchHooks


def check_offload() -> dict:
    """enable_model_cpu_offload keeps working with RLG and NRG (accelerate's hooks wrap the denoiser; genalign's
    per-call wrapper goes on top): offloaded output == on-device output, tiny SD3 pipeline, CUDA only."""
    from genalign.pipelines import RLGStableDiffusion3Pipeline

    from genalign.guidance import LatentRewardConfig, LatentRewardModel, latent_space_id
    from genalign.models import LoraSpec, SD3Adapter, tiny

    def make():
        pipe = RLGStableDiffusion3Pipeline.from_pipe(tiny.tiny_sd3_pipeline())
        pipe.set_progress_bar_config(disable=True)
        ad = SD3Adapter(pipe, max_sequence_length=16)
        ad.add_lora(LoraSpec(rank=4, adapter_name="dpo"))
        g = torch.Generator().manual_seed(1)
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.3, generator=g)
        torch.manual_seed(3)
        reward = LatentRewardModel(LatentRewardConfig(latent_space=latent_space_id(ad), latent_shape=(4, 16, 16),
                                                      hidden=16, depth=2, cond_dim=64)).eval()
        return pipe, reward

    kw = {"prompt": ["red circle", "two blue squares"], "height": 32, "width": 32, "num_inference_steps": 3,
          "guidance_scale": 2.5, "max_sequence_length": 16, "output_type": "latent", "rlg_scale": 1.6,
          "nrg_scale": 2.0}
    pipe, reward = make()
    pipe.to("cuda")
    ref = pipe(generator=torch.Generator().manual_seed(0), nrg_reward_model=reward.cuda(), **kw).images
    pipe2, reward2 = make()
    pipe2.enable_model_cpu_offload()
    off = pipe2(generator=torch.Generator().manual_seed(0), nrg_reward_model=reward2.cuda(), **kw).images
    stats = pipe2.last_guidance_stats
    diff = float((ref.float().cpu() - off.float().cpu()).abs().max())
    return {"offload_vs_device_maxdiff": diff, "offload_stats": stats, "ok": diff < 1e-3 and stats["mixed_batch"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="SD3.5-medium-sized transformer, bf16, 512 and 1024 px")
    ap.add_argument("--smoke", action="store_true", help="CPU: the --gpu path's block types in bf16 at a tiny size "
                                                         "(a check of the code path, not a timing)")
    ap.add_argument("--px", type=int, nargs="*", help="resolutions (default: 64 on CPU, 512 1024 with --gpu)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--w", type=float, default=1.6, help="RLG weight (public default 1.6)")
    ap.add_argument("--reward-blocks", type=int, default=None, help="transformer blocks in the NRG reward trunk")
    ap.add_argument("--check-offload", action="store_true", help="(CUDA) RLG + NRG under enable_model_cpu_offload")
    ap.add_argument("--out", default=None, help="JSON file (default $OUT/rlg_step.json when $OUT is set)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA")
        device, dtype, cfg = torch.device("cuda"), torch.bfloat16, SD35_MEDIUM
        pxs, steps, rounds, tokens, vae_factor = args.px or [512, 1024], args.steps or 10, args.rounds or 3, 333, 8
        blocks = args.reward_blocks or 4
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        device, dtype, cfg = torch.device("cpu"), torch.float32, SMALL
        if args.smoke:
            dtype, cfg = torch.bfloat16, SD35_SHAPED_TINY
        pxs, steps, rounds, tokens, vae_factor = args.px or [64], args.steps or 6, args.rounds or 3, 32, 2
        blocks = args.reward_blocks or 2
    from diffusers import StableDiffusion3Pipeline

    t0 = time.perf_counter()
    pipe, adapter, embeds = build(cfg, device, dtype, tokens, vae_factor, lora_rank=16 if args.gpu else 8)
    # from_pipe casts the SHARED components to float32 unless given the dtype (diffusers behaviour)
    stock = StableDiffusion3Pipeline.from_pipe(pipe, torch_dtype=dtype)
    stock.set_progress_bar_config(disable=True)
    assert all(p.dtype == dtype for n, p in pipe.transformer.named_parameters() if "lora_" not in n)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"built {n_params / 1e9:.3f} B params in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    for px in pxs:
        r = bench((pipe, adapter, embeds, stock), device, dtype, px, steps, rounds, args.guidance, args.w, blocks)
        results.append(r)
        print(json.dumps(r), flush=True)
    extra = {}
    if args.check_offload:
        try:
            extra = check_offload()
        except Exception as e:  # noqa: BLE001 - reported in the JSON; the timings stand on their own
            extra = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print("offload check:", json.dumps(extra), flush=True)
    meta = {"device": torch.cuda.get_device_name() if args.gpu else "cpu", "threads": args.threads,
            "dtype": str(dtype), "torch": torch.__version__, "config": {k: list(v) if isinstance(v, tuple) else v
                                                                          for k, v in cfg.items()},
            "guidance": args.guidance, "w": args.w, "text_tokens": tokens, "transformer_params": n_params,
            "steps_per_run": steps, "rounds": rounds}
    out = args.out or (os.path.join(os.environ["OUT"], "rlg_step.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"meta": meta, "results": results, "checks": extra}, indent=2))
    names = list(results[0]["step_ms"])
    print(f"\nper denoising step, {meta['device']}, {meta['dtype']}, CFG {args.guidance}, RLG w {args.w} "
          "(median ms, ratio to the stock CFG step)")
    print(f"{'variant':22s}" + "".join(f"{str(r['px']) + ' px':>22s}" for r in results))
    for n in names:
        print(f"{n:22s}" + "".join(f"{r['step_ms'][n]:>12.2f} ({r['ratio_to_stock_cfg'][n]:>5.2f}x)  "
                                   for r in results))
    for r in results:
        print(f"check {r['px']} px: public RLG vs mixed batch, relative max diff {r['check_public_vs_mixed_rel_maxdiff']:.2e}")


if __name__ == "__main__":
    main()
