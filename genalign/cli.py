"""The `genalign` command. Every sub-command has --help; errors a user can fix are printed as one clear line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


# ------------------------------------------------------------------------------------------ helpers
def load_model(model: str | None, kind: str | None, loras=(), device: str | None = None):
    """Resolve --model (default: the world's base model of --kind), load its adapter and the LoRA folders.

    One LoRA is loaded as adapter "default", the active one that `--rlg-scale` mixes with the base; several get
    names from their folders (`lora_adapter_names`) for RLG's per-expert weights. Returns (adapter, sampling
    defaults, model path, adapter names). Shared by the commands and the demo (genalign.app)."""
    import warnings

    from .models import ModelLoadError, default_device, load_adapter
    from .world import resolve_model

    loras = [str(x) for x in loras]
    for lora in loras:
        if not Path(lora).exists():
            raise ModelLoadError(f"--lora {lora!r} does not exist")
    path, adapter_kwargs, defaults = resolve_model(model, kind)
    device = device or default_device()
    try:
        import torch

        torch.device(device)
    except RuntimeError as e:  # torch's message lists the device types; say which argument it was
        raise ModelLoadError(f"--device {device!r} is not a device: {e}") from e
    adapter = load_adapter(path, device=device, **adapter_kwargs)
    names = lora_adapter_names(loras)
    with warnings.catch_warnings():
        # Several adapters on one denoiser are intended (RLG experts); peft warns on every load after the first.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        for lora, name in zip(loras, names):
            adapter.load_lora(lora, adapter_name=name)
    return adapter, defaults, path, names


def lora_adapter_names(loras) -> list[str]:
    """"default" for one LoRA; for several, unique names from their folders (a trainer's `<run>/lora` -> run)."""
    import re

    if len(loras) <= 1:
        return ["default"] * len(loras)
    names: list[str] = []
    for lora in loras:
        p = Path(lora).resolve()
        stem = p.parent.name if p.name == "lora" else p.name
        name = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "lora"
        base, i = name, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def _load_model(args, model: str | None = None, kind: str | None = None):
    """load_model with the command's --model (or `model`), --kind (or `kind`), --lora and --device: (adapter,
    sampling defaults, model path)."""
    adapter, defaults, path, _ = load_model(model or args.model, kind or args.kind, [args.lora] if args.lora else [],
                                            device=args.device)
    return adapter, defaults, path


def _is_world_model(path: str) -> bool:
    from .world import ASSETS

    try:
        return Path(path).resolve().is_relative_to(ASSETS.resolve()) or (Path(path) / "genalign_sampling.json").is_file()
    except OSError:
        return False


def _sampling_kwargs(args, defaults: dict, adapter) -> dict:
    kw = {
        "num_steps": args.steps or defaults.get("num_steps", 28),
        "guidance_scale": args.cfg if args.cfg is not None else defaults.get("guidance_scale", 4.5),
        "height": args.height or defaults.get("height", 512),
        "width": args.width or defaults.get("width", 512),
    }
    if adapter.is_video:
        kw["num_frames"] = args.num_frames or defaults.get("num_frames", 17)
    return kw


def guidance_combiner(adapter, *, guidance_scale: float, rlg_scale: float | None = None,
                      rlg_experts: dict[str, float] | None = None, nrg_reward=None,
                      nrg_weights: dict[str, float] | None = None, nrg_scale: float = 1.0, nrg_prompts=None):
    """The sampling combiner (genalign.sampling) for RLG and Flow-NRG, or None for plain CFG.

    RLG: `rlg_scale` w mixes the base with the active LoRA (0 = base, 1 = LoRA), or `rlg_experts` gives one
    weight per loaded LoRA adapter. NRG: a loaded latent reward model with per-dimension weights and strength
    lambda = `nrg_scale`, applied on top of RLG (or CFG). Raises GuidanceError before any denoising."""
    from .guidance import nrg_combiner, rlg_combiner

    combiner = None
    if rlg_scale is not None or rlg_experts:
        combiner = rlg_combiner(adapter, guidance_scale=guidance_scale, scale=rlg_scale, experts=rlg_experts)
    if nrg_reward is not None:
        combiner = nrg_combiner(adapter, nrg_reward, guidance_scale=guidance_scale, weights=nrg_weights,
                                scale=nrg_scale, inner=combiner, prompts=nrg_prompts)
    return combiner


def _guidance(args, adapter, kw: dict) -> dict:
    """RLG (--rlg-scale, with a --lora) and Flow-NRG (--nrg-reward + --nrg-weights) as a sampling combiner."""
    rlg_scale = getattr(args, "rlg_scale", None)
    nrg_reward = getattr(args, "nrg_reward", None)
    if rlg_scale is None and nrg_reward is None:
        return {}
    from .guidance import GuidanceError

    if rlg_scale is not None and not args.lora:
        raise GuidanceError("--rlg-scale mixes the base model with a fine-tuned one: give the LoRA with --lora")
    reward = None
    if nrg_reward is not None:
        from .guidance.latent_reward import LatentRewardModel

        reward = LatentRewardModel.from_pretrained(nrg_reward, device=adapter.device)
    weights = json.loads(args.nrg_weights) if args.nrg_weights else None
    return {"combiner": guidance_combiner(adapter, guidance_scale=kw["guidance_scale"], rlg_scale=rlg_scale,
                                          nrg_reward=reward, nrg_weights=weights, nrg_scale=args.nrg_scale)}


def eval_prompts(source: str | None, adapter, n: int) -> list[str]:
    """--prompts of `eval` / `sweep`: None or 'heldout' = the world's fixed held-out set for the model's kind,
    otherwise a prompt file; at most n prompts."""
    if source in (None, "heldout"):
        from .world.grammar import heldout_eval_prompts

        return heldout_eval_prompts("video" if adapter.is_video else "image", n=n)
    from .data.prompts import read_prompts

    return read_prompts(source)[:n]


def _read_prompts(args, world: bool) -> list[str]:
    from .data.prompts import read_prompts
    from .world.grammar import parse_prompt

    prompts = list(args.prompt or [])
    if getattr(args, "prompts", None):
        prompts += read_prompts(args.prompts)
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts file")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise SystemExit(f"error: prompt {i + 1} is empty")
        if world:
            parse_prompt(p)  # raises PromptError naming the prompt and the language
    return prompts


# ------------------------------------------------------------------------------------------ commands
def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .media import image_grid, save_png, video_strip, write_video
    from .sampling import latents_to_uint8, sample_latents

    adapter, defaults, path = _load_model(args)
    prompts = _read_prompts(args, _is_world_model(path))
    kw = _sampling_kwargs(args, defaults, adapter)
    kw.update(_guidance(args, adapter, kw))
    init, strength = _init_latents(args, adapter, kw)
    flat = [p for p in prompts for _ in range(args.num_per_prompt)]
    out = Path(args.out)
    outs = []
    for start in range(0, len(flat), args.batch_size):
        g = torch.Generator().manual_seed(args.seed + start)
        chunk = flat[start : start + args.batch_size]
        if init is not None:  # SDEdit: every sample starts from the same picture, each with its own noise
            kw.update(init_latents=init.expand(len(chunk), *init.shape[1:]), strength=strength)
        lat = sample_latents(adapter, chunk, generator=g, progress=True, **kw)
        outs.append(latents_to_uint8(adapter, lat))
    samples = np.concatenate(outs)
    if adapter.is_video:
        out.mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(samples):
            write_video(out / f"{i:04d}.mp4", v, fps=args.fps)
        grid = image_grid([video_strip(v, 2) for v in samples], labels=flat, ncols=1, scale=1)
        save_png(out / "strips.png", grid)
        print(f"wrote {len(samples)} videos to {out}/ and a frame strip to {out / 'strips.png'}")
    else:
        grid = image_grid(list(samples), labels=flat, ncols=min(8, len(samples)))
        if out.suffix.lower() == ".png":
            save_png(out, grid)
            print(f"wrote a grid of {len(samples)} images to {out}")
        else:
            for i, im in enumerate(samples):
                save_png(out / f"{i:04d}.png", im)
            save_png(out / "grid.png", grid)
            print(f"wrote {len(samples)} images and grid.png to {out}/")
    return 0


def _init_latents(args, adapter, kw: dict):
    """`--init-image` / `--strength`: (the picture resized and centre-cropped to the sampling size, in the model's
    latents, the strength), or (None, None) without a picture."""
    if args.init_image is None:
        if args.strength is not None:
            raise SystemExit("error: --strength goes with --init-image (SDEdit / image-to-image)")
        return None, None
    import torch

    from .data.media import decode_image, to_pixels

    if adapter.is_video:
        raise SystemExit("error: --init-image is for image models")
    strength = 0.6 if args.strength is None else args.strength
    if not 0 < strength <= 1:
        raise SystemExit(f"error: --strength must be in (0, 1], got {strength}")
    try:
        image = decode_image(args.init_image)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --init-image {args.init_image}: cannot read it as an image ({e})") from e
    pixels = to_pixels(image, (kw["height"], kw["width"]))[None].to(adapter.device)
    with torch.no_grad():
        return adapter.encode_pixels(pixels), strength


def cmd_eval(args) -> int:
    from .eval.oracle_eval import generate, judge_samples, summarize, write_report

    adapter, defaults, path = _load_model(args)
    prompts = eval_prompts(args.prompts, adapter, args.num_prompts)
    kw = _sampling_kwargs(args, defaults, adapter)
    kw.update(_guidance(args, adapter, kw))
    t0 = time.time()
    samples, flat = generate(adapter, prompts, args.samples_per_prompt, seed=args.seed, **kw)
    summary = summarize(judge_samples(samples, flat), samples)
    settings = {k: v for k, v in kw.items() if k != "combiner"}
    settings.update(lora=args.lora, rlg_scale=args.rlg_scale, nrg_reward=args.nrg_reward, nrg_weights=args.nrg_weights)
    summary.update(model=path, sampling=settings, seed=args.seed, seconds=round(time.time() - t0, 1))
    paths = write_report(Path(args.out), summary, samples, flat, f"{Path(path).name}: oracle on held-out prompts")
    _print_summary(summary)
    print(f"report: {paths['json']}  {paths['grid']}  {paths['plot']}")
    return 0


def _print_summary(s: dict) -> None:
    print(f"{s['num_prompts']} prompts, {s['num_samples']} samples")
    for d in ("VQ", "MQ", "TA", "strict"):
        if d in s:
            print(f"  {d:7s} {s[d]['mean']:.3f}  [95% CI {s[d]['lo']:.3f}, {s[d]['hi']:.3f}]")
    for t, v in s["TA_by_template"].items():
        print(f"  TA/{t:9s} {v['mean']:.3f}  (n={v['n']})")
    for k, v in s.get("TA_parts", {}).items():
        if v["n"]:
            print(f"  {k:12s} {v['mean']:.3f}  (n={v['n']})")
    print(f"  diversity {s['diversity']:.4f}")


def cmd_world_build(args) -> int:
    from .config import load_config
    from .world import ASSETS
    from .world.build import STAGES, BuildConfig, build_world

    cfg = load_config(BuildConfig, args.config, args.overrides)
    which = (args.only,) if args.only else STAGES
    out = Path(args.out) if args.out else ASSETS
    t0 = time.time()
    report = build_world(out, cfg, which)
    print(json.dumps({k: v["stats"] for k, v in report.items() if k in which}, indent=2))
    print(f"built {', '.join(which)} in {time.time() - t0:.0f} s into {out}")
    return 0


def cmd_world_pairs(args) -> int:
    from .world.annotators import Annotator, make_preference_data, make_render_pairs
    from .world.grammar import pair_prompts, split_prompts

    annotator = Annotator(tie_margin=args.tie_margin, noise=args.noise, seed=args.seed)
    if args.source == "renders":
        kind = args.kind or "image"
        sdedit = {}
        if args.sdedit is not None:
            if kind != "image" or not 0 < args.sdedit <= 1:
                raise SystemExit("error: --sdedit STRENGTH (in (0, 1]) is for --kind image render pairs")
            adapter, defaults, _path = _load_model(args, model=args.model or "world", kind="image")
            kw = _sampling_kwargs(args, defaults, adapter)
            for size in ("height", "width"):  # the renders' size
                kw.pop(size)
            sdedit = {"sdedit_adapter": adapter, "sdedit_strength": args.sdedit, **kw}
        elif args.model or args.lora:
            raise SystemExit("error: --source renders draws the renderer, not a model: leave out --model / --lora "
                             "(or give --sdedit STRENGTH to pass the renders through the model)")
        # the swapped prompts come from the same split: held-out prompts stay unseen by a model trained on these
        out = make_render_pairs(kind, pair_prompts(kind, args.split, args.num_pairs, args.seed), args.out, annotator,
                                seed=args.seed, autoencoder=args.autoencoder, allowed=set(split_prompts(kind, args.split)),
                                **sdedit)
        print(f"wrote {args.num_pairs} labelled {kind} render pairs to {out}")
        return 0
    adapter, defaults, _path = _load_model(args)
    kind = "video" if adapter.is_video else "image"
    k = args.samples_per_prompt
    if k < 2:
        raise SystemExit(f"error: --samples-per-prompt must be at least 2 (a pair), got {k}")
    prompts = pair_prompts(kind, args.split, args.num_pairs, args.seed, samples_per_prompt=k)
    kw = _sampling_kwargs(args, defaults, adapter)
    kw.update(_guidance(args, adapter, kw))
    out = make_preference_data(adapter, kind, prompts, args.out, annotator, seed=args.seed, samples_per_prompt=k,
                               num_pairs=args.num_pairs, workers=args.workers, **kw)
    print(f"wrote {args.num_pairs} labelled {kind} pairs to {out}")
    return 0


TRAINERS = {"flow-dpo": "genalign.trainers.flow_dpo", "reward": "genalign.trainers.reward",
            "latent-reward": "genalign.trainers.latent_reward"}


def cmd_train(args) -> int:
    """Each trainer module owns its argument parser (config recipe + key=value overrides)."""
    import importlib

    return importlib.import_module(TRAINERS[args.algorithm]).main(args.trainer_args)


def cmd_quickstart(args) -> int:
    from .quickstart import main as quickstart_main

    args.kind = "video" if args.video else "image"
    return quickstart_main(args)


def cmd_demo(args) -> int:
    from .app.demo import run

    return run(args)


def cmd_cache(args) -> int:
    from .data.cache import cache_main

    cache_main(model=args.model, data=args.data, out=args.out, resolution=args.resolution,
               batch_size=args.batch_size, dtype=args.dtype)
    return 0


# ------------------------------------------------------------------------------------------ parser
def _add_sampling_flags(p, with_prompts: bool = True) -> None:
    p.add_argument("--model", default=None, help="pipeline folder or hub id (default: the world's base model)")
    p.add_argument("--kind", choices=["image", "video"], default=None, help="which world model when --model is unset")
    p.add_argument("--lora", default=None, help="a LoRA folder in diffusers format (e.g. a trainer's output_dir/lora)")
    if with_prompts:
        p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="video models only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where the model runs, e.g. cuda, cuda:1, cpu (default: the first "
                                                  "GPU torch sees, else the CPU)")
    p.add_argument("--rlg-scale", type=float, default=None,
                   help="RLG weight w in [0, 3] between the base model (0) and the --lora model (1); >1 extrapolates "
                        "(acts like the KL coefficient beta / w)")
    p.add_argument("--nrg-reward", default=None, help="Flow-NRG: a noise-aware latent reward model folder")
    p.add_argument("--nrg-weights", default=None, help='Flow-NRG per-dimension weights as JSON, e.g. \'{"VQ": 0.5, "TA": 1}\'')
    p.add_argument("--nrg-scale", type=float, default=1.0, help="Flow-NRG strength lambda")


def build_parser() -> argparse.ArgumentParser:
    from .quickstart import QuickstartConfig

    QUICKSTART_DEFAULTS = QuickstartConfig()
    parser = argparse.ArgumentParser(prog="genalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="prompts -> PNG grid (images) or MP4 files (videos)")
    _add_sampling_flags(p)
    p.add_argument("--prompts", help=".txt (one per line) or .jsonl file of prompts")
    p.add_argument("--num-per-prompt", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--init-image", default=None,
                   help="SDEdit / image-to-image: start every sample from this picture (resized to --height/--width)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --init-image: how much to change it, in (0, 1] (default 0.6; 1 ignores the picture)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--out", default="samples.png", help="a .png grid, or a folder")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="held-out prompts -> oracle VQ/MQ/TA with 95%% intervals, diversity, JSON + PNG")
    _add_sampling_flags(p, with_prompts=False)
    p.add_argument("--prompts", default="heldout", help="'heldout' (the world's split) or a prompts file")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--out", default="eval-report")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train with an algorithm: genalign train flow-dpo --config RECIPE [key=value]")
    p.add_argument("algorithm", choices=sorted(TRAINERS), help="the training algorithm")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER,
                   help="--config RECIPE, --resume latest, --help-config, key=value overrides (see --help)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score images/videos with a reward model (files or folders + prompts)")
    p.add_argument("score_args", nargs=argparse.REMAINDER, help="see `genalign score -h`")  # main() delegates

    p = sub.add_parser("eval-reward", help="reward-model accuracy with and without ties on held-out pairs")
    p.add_argument("eval_reward_args", nargs=argparse.REMAINDER, help="see `genalign eval-reward -h`")

    p = sub.add_parser("ensemble-reward", help="save reward models of the same dimensions as one ensemble folder "
                                               "(the weighted mean of their normalised scores)")
    p.add_argument("ensemble_args", nargs=argparse.REMAINDER, help="see `genalign ensemble-reward -h`")

    p = sub.add_parser("sweep", help="guidance strength sweeps: `sweep rlg` (RLG weight) or `sweep nrg` (Flow-NRG "
                                     "weights and strength) -> sweep.json, curve.png, strips.png")
    p.add_argument("sweep_args", nargs=argparse.REMAINDER, help="see `genalign sweep rlg -h` / `genalign sweep nrg -h`")

    p = sub.add_parser("quickstart", help="the main job on the built-in world: sample, label pairs, Flow-DPO, "
                                          "evaluate base vs aligned, write a report (about 8 min on 2 CPU "
                                          "cores; --video about 15)")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--video", action="store_true", help="run on the world's video model (VQ / MQ / TA)")
    p.add_argument("--steps", type=int, default=QUICKSTART_DEFAULTS.steps, help="Flow-DPO steps")
    p.add_argument("--num-pair-prompts", type=int, default=QUICKSTART_DEFAULTS.num_pair_prompts,
                   help="training prompts; each makes one labelled pair")
    p.add_argument("--pair-k", type=int, default=QUICKSTART_DEFAULTS.pair_k,
                   help="samples per prompt, best vs worst by the oracle is the pair (2: a random pair; "
                        "default 8 images / 4 clips)")
    p.add_argument("--beta", type=float, default=QUICKSTART_DEFAULTS.beta)
    p.add_argument("--beta-schedule", default="constant", choices=["constant", "one_minus_t_sq"])
    p.add_argument("--sft-weight", type=float, default=None,
                   help="add this x the winners' flow-matching error to the loss (default 0 images, 1 videos)")
    p.add_argument("--lr", type=float, default=QUICKSTART_DEFAULTS.lr)
    p.add_argument("--eval-prompts", type=int, default=QUICKSTART_DEFAULTS.eval_prompts)
    p.add_argument("--eval-samples-per-prompt", type=int, default=QUICKSTART_DEFAULTS.eval_samples_per_prompt)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("demo", help="a Gradio page on 127.0.0.1: base vs aligned side by side, with the RLG weight "
                                     "(and Flow-NRG) sliders and reward / oracle scores")
    from .app.demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cache", help="encode a preference dataset into a latent + text-embedding cache")
    p.add_argument("--model", required=True, help="pipeline folder or hub id whose VAE/text encoders to use")
    p.add_argument("--data", required=True, help="parquet / HF dataset folder / VideoAlign CSV / jsonl / folder")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=cmd_cache)

    world = sub.add_parser("world", help="the built-in world: rebuild models, make labelled pairs")
    wsub = world.add_subparsers(dest="world_command", required=True)
    p = wsub.add_parser("build", help="retrain the world's base generators from scratch (CPU, about an hour)")
    p.add_argument("--out", default=None, help="where to write the models (default: the package's shipped assets)")
    p.add_argument("--only", choices=["vae", "image", "video", "latent-reward", "reward", "aligned"], default=None,
                   help="one stage; vae must exist before image and video, which may run at once; latent-reward "
                        "(only when named) trains the image model's Flow-NRG latent reward models; reward (only "
                        "when named) the world's PickScore-style and VideoReward-style reward models; aligned (only when "
                        "named) the online Flow-DPO LoRA that `genalign demo` serves")
    p.add_argument("--config", default=None, help="YAML file of BuildConfig keys")
    p.add_argument("overrides", nargs="*", help="key=value overrides of BuildConfig (e.g. image_steps=2000)")
    p.set_defaults(func=cmd_world_build)

    p = wsub.add_parser("pairs", help="sample the base model and label pairs with simulated annotators")
    _add_sampling_flags(p, with_prompts=False)
    p.add_argument("--num-pairs", type=int, default=256)
    p.add_argument("--samples-per-prompt", type=int, default=2,
                   help="--source model: K samples per prompt, every two of them a pair (K (K - 1) / 2 pairs per "
                        "prompt, so fewer prompts and samples for the same number of pairs)")
    p.add_argument("--split", choices=["train", "heldout"], default="train")
    p.add_argument("--workers", type=int, default=None,
                   help="--source model: processes running the oracle (default: every CPU core, at most 8; on a GPU "
                        "machine the oracle, not the sampling, is the slow part)")
    p.add_argument("--noise", type=float, default=0.10, help="annotator noise rate")
    p.add_argument("--tie-margin", type=float, default=0.05)
    p.add_argument("--source", choices=["model", "renders"], default="model",
                   help="model: two samples of the model per prompt; renders: the prompt's render vs the render of "
                        "a one-attribute-swapped prompt of the same split (a text-alignment stage 1 for a reward "
                        "model; genalign.world.annotators.make_render_pairs)")
    p.add_argument("--autoencoder", type=float, default=0.5,
                   help="--source renders: share of pairs passed through the world autoencoder")
    p.add_argument("--sdedit", type=float, default=None, metavar="STRENGTH",
                   help="--source renders, images: pass every render through the model (--model, default the world's) "
                        "by SDEdit at this strength instead: pictures in the generator's style")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_world_pairs)
    return parser


USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .guidance import GuidanceError
    from .models.base import ModelLoadError
    from .world import WorldModelMissing
    from .world.grammar import PromptError

    errors: list[type[BaseException]] = [ConfigError, ModelLoadError, PromptError, WorldModelMissing, GuidanceError]
    try:
        from .data import CacheMismatchError, DataError

        errors += [DataError, CacheMismatchError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


# Commands whose module owns its whole argument parser (so `genalign score --help` shows score's own help).
DELEGATED = {"score": ("genalign.eval.reward_eval", "score_main"),
             "eval-reward": ("genalign.eval.reward_eval", "eval_reward_main"),
             "ensemble-reward": ("genalign.eval.reward_eval", "ensemble_reward_main"),
             "sweep": ("genalign.eval.sweep", "sweep_main")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module, func = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), func)(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"genalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
