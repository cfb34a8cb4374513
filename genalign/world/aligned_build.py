"""Build stage `aligned`: the Flow-DPO LoRA shipped with the world's image model (what `genalign demo` serves).

    genalign world build --only aligned        # needs the built image model

1. online Flow-DPO with the shipped recipe `flow_dpo_world_online` (genalign.trainers.online_pairs.train_online)
   in a work folder (pairs and checkpoints are never shipped);
2. the final LoRA and the run's resolved config.yaml (the demo reads beta from it) go to
   `<out>/image-aligned-lora/`, replacing the old one only once complete;
3. base vs aligned on held-out prompts (the oracle, same seeds), written to BUILD.json with the command.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..files import publish_dir

ALIGNED_RECIPE = "flow_dpo_world_online"
ALIGNED_EVAL_PROMPTS = 192  # 64 per template: enough for a +-0.015 interval on TA differences
ALIGNED_EVAL_SAMPLES = 4


def evaluate_base_vs_aligned(model_dir: Path, lora_dir: Path, num_prompts: int = ALIGNED_EVAL_PROMPTS,
                             samples_per_prompt: int = ALIGNED_EVAL_SAMPLES, seed: int = 1000) -> dict:
    """Oracle scores of the base model and of base + LoRA on held-out prompts with the same seeds; the paired
    differences (aligned - base) with 95% intervals and the diversity ratio."""
    from ..eval.oracle_eval import compare, generate, judge_samples, summarize
    from ..models import load_adapter
    from . import resolve_model
    from .grammar import heldout_eval_prompts

    path, kw, defaults = resolve_model(str(model_dir), "image")
    sampling = {k: defaults[k] for k in ("num_steps", "guidance_scale", "height", "width")}
    prompts = heldout_eval_prompts("image", n=num_prompts)
    summaries = {}
    for name, lora in (("base", None), ("aligned", lora_dir)):
        adapter = load_adapter(path, **kw)
        if lora is not None:
            adapter.load_lora(lora)
        samples, flat = generate(adapter, prompts, samples_per_prompt, seed=seed, progress=False, **sampling)
        summaries[name] = summarize(judge_samples(samples, flat, progress=False), samples)
    diff = compare(summaries["aligned"], summaries["base"])
    return {
        "num_prompts": num_prompts, "samples_per_prompt": samples_per_prompt, "seed": seed,
        **{f"{name}_{d}": s[d] for name, s in summaries.items() for d in ("TA", "VQ", "strict")},
        **{f"{name}_TA_by_template": s["TA_by_template"] for name, s in summaries.items()},
        "aligned_minus_base": {d: diff[d] for d in ("TA", "VQ", "strict")},
        "diversity_ratio": diff["diversity_ratio"],
    }


def build_aligned_lora(out: Path, cfg, workdir: str = "runs/world-build/aligned",
                       overrides: list[str] | None = None, eval_prompts: int = ALIGNED_EVAL_PROMPTS,
                       eval_samples_per_prompt: int = ALIGNED_EVAL_SAMPLES) -> dict:
    from ..config import load_config
    from ..recipes import recipe_path
    from ..trainers.flow_dpo import FlowDPOConfig
    from ..trainers.online_pairs import train_online
    from . import ALIGNED_LORA_DIRS

    model_dir = Path(out) / "image-base"
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"no world image model at {model_dir}: build it first (`genalign world build --only image`)")
    keys = [f"model={model_dir}", f"output_dir={workdir}", f"seed={cfg.seed}", "resume=latest"]
    if cfg.threads:
        keys.append(f"num_threads={cfg.threads}")
    config = load_config(FlowDPOConfig, str(recipe_path(ALIGNED_RECIPE)), keys + list(overrides or []))
    t0 = time.time()
    train_online(config)
    train_s = time.time() - t0

    final = Path(out) / ALIGNED_LORA_DIRS["image"]
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(workdir) / "lora", tmp)
    # The last round's resolved config: beta etc. for `genalign demo`'s "beta / w" label.
    last_round = Path(workdir) / f"round-{config.online_rounds - 1}" / "config.yaml"
    import yaml

    run_config = yaml.safe_load(last_round.read_text())
    run_config["model"] = "world"  # not this machine's absolute path: the shipped model the LoRA belongs to
    (tmp / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    publish_dir(tmp, final)

    t1 = time.time()
    evaluation = evaluate_base_vs_aligned(model_dir, final, eval_prompts, eval_samples_per_prompt)
    return {"command": "genalign world build --only aligned", "recipe": ALIGNED_RECIPE, "workdir": workdir,
            "train_s": train_s, "eval_s": time.time() - t1, "eval": evaluation}
