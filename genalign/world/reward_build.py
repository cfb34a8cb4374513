"""Stage `reward` of `genalign world build`: the world's learned reward models, shipped in the assets folder.

    genalign world build --only reward [key=value ...]      # BuildConfig keys reward_* (genalign.world.build)

1. Labelled pairs of the built base models, exactly as `genalign world pairs` writes them (same prompts, seeds
   and simulated annotators): image pairs `reward_image_pairs` (train split, seed `seed`) and
   `reward_image_heldout_pairs` (held-out split, seed `seed + 1`), shared with the latent-reward stage (same
   folder, reused when present); video pairs likewise under `reward_workdir`.
2. Image, PickScore's two stages: a world CLIP pretrained contrastively on captioned renders
   (`genalign.world.clip_pretrain`, recipe `reward_clip_recipe`), then PickScore fine-tuning on the image pairs
   (`genalign train reward --kind pickscore`, recipe `reward_pickscore_recipe`, `model=<the CLIP folder>`); with
   `reward_image_pair_sets` > 1, on that many sets of pairs (seeds seed, seed + 2, ...) together.
   With `reward_compare`, the same fine-tuning from a random-init CLIP is trained too (the ablation). With
   `reward_image_members` > 1 or `reward_image_scratch_member`, the shipped model is an `EnsembleReward`.
3. Video: a VideoReward-style model (tiny Qwen2-VL, recipe `reward_video_recipe`, BTT loss); with
   `reward_compare` also plain BT on the same pairs. With `reward_video_caption`, one model first learns to
   caption renders (`genalign.world.video_caption_pretrain`, recipe `reward_video_caption_recipe`: the stand-in
   for a pretrained VLM) and every loss's stages start from it. With `reward_video_render_pairs` > 0, each learns text
   alignment on that many render pairs (`make_render_pairs`: a prompt's clip vs a one-attribute-swapped prompt's,
   clean labels; `reward_video_render_overrides`, TA only by default) and then trains on the sampled pairs
   (with `reward_video_renders_in_stage2`, on the sampled and the render pairs together).
4. Held-out accuracies (without / with ties, chance, ceiling; `genalign.eval.reward_eval`) of every model go to
   BUILD.json; the PickScore model is shipped as `image-reward/`, the video model as `video-reward/` when one of
   its dimensions is above chance by more than two standard errors. Each must be under 7 MB.

Every training goes through the same trainer classes as the commands (`RewardTrainer`, `CLIPPretrainTrainer`,
`VideoCaptionTrainer`);
the pairs go through `genalign.world.annotators.make_preference_data`, as `genalign world pairs` does.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..files import publish_copy

logger = logging.getLogger("genalign.world")

# the ResNet world CLIP is 5.7 MB (4.2 MB of it the attention pool's projections), the video reward 4.6 MB
REWARD_MAX_BYTES = 7_000_000


def make_pairs(model_dir: Path, kind: str, num_pairs: int, split: str, seed: int, out: Path, noise: float = 0.10,
               tie_margin: float = 0.05, samples_per_prompt: int = 2) -> Path:
    """Labelled pairs of a world model, as `genalign world pairs --kind KIND --model MODEL_DIR --num-pairs N
    --split SPLIT --seed S --samples-per-prompt K --out OUT` writes them: prompts `Random(seed + i).choice(split)`,
    the model's sampling defaults, `Annotator(tie_margin, noise, seed)`."""
    from ..models import default_device, load_adapter
    from . import resolve_model
    from .annotators import Annotator, make_preference_data
    from .grammar import pair_prompts

    path, adapter_kwargs, defaults = resolve_model(str(model_dir), kind)
    adapter = load_adapter(path, device=default_device(), **adapter_kwargs)
    prompts = pair_prompts(kind, split, num_pairs, seed, samples_per_prompt)
    keys = ("num_steps", "guidance_scale", "height", "width") + (("num_frames",) if kind == "video" else ())
    sampling = {k: defaults[k] for k in keys}
    return make_preference_data(adapter, kind, prompts, out, Annotator(tie_margin=tie_margin, noise=noise, seed=seed),
                                seed=seed, samples_per_prompt=samples_per_prompt, num_pairs=num_pairs, **sampling)


def count_pairs(path: Path) -> int:
    """Rows of a pairs file (parquet or CSV); -1 when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return -1
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with open(path, newline="") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    except Exception:  # noqa: BLE001 - an unreadable file is regenerated
        return -1


def pairs_command(kind: str, model_dir: Path, n: int, split: str, seed: int, folder: Path,
                  samples_per_prompt: int = 2) -> str:
    k = f" --samples-per-prompt {samples_per_prompt}" if samples_per_prompt != 2 else ""
    return (f"genalign world pairs --kind {kind} --model {model_dir} --num-pairs {n} --split {split} --seed {seed}"
            f"{k} --out {folder}")


def ensure_pairs(model_dir: Path, kind: str, n: int, split: str, seed: int, folder: Path,
                 samples_per_prompt: int = 2) -> dict[str, Any]:
    """Make the pairs unless `folder` already holds exactly n of them; returns where and how they were made."""
    file = folder / ("pairs.parquet" if kind == "image" else "pairs.csv")
    t0 = time.time()
    reused = count_pairs(file) == n
    if not reused:
        make_pairs(model_dir, kind, n, split, seed, folder, samples_per_prompt=samples_per_prompt)
    return {"path": str(file), "pairs": n, "seed": seed, "split": split, "samples_per_prompt": samples_per_prompt,
            "reused": reused, "seconds": round(time.time() - t0, 1),
            "command": pairs_command(kind, model_dir, n, split, seed, folder, samples_per_prompt)}


def link_pair_sets(folder: Path, files: list) -> Path:
    """A folder of links to several Pick-a-Pic parquet files, named so that the readers (which read a folder's
    parquet files in name order) take them in the order given; the files stay where they are."""
    fresh_run(folder).mkdir(parents=True)
    for i, file in enumerate(files):
        (folder / f"set-{i:02d}.parquet").symlink_to(Path(file).resolve())
    return folder


def ensure_render_pairs(n: int, seed: int, folder: Path) -> dict[str, Any]:
    """Video render pairs of the train split, as `genalign world pairs --kind video --source renders --num-pairs N
    --seed S --out FOLDER` writes them (reused when `folder` holds exactly n)."""
    from .annotators import Annotator, make_render_pairs
    from .grammar import pair_prompts, split_prompts

    file = folder / "pairs.csv"
    t0 = time.time()
    reused = count_pairs(file) == n
    if not reused:
        # clean labels: a render is what its prompt says, as a caption is for the CLIP's stage 1
        make_render_pairs("video", pair_prompts("video", "train", n, seed), folder, Annotator(noise=0.0, seed=seed),
                          seed=seed, allowed=set(split_prompts("video", "train")))
    return {"path": str(file), "pairs": n, "seed": seed, "reused": reused, "seconds": round(time.time() - t0, 1),
            "command": f"genalign world pairs --kind video --source renders --num-pairs {n} --seed {seed} "
                       f"--noise 0 --out {folder}"}


def join_videoalign_csvs(out: Path, sources: list, unlabelled: dict | None = None) -> Path:
    """One VideoAlign CSV with the rows of `sources` in order, video paths rewritten relative to `out`'s folder
    (the videos stay where they are); columns are the union, blank where a source has none. `unlabelled`:
    {source: dimensions} whose labels are blanked in that source's rows (left out of those dimensions' loss)."""
    from .annotators import write_videoalign_csv

    out = Path(out)
    unlabelled = {str(k): tuple(v) for k, v in (unlabelled or {}).items()}
    rows = []
    for source in sources:
        blank = unlabelled.get(str(source), ())
        source = Path(source)
        with open(source, newline="") as fh:
            for row in csv.DictReader(fh):
                for key in ("path_A", "path_B"):
                    row[key] = os.path.relpath((source.parent / row[key]).resolve(), out.parent.resolve())
                row.update(dict.fromkeys(blank, ""))
                rows.append(row)
    return write_videoalign_csv(rows, out)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def summarize_eval(result: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers of a `genalign.eval.reward_eval` result worth keeping, per dimension."""
    keys = ("accuracy_without_ties", "accuracy_with_ties", "chance_without_ties", "chance_with_ties",
            "ceiling_without_ties", "ceiling_with_ties", "pairs_without_ties", "pairs_with_ties", "label_counts")
    if not result:
        return {}
    return {d: {k: m.get(k) for k in keys} for d, m in result["dimensions"].items()}


def above_chance(summary: dict[str, Any], sigmas: float = 2.0) -> list[str]:
    """Dimensions whose accuracy without ties beats 0.5 by more than `sigmas` binomial standard errors."""
    out = []
    for d, m in summary.items():
        n, acc = m.get("pairs_without_ties") or 0, m.get("accuracy_without_ties")
        if n and acc is not None and math.isfinite(acc) and acc - 0.5 > sigmas * math.sqrt(0.25 / n):
            out.append(d)
    return out


def as_overrides(keys: dict[str, Any] | None) -> list[str]:
    """{recipe key: value} -> ["key=value", ...] (lists and dicts as JSON, as the command line takes them)."""
    import json

    out = []
    for k, v in (keys or {}).items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (list, tuple, dict)):
            v = json.dumps(v)
        out.append(f"{k}={v}")
    return out


def fresh_run(folder: Path) -> Path:
    """A rebuild trains every run afresh: the previous run in the work folder (whose checkpoints the training loop
    would refuse to overwrite) is removed first. The pairs are kept and reused."""
    if folder.exists():
        logger.info("removing the previous run at %s", folder)
        shutil.rmtree(folder)
    return folder


def train_reward(recipe: str, overrides: list[str]) -> tuple[Any, Any, float]:
    """`genalign train reward --config RECIPE OVERRIDES...` in process, in a fresh output_dir: (trainer, result,
    seconds)."""
    from ..config import load_config
    from ..recipes import recipe_path
    from ..trainers.reward import RewardTrainConfig, RewardTrainer

    recipe_file = recipe if Path(recipe).is_file() else str(recipe_path(recipe))
    fresh_run(Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))))
    t0 = time.time()
    trainer = RewardTrainer.from_config(load_config(RewardTrainConfig, recipe_file, overrides))
    result = trainer.train()
    return trainer, result, time.time() - t0


def caption_pretrain(cfg, output_dir: Path, common: list[str]) -> dict[str, Any]:
    """Video stage 0 (`genalign.world.video_caption_pretrain`, recipe `cfg.reward_video_caption_recipe`) in a fresh
    `output_dir`: its BUILD.json entry, with the model folder under "model"."""
    from ..config import load_config
    from ..recipes import recipe_path
    from .video_caption_pretrain import VideoCaptionConfig, VideoCaptionTrainer

    overrides = [f"output_dir={fresh_run(output_dir)}", *common, *as_overrides(cfg.reward_video_caption_overrides)]
    t0 = time.time()
    trainer = VideoCaptionTrainer.from_config(
        load_config(VideoCaptionConfig, recipe_path(cfg.reward_video_caption_recipe), overrides))
    result = trainer.train()
    return {"recipe": cfg.reward_video_caption_recipe, "overrides": overrides, "seconds": round(time.time() - t0, 1),
            "caption_check_heldout": trainer.caption_accuracy, "model": str(result.final_model_dir),
            "final_metrics": {k: v for k, v in result.last_metrics.items() if isinstance(v, (int, float))}}


def ensemble_of(member_dirs: list[Path], trainer, heldout: str, folder: Path) -> dict[str, Any]:
    """The members' `EnsembleReward`, its normalisation fitted on the media of the training pairs the first
    member's was (`trainer`: that member's), saved to `folder`; returns its BUILD.json entry."""
    from ..eval.reward_eval import evaluate_reward
    from ..rewards import EnsembleReward, load_reward_model
    from ..trainers.reward import fit_normalization_on_pairs, normalization_indices

    ensemble = EnsembleReward([load_reward_model(d) for d in member_dirs])
    config = trainer.config
    fit_normalization_on_pairs(ensemble, trainer.train_dataset,
                               normalization_indices(len(trainer.train_dataset), config.normalization_pairs, config.seed))
    fresh_run(folder)
    ensemble.save_pretrained(folder)
    return {"members": [str(d) for d in member_dirs], "bytes": folder_bytes(folder),
            "command": (f"genalign ensemble-reward {' '.join(str(d) for d in member_dirs)} --fit-data "
                        f"{trainer.config.data} --fit-pairs {trainer.config.normalization_pairs} --fit-seed "
                        f"{trainer.config.seed} --out {folder}"),
            "normalization": ensemble.normalization, "heldout": summarize_eval(evaluate_reward(ensemble, heldout))}


def ship(src: Path, target: Path, members: int = 1) -> int:
    """Copy a reward model folder into the assets atomically; returns its size in bytes (refused over 7 MB a
    member: an ensemble of `members` models may take that many times the limit)."""
    size = folder_bytes(src)
    if size >= REWARD_MAX_BYTES * members:
        raise RuntimeError(f"the reward model at {src} has {size} bytes, over the {REWARD_MAX_BYTES}-byte limit of a "
                           f"shipped asset{' per member' if members > 1 else ''}: make it smaller in its recipe")
    publish_copy(src, target)
    return size


def build_command(cfg) -> str:
    """The `genalign world build --only reward` command line that gives `cfg` (its non-default keys)."""
    from dataclasses import fields

    from .build import BuildConfig

    default = BuildConfig()
    parts = ["genalign world build --only reward"]
    for f in fields(cfg):
        if not (f.name.startswith("reward_") or f.name in ("seed", "threads", "latent_reward_workdir")):
            continue
        value = getattr(cfg, f.name)
        if value != getattr(default, f.name):
            if isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            elif isinstance(value, dict):
                import json

                value = "'" + json.dumps(value) + "'"
            parts.append(f"{f.name}={value}")
    return " ".join(parts)


def stats_kind(key: str) -> str | None:
    """Which reward kind a BUILD.json reward stats entry belongs to (None: the run as a whole)."""
    if key.startswith("video"):
        return "video"
    if key.startswith(("image", "clip", "pickscore")):
        return "image"
    return None


def merge_reward_entry(previous: dict | None, entry: dict, kinds) -> dict:
    """The BUILD.json `reward` entry of a build of some reward kinds (`reward_kinds=[video]`) keeps the record of
    the kinds it left alone: their stats, and under `kept` how they were built (config, command, device, torch).
    Without this, rebuilding the video model would erase the record of the shipped image model."""
    if not previous:
        return entry
    kept = {kind: record for kind, record in previous.get("kept", {}).items() if kind not in kinds}
    for kind in ("image", "video"):
        old = {k: v for k, v in previous["stats"].items() if stats_kind(k) == kind}
        if kind in kinds or not old:
            continue
        entry["stats"].update(old)
        kept.setdefault(kind, {"config": previous["config"], "torch": previous.get("torch"),  # as first recorded
                               **{k: v for k, v in previous["stats"].items() if stats_kind(k) is None}})
    if kept:
        entry["kept"] = kept
    return entry


def build_reward_models(out: Path, cfg) -> dict[str, Any]:
    """Stage `reward` (module docstring). `cfg`: a `genalign.world.build.BuildConfig`."""
    from ..config import load_config
    from ..models import default_device
    from ..recipes import recipe_path
    from . import REWARD_MODEL_DIRS
    from .clip_pretrain import CLIPPretrainConfig, CLIPPretrainTrainer

    out = Path(out)
    work = Path(cfg.reward_workdir)
    common = [f"seed={cfg.seed}", "progress_bar=false"] + ([f"num_threads={cfg.threads}"] if cfg.threads else [])
    device = default_device()
    stats: dict[str, Any] = {"command": build_command(cfg),
                             "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    kinds = [k for k in ("image", "video") if k in cfg.reward_kinds]

    if "image" in kinds:
        model_dir = out / "image-base"
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"no world image model at {model_dir}: build it first (--only image)")
        # Held-out pairs: two samples per prompt, shared with the latent-reward stage. Training pairs: every two of
        # K samples per prompt, in their own folder when K > 2 (the latent-reward stage reads one pair per prompt).
        k = cfg.reward_image_samples_per_prompt
        train_folder = (Path(cfg.latent_reward_workdir) / "pairs-train" if k == 2
                        else work / f"image-pairs-train-k{k}")
        pairs = {"train": ensure_pairs(model_dir, "image", cfg.reward_image_pairs, "train", cfg.seed, train_folder,
                                       samples_per_prompt=k),
                 "heldout": ensure_pairs(model_dir, "image", cfg.reward_image_heldout_pairs, "heldout", cfg.seed + 1,
                                         Path(cfg.latent_reward_workdir) / "pairs-heldout")}
        train_data = pairs["train"]["path"]
        if cfg.reward_image_pair_sets > 1:  # more sets of as many pairs: seeds seed + 2, seed + 3, ... (seed + 1: held out)
            more = [ensure_pairs(model_dir, "image", cfg.reward_image_pairs, "train", cfg.seed + 1 + j,
                                 Path(f"{train_folder}-seed{cfg.seed + 1 + j}"), samples_per_prompt=k)
                    for j in range(1, cfg.reward_image_pair_sets)]
            pairs["train_sets"] = more
            train_data = str(link_pair_sets(work / f"image-pairs-train-k{k}-{cfg.reward_image_pair_sets}-sets",
                                            [pairs["train"]["path"], *(m["path"] for m in more)]))
        stats["image_pairs"] = pairs

        # stage 1: the world CLIP, one per ensemble member (seeds seed, seed + 1, ...): members fine-tuned from one
        # CLIP err alike (docs/world-rewards.md), from CLIPs pretrained apart less so
        clip_dirs = []
        for j in range(cfg.reward_image_members):
            name = "clip_pretrain" if j == 0 else f"clip_pretrain_member{j}"
            clip_overrides = [f"output_dir={fresh_run(work / name.replace('_', '-'))}", *common,
                              *as_overrides(cfg.reward_clip_overrides), f"seed={cfg.seed + j}"]
            t0 = time.time()
            clip_trainer = CLIPPretrainTrainer.from_config(
                load_config(CLIPPretrainConfig, recipe_path(cfg.reward_clip_recipe), clip_overrides))
            clip_result = clip_trainer.train()
            stats[name] = {
                "recipe": cfg.reward_clip_recipe, "overrides": clip_overrides, "seconds": round(time.time() - t0, 1),
                "pool_seconds": round(clip_trainer.pool_seconds, 1), "pool_pictures": len(clip_trainer.pool.images),
                "zero_shot_heldout": clip_trainer.zero_shot,
                "final_metrics": {k: v for k, v in clip_result.last_metrics.items() if isinstance(v, (int, float))}}
            clip_dirs.append(clip_result.final_model_dir)

        # stage 2: PickScore fine-tuning of each member's CLIP (seed seed + j), and, for the record, the same from
        # scratch
        tuned = as_overrides(cfg.reward_pickscore_overrides)
        members = [("pickscore" if j == 0 else f"pickscore_member{j}", cfg.seed + j)
                   for j in range(cfg.reward_image_members)]
        runs = [(name, cfg.reward_pickscore_recipe, [f"model={clip_dir}", *tuned], seed)
                for (name, seed), clip_dir in zip(members, clip_dirs)]
        if cfg.reward_compare or cfg.reward_image_scratch_member:
            # the same data from a random-init CLIP (its own recipe; the same budget overrides)
            scratch = [o for o in tuned if o.split("=", 1)[0] not in ("lr", "model")]
            runs.append(("pickscore_from_scratch", "reward_pickscore_world", ["model=world", *scratch], cfg.seed))
        member_dirs, first_trainer = [], None
        ensemble_wanted = cfg.reward_image_members > 1 or cfg.reward_image_scratch_member
        for name, recipe, extra, seed in runs:
            overrides = [*extra, f"data={train_data}", f"eval_data={pairs['heldout']['path']}",
                         f"output_dir={work / name.replace('_', '-')}", *common, f"seed={seed}"]
            trainer, result, seconds = train_reward(recipe, overrides)
            stats[name] = {"recipe": recipe, "overrides": overrides, "seconds": round(seconds, 1),
                           "bytes": folder_bytes(result.final_model_dir),
                           "heldout": summarize_eval(trainer.eval_result)}
            if name != "pickscore_from_scratch" or cfg.reward_image_scratch_member:
                member_dirs.append(result.final_model_dir)
                if ensemble_wanted and first_trainer is None:  # its training pairs fit the ensemble's normalisation
                    first_trainer = trainer
        shipped = member_dirs[0]
        if len(member_dirs) > 1:
            shipped = work / "pickscore-ensemble"
            stats["pickscore_ensemble"] = ensemble_of(member_dirs, first_trainer, pairs["heldout"]["path"], shipped)
            stats["pickscore_ensemble"]["shipped"] = REWARD_MODEL_DIRS["image"]
        else:
            stats["pickscore"]["shipped"] = REWARD_MODEL_DIRS["image"]
        ship(shipped, out / REWARD_MODEL_DIRS["image"], members=len(member_dirs))

    if "video" in kinds:
        model_dir = out / "video-base"
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"no world video model at {model_dir}: build it first (--only video)")
        k = cfg.reward_video_samples_per_prompt
        pairs = {"train": ensure_pairs(model_dir, "video", cfg.reward_video_pairs, "train", cfg.seed,
                                       work / ("video-pairs-train" if k == 2 else f"video-pairs-train-k{k}"),
                                       samples_per_prompt=k),
                 "heldout": ensure_pairs(model_dir, "video", cfg.reward_video_heldout_pairs, "heldout", cfg.seed + 1,
                                         work / "video-pairs-heldout")}
        stats["video_pairs"] = pairs
        if cfg.reward_video_render_pairs:
            stats["video_render_pairs"] = ensure_render_pairs(cfg.reward_video_render_pairs, cfg.seed,
                                                              work / "video-render-pairs")
        pretrained = []
        if cfg.reward_video_caption:  # stage 0: one captioning model, the start of every loss's reward stages
            stats["video_caption_pretrain"] = caption_pretrain(cfg, work / "video-caption", common)
            pretrained = [f"model={stats['video_caption_pretrain']['model']}"]
        losses = ["btt", "bt"] if cfg.reward_compare else ["btt"]
        for loss in losses:
            name = f"videoreward_{loss}"
            start = pretrained
            if cfg.reward_video_render_pairs:  # stage 1: text alignment on the render pairs, same loss
                stage1 = [f"data={stats['video_render_pairs']['path']}", f"eval_data={pairs['heldout']['path']}",
                          f"loss={loss}", f"output_dir={work / (name.replace('_', '-') + '-renders')}", *common,
                          *as_overrides(cfg.reward_video_overrides), *as_overrides(cfg.reward_video_render_overrides),
                          *start]
                trainer, result, seconds = train_reward(cfg.reward_video_recipe, stage1)
                stats[name + "_renders"] = {"recipe": cfg.reward_video_recipe, "overrides": stage1,
                                            "seconds": round(seconds, 1),
                                            "heldout": summarize_eval(trainer.eval_result)}
                start = [f"model={result.final_model_dir}"]
            stage2_data = pairs["train"]["path"]
            if cfg.reward_video_renders_in_stage2:
                # the render pairs keep the labels stage 1 learned (TA by default): their VQ / MQ ties say
                # nothing about the generator's clips and pulled those scores towards ties
                renders = stats["video_render_pairs"]["path"]
                stage1_dims = (cfg.reward_video_render_overrides or {}).get("dims") or {}
                stage2_data = str(join_videoalign_csvs(
                    work / "video-pairs-train-and-renders" / "pairs.csv", [stage2_data, renders],
                    unlabelled={renders: [d for d, w in stage1_dims.items() if not w]}))
                stats["video_stage2_pairs"] = {"path": stage2_data, "pairs": count_pairs(Path(stage2_data))}
            overrides = [f"data={stage2_data}", f"eval_data={pairs['heldout']['path']}", f"loss={loss}",
                         f"output_dir={work / name.replace('_', '-')}", *common,
                         *as_overrides(cfg.reward_video_overrides), *start]
            trainer, result, seconds = train_reward(cfg.reward_video_recipe, overrides)
            summary = summarize_eval(trainer.eval_result)
            stats[name] = {"recipe": cfg.reward_video_recipe, "overrides": overrides, "seconds": round(seconds, 1),
                           "bytes": folder_bytes(result.final_model_dir), "heldout": summary,
                           "above_chance": above_chance(summary)}
            if loss == "btt":
                if stats[name]["above_chance"]:
                    stats[name]["shipped"] = REWARD_MODEL_DIRS["video"]
                    ship(result.final_model_dir, out / REWARD_MODEL_DIRS["video"])
                else:
                    stats[name]["shipped"] = None
                    logger.warning("the video reward model is at chance on every dimension: not shipped")
    return stats
