"""Reward scoring throughput: genalign's batched scoring (model loaded once, resident) vs one item at a time with
the model reloaded for every call (what a popular reward package's `score()` does), images and videos.

CPU (default): the tiny CLIP-style (PickScore-like) and Qwen2-VL-style (VideoReward) models of the tests, saved to
a temporary folder and loaded back with `load_reward_model` (the way users get them):

    reload_per_call   for each item: load_reward_model(folder), then score that one item
    resident_bs{B}    load once, score every item with reward(media, prompts, batch_size=B)

GPU (`--device cuda`): the real-size architectures with random weights, built straight on the GPU in bf16 and
scored through genalign's own classes (CLIPReward.from_transformers, VideoReward(backbone, tokenizer, config)):

    CLIP ViT-H/14 (HPSv2's backbone: vision width 1280, 32 layers, patch 14, 224 px; text width 1024, 24 layers,
    projection 1024), images 512 x 512 given as float tensors on the GPU (a generator's decoded output),
    resized to 224 inside the reward;
    VideoReward on a Qwen2-VL-2B-sized backbone (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960, vision
    depth 32 width 1280, patch 14, merge 2) with VideoRewardConfig's defaults (8 frames, fps 8, frames up to 448 x 448
    pixels: videos of 8 frames at 448 x 448 are scored at that size, 1024 video tokens each) and its default
    LoRA rank 16 on the language model.

Items/s at several batch sizes (CUDA events after warm-up) and peak memory (torch.cuda.max_memory_allocated),
and for CLIP the two towers alone at the largest batch (224 px input, no per-item resize: the model-bound rate);
without --quick also the largest batch from uint8 numpy arrays (host-side conversion included) and one
save + reload from disk (what a load-per-call API pays for every item at this size).
Without a hub there is no real tokenizer for either model: the CLIP one is built from open_clip's BPE file
(the real 49408 tokens; the world's word-level tokenizer when open_clip is missing; prompts are padded to 77
tokens either way) and Qwen2-VL's text is tokenized with the tests' small BPE tokenizer (prompts of a few
dozen tokens next to 1024 video tokens). Each configuration that fails (OOM, a missing package) is recorded
in the JSON and the run goes on; the JSON is rewritten after every configuration.

    python benchmarks/reward_throughput.py                               # CPU, tiny models
    python benchmarks/reward_throughput.py --device cuda --quick --out $OUT   # < 3 min on an H100
    python benchmarks/reward_throughput.py --device cuda --out $OUT   # + more batch sizes, uint8 input, a reload
    python benchmarks/reward_throughput.py --smoke       # the real-arch path on the CPU, 1 layer per tower
JSON: $OUT/reward_throughput_{cpu,cuda,cpu_smoke}.json, or --out x.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_common

from gpu_common import (
    allocated_gib,
    build_on,
    device_name,
    error_record,
    free_memory,
    log,
    offline_env,
    output_path,
    peak_gib,
    reset_peak,
    sync,
    time_calls,
    versions,
    write_json,
)

# ViT-H/14 as open_clip / HPSv2 define it (transformers CLIPConfig names)
CLIP_VIT_H14 = {
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "vocab_size": 49408,
                    "hidden_act": "gelu"},
    "projection_dim": 1024,
}
# Qwen2-VL-2B-Instruct's config.json sizes and special token ids
QWEN2VL_2B = {
    "text_config": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 151643,
                    "eos_token_id": 151645,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                        "rope_theta": 1000000.0}},
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def prompts_for(n: int) -> list[str]:
    try:
        from genalign.world.grammar import image_splits

        pool = image_splits().train
    except Exception:  # noqa: BLE001 - any prompt will do
        pool = ["a red circle above two blue squares", "three green triangles", "a yellow star on the left"]
    return [pool[i % len(pool)] for i in range(n)]


def uint8_media(n: int, size: int, frames: int | None, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if frames is None else (frames, size, size, 3)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------------------- measuring
def items_per_s_resident(model, media, prompts, batch_size: int, reps: int, device) -> dict:
    """Every item scored with the resident model, `batch_size` at a time: items/s (median over reps)."""
    def call():
        return model(media, prompts, batch_size=batch_size)

    call()  # warm-up (kernels, allocator, tokenizer caches)
    sync(device)
    reset_peak(device)
    times = time_calls(call, reps, device)
    t = statistics.median(times)
    return {"items": len(media), "batch_size": batch_size, "s_per_pass": t, "items_per_s": len(media) / t,
            "peak_gib": peak_gib(device)}


def items_per_s_reload(folder: Path, media, prompts, calls: int, device, dtype) -> dict:
    """One item per call, the model loaded from `folder` in every call (a package's `score()`)."""
    from genalign.rewards import load_reward_model

    times = []
    for i in range(calls):
        sync(device)
        t0 = time.perf_counter()
        model = load_reward_model(folder, device=device, dtype=dtype)
        model([media[i]], [prompts[i]])
        sync(device)
        times.append(time.perf_counter() - t0)
        del model
    t = statistics.median(times)
    return {"items": calls, "batch_size": 1, "s_per_item": t, "items_per_s": 1 / t,
            "s_per_item_all": [round(x, 4) for x in times]}


# ------------------------------------------------------------------------------------------- CPU
def cpu_run(args, report, path) -> None:
    from genalign.rewards import load_reward_model, tiny_clip_reward, tiny_video_reward

    tmp = Path(tempfile.mkdtemp(prefix="reward-bench-"))
    kinds = {
        "image": {"build": lambda: tiny_clip_reward(image_size=32), "size": 64, "frames": None,
                  "n": args.items or 64, "reload_calls": args.reload_calls or 8},
        "video": {"build": tiny_video_reward, "size": 64, "frames": 8,
                  "n": args.items or 32, "reload_calls": args.reload_calls or 4},
    }
    for kind, spec in kinds.items():
        if args.only and kind not in args.only:
            continue
        entry = report["results"].setdefault(kind, {"model": "tiny CLIP (PickScore-style)" if kind == "image"
                                                    else "tiny Qwen2-VL VideoReward", "rows": []})
        try:
            folder = spec["build"]().save_pretrained(tmp / kind)
            media = uint8_media(spec["n"], spec["size"], spec["frames"], seed=1)
            prompts = prompts_for(spec["n"])
            t0 = time.perf_counter()
            model = load_reward_model(folder)
            entry["load_s"] = time.perf_counter() - t0
            entry["input"] = (f"uint8 numpy, {spec['size']}x{spec['size']}"
                              + (f", {spec['frames']} frames" if spec["frames"] else ""))
            log(f"{kind}: reload per call ({spec['reload_calls']} items) ...")
            row = items_per_s_reload(folder, media, prompts, spec["reload_calls"], "cpu", None)
            entry["rows"].append({"mode": "reload_per_call", **row})
            for bs in args.batch_sizes or [1, 8, 32]:
                log(f"{kind}: resident, batch {bs} ...")
                row = items_per_s_resident(model, media, prompts, bs, args.reps or 3, "cpu")
                entry["rows"].append({"mode": f"resident_bs{bs}", **row})
            del model
        except Exception as e:  # noqa: BLE001 - recorded, the other kind still runs
            entry.update(error_record(e))
            log(f"{kind} FAILED: {entry['error']}")
        summarise(entry)
        write_json(path, report)
    shutil.rmtree(tmp, ignore_errors=True)


def summarise(entry: dict) -> None:
    rows = {r["mode"]: r for r in entry.get("rows", []) if "items_per_s" in r}  # failed rows left out
    reload = rows.get("reload_per_call")
    resident = [r for m, r in rows.items() if m.startswith("resident")]
    if resident:
        best = max(resident, key=lambda r: r["items_per_s"])
        entry["best_resident"] = {"mode": best["mode"], "items_per_s": best["items_per_s"]}
        if reload:
            entry["speedup_best_vs_reload"] = best["items_per_s"] / reload["items_per_s"]
            one = rows.get("resident_bs1")
            if one:
                entry["speedup_resident_bs1_vs_reload"] = one["items_per_s"] / reload["items_per_s"]


# ------------------------------------------------------------------------------------------- GPU
def clip_tokenizer():
    try:
        from genalign.rewards import build_clip_tokenizer

        return build_clip_tokenizer(), "CLIP BPE (open_clip's vocabulary file, 49408 tokens)"
    except ImportError:
        from genalign.world.tokenizer import build_tokenizer

        return build_tokenizer(), "the world's word-level tokenizer (open_clip missing); prompts padded to 77"


def build_clip_vith(device, layers: int | None = None):
    """CLIPReward on a random-init ViT-H/14 CLIP (`layers`: cut both towers to that depth, for a CPU smoke run)."""
    from genalign.rewards import CLIPReward
    from transformers import CLIPConfig, CLIPModel

    tokenizer, tok_note = clip_tokenizer()
    vision, text = dict(CLIP_VIT_H14["vision_config"]), dict(CLIP_VIT_H14["text_config"])
    if layers:
        vision["num_hidden_layers"] = text["num_hidden_layers"] = layers
    config = CLIPConfig(text_config={**text, "eos_token_id": tokenizer.eos_token_id,
                                     "bos_token_id": tokenizer.bos_token_id,
                                     "pad_token_id": tokenizer.pad_token_id or 0},
                        vision_config=vision, projection_dim=CLIP_VIT_H14["projection_dim"])
    torch.manual_seed(0)
    with build_on(device, torch.bfloat16):
        clip = CLIPModel(config).eval()
    reward = CLIPReward.from_transformers(clip, tokenizer).to(device).eval()
    return reward, tok_note


def build_qwen2vl_2b_reward(device, layers: int | None = None):
    """VideoReward (default config) on a random-init Qwen2-VL-2B-sized backbone (`layers`: cut the language model
    and the vision tower to that depth, for a CPU smoke run)."""
    from genalign.rewards import VideoReward, VideoRewardConfig, build_tiny_qwen2vl_tokenizer
    from transformers import Qwen2VLConfig, Qwen2VLModel

    tokenizer = build_tiny_qwen2vl_tokenizer()
    text = {**QWEN2VL_2B["text_config"], "pad_token_id": tokenizer.pad_token_id}
    vision = dict(QWEN2VL_2B["vision_config"])
    if layers:
        text["num_hidden_layers"], vision["depth"] = layers, layers
    config = Qwen2VLConfig(text_config=text, vision_config=vision,
                           **{k: v for k, v in QWEN2VL_2B.items() if k.endswith("_token_id")})
    torch.manual_seed(0)
    with build_on(device, torch.bfloat16):
        backbone = Qwen2VLModel(config).eval()
        reward = VideoReward(backbone, tokenizer, VideoRewardConfig())  # defaults: 8 frames, fps 8, <= 448^2 px
    reward = reward.to(device).eval()
    return reward, "the tests' small Qwen2 BPE tokenizer (no hub); video tokens dominate the sequence"


def gpu_media(kind: str, n: int, device, seed: int = 0) -> torch.Tensor:
    """Float pixels in [0, 1] on the GPU: images (n, 3, 512, 512), videos (n, 8, 3, 448, 448)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (n, 3, 512, 512) if kind == "image" else (n, 8, 3, 448, 448)
    return torch.rand(shape, generator=g, device=device)


def real_run(args, report, path) -> None:
    """The real-size architectures (GPU; on the CPU only as a --smoke check of the code path)."""
    device = torch.device(args.device)
    layers = 1 if args.smoke else None
    plans = {
        "image": {"build": build_clip_vith, "name": "CLIP ViT-H/14 (PickScore / HPSv2 backbone), random init",
                  "batch_sizes": args.batch_sizes or ([1, 16, 64] if args.quick else [1, 8, 32, 64, 128]),
                  "input": "float tensors on the GPU, 512x512 (resized to 224 inside the reward)"},
        "video": {"build": build_qwen2vl_2b_reward, "name": "VideoReward on a Qwen2-VL-2B-sized backbone, random init",
                  "batch_sizes": args.batch_sizes or ([1, 4] if args.quick else [1, 2, 4, 8]),
                  "input": "float tensors on the GPU, 8 frames at 448x448 (VideoRewardConfig defaults: 8 frames, "
                           "fps 8, max_pixels 448*448 -> 1024 video tokens per video)"},
    }
    reps = args.reps or (1 if args.smoke else 3 if args.quick else 5)
    if args.smoke and not args.batch_sizes:
        for plan in plans.values():
            plan["batch_sizes"] = [1, 2]
    for kind, plan in plans.items():
        if args.only and kind not in args.only:
            continue
        entry = report["results"].setdefault(kind, {"model": plan["name"], "input": plan["input"], "rows": []})
        model = None
        try:
            log(f"{kind}: building {plan['name']} ...")
            t0 = time.perf_counter()
            model, tok_note = plan["build"](device, layers)
            sync(device)
            entry.update({"build_s": round(time.perf_counter() - t0, 2), "tokenizer": tok_note,
                          "params": sum(p.numel() for p in model.parameters()),
                          "weights_gib": allocated_gib(device)})
            if kind == "video":
                fh, fw = model.frame_size_for(448, 448)
                t = model.config.num_frames // model.temporal_patch_size
                entry.update({"num_frames": model.config.num_frames, "fps": model.config.fps, "frame_size": [fh, fw],
                              "video_tokens_per_item": t * (fh // model.patch_size) * (fw // model.patch_size)
                              // model.merge_size**2})
            log(f"{kind}: built {entry['params'] / 1e9:.2f} B params in {entry['build_s']} s")
        except Exception as e:  # noqa: BLE001
            entry.update(error_record(e))
            log(f"{kind} build FAILED: {entry['error']}")
            model = None
        if model is not None:
            for bs in plan["batch_sizes"]:
                try:
                    media = gpu_media(kind, bs, device)
                    row = items_per_s_resident(model, media, prompts_for(bs), bs, reps, device)
                    entry["rows"].append({"mode": f"resident_bs{bs}", **row})
                    log(f"{kind} bs {bs}: {row['items_per_s']:.1f} items/s, peak {row['peak_gib']} GiB")
                    del media
                except Exception as e:  # noqa: BLE001 - e.g. OOM at the largest batch: recorded, go on
                    entry["rows"].append({"mode": f"resident_bs{bs}", "batch_size": bs, **error_record(e)})
                    log(f"{kind} bs {bs} FAILED: {entry['rows'][-1]['error']}")
                    free_memory(device)
                write_json(path, report)
            if kind == "image" and plan["batch_sizes"]:
                bs = max(plan["batch_sizes"])
                try:  # the CLIP towers alone on 224 px pixels already normalised: the model-bound rate
                    x = torch.rand(bs, 3, *model.crop_size, device=device, dtype=model.dtype)
                    texts = prompts_for(bs)

                    def towers(x=x, texts=texts, model=model):
                        with torch.no_grad():
                            return (model.encode_images(x) * model.encode_text(texts)).sum(-1)

                    towers()
                    reset_peak(device)
                    t = statistics.median(time_calls(towers, reps, device))
                    entry["rows"].append({"mode": f"towers_only_bs{bs}", "batch_size": bs, "items": bs,
                                          "s_per_pass": t, "items_per_s": bs / t, "peak_gib": peak_gib(device)})
                    log(f"{kind} bs {bs}, CLIP towers only: {bs / t:.1f} items/s")
                    del x
                except Exception as e:  # noqa: BLE001
                    entry["rows"].append({"mode": f"towers_only_bs{bs}", **error_record(e)})
                write_json(path, report)
            if args.uint8 and plan["batch_sizes"]:
                bs = max(plan["batch_sizes"])
                try:  # the same from uint8 numpy arrays: host-side conversion and copies included
                    size, frames = (512, None) if kind == "image" else (448, 8)
                    media = uint8_media(bs, size, frames)
                    row = items_per_s_resident(model, media, prompts_for(bs), bs, reps, device)
                    entry["rows"].append({"mode": f"resident_bs{bs}_uint8", **row})
                    log(f"{kind} bs {bs} from uint8 numpy: {row['items_per_s']:.1f} items/s")
                    del media
                except Exception as e:  # noqa: BLE001
                    entry["rows"].append({"mode": f"resident_bs{bs}_uint8", **error_record(e)})
                    free_memory(device)
                write_json(path, report)
            if args.reload:
                try:  # one reload from disk: what a load-per-call API pays for every item at this size
                    folder = Path(tempfile.mkdtemp(prefix=f"reward-{kind}-"))
                    t0 = time.perf_counter()
                    model.save_pretrained(folder)
                    entry["save_s"] = round(time.perf_counter() - t0, 2)
                    media = gpu_media(kind, 1, device)
                    del model
                    model = None
                    free_memory(device)
                    row = items_per_s_reload(folder, media, prompts_for(1), 1, device, torch.bfloat16)
                    shutil.rmtree(folder, ignore_errors=True)
                    entry["rows"].append({"mode": "reload_per_call", **row})
                    log(f"{kind}: reload per call {row['s_per_item']:.2f} s/item")
                except Exception as e:  # noqa: BLE001
                    entry["rows"].append({"mode": "reload_per_call", **error_record(e)})
                    log(f"{kind} reload FAILED: {entry['rows'][-1]['error']}")
        del model
        free_memory(device)
        summarise(entry)
        write_json(path, report)


# ------------------------------------------------------------------------------------------- driver
def print_table(report: dict) -> None:
    meta = report["meta"]
    print(f"\nreward scoring throughput, {meta['device']}, {meta['dtype']}")
    print(f"{'kind':7s}{'mode':18s}{'items/s':>12s}{'peak GiB':>10s}  note")
    for kind, entry in report["results"].items():
        if "error" in entry and not entry.get("rows"):
            print(f"{kind:7s}{'-':18s}{'-':>12s}{'-':>10s}  {entry['error_kind']}: {entry['error'][:70]}")
            continue
        for r in entry.get("rows", []):
            if "error" in r:
                print(f"{kind:7s}{r['mode']:18s}{'-':>12s}{'-':>10s}  {r['error_kind']}: {r['error'][:70]}")
                continue
            peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
            print(f"{kind:7s}{r['mode']:18s}{r['items_per_s']:>12.2f}{peak:>10s}")
        if "speedup_best_vs_reload" in entry:
            print(f"{kind:7s}best resident ({entry['best_resident']['mode']}) vs reload per call: "
                  f"{entry['speedup_best_vs_reload']:.1f}x; batch 1 resident vs reload: "
                  f"{entry.get('speedup_resident_bs1_vs_reload', float('nan')):.1f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--gpu", action="store_true", help="same as --device cuda")
    ap.add_argument("--quick", action="store_true", help="GPU: fewer batch sizes and repetitions (< 3 min)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", help="resident batch sizes (CPU default 1 8 32)")
    ap.add_argument("--items", type=int, default=None, help="CPU: items scored per pass (64 images, 32 videos)")
    ap.add_argument("--reload-calls", type=int, default=None, help="CPU: items scored with a reload each (8 / 4)")
    ap.add_argument("--reps", type=int, default=None, help="timed passes per configuration")
    ap.add_argument("--only", nargs="*", choices=("image", "video"), help="only these kinds")
    ap.add_argument("--reload", action=argparse.BooleanOptionalAction, default=None,
                    help="GPU: also time one save + reload per kind (default: on without --quick)")
    ap.add_argument("--arch", choices=("tiny", "real"), default=None,
                    help="tiny (the tests' models; default on the CPU) or real (ViT-H/14, Qwen2-VL-2B; default on cuda)")
    ap.add_argument("--smoke", action="store_true", help="real arch with 1 layer per tower (a CPU check of the path)")
    ap.add_argument("--uint8", action=argparse.BooleanOptionalAction, default=None,
                    help="real arch: also score the largest batch from uint8 numpy arrays (default: on without --quick)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="a .json file or a folder (default $OUT)")
    args = ap.parse_args(argv)
    offline_env()
    if args.gpu:
        args.device = "cuda"
    if args.reload is None:
        args.reload = not args.quick
    if args.uint8 is None:
        args.uint8 = not args.quick
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    arch = args.arch or ("real" if device.type == "cuda" else "tiny")
    if args.smoke:
        arch = "real"
    tag = device.type + ("_smoke" if args.smoke else "_real" if arch == "real" and device.type == "cpu" else "")
    path = output_path(args.out, f"reward_throughput_{tag}.json")
    report = {"meta": {"device": device_name(device), "versions": versions(), "arch": arch, "smoke": args.smoke,
                       "dtype": "bfloat16" if arch == "real" else "float32", "quick": args.quick,
                       "threads": args.threads},
              "results": {}}
    log(f"reward throughput on {report['meta']['device']}, {arch} models" + (" (smoke: 1 layer)" if args.smoke else ""))
    (real_run if arch == "real" else cpu_run)(args, report, path)
    write_json(path, report)
    print_table(report)


if __name__ == "__main__":
    main()
