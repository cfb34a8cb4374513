"""The noise-aware latent reward trainer (genalign.trainers.latent_reward): the loss against hand formulas, learning
a known function of the clean latent through noise, resume exactness, the clean-latent ablation, the world's
oracle targets and the command line."""

import math
import random

import numpy as np
import pytest
import torch

from genalign import flow
from genalign.config import ConfigError, load_config
from genalign.guidance import LatentRewardModel, latent_space_id
from genalign.models import SD3Adapter, tiny
from genalign.recipes import recipe_path
from genalign.trainers.latent_reward import (
    LatentRewardPairs,
    LatentRewardTrainConfig,
    LatentRewardTrainer,
    evaluate_latent_reward,
    oracle_column_scores,
    pair_label_row,
    standardize_targets,
)
from genalign.trainers.latent_reward import main as train_main

SHAPE = (4, 8, 8)


def quiet(**kw):
    return dict(progress_bar=False, report_to="none", num_threads=1, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapter():
    return SD3Adapter(tiny.tiny_sd3_pipeline(with_t5=False))


def brightness_pairs(n: int, seed: int, with_targets: bool = False):
    """Pairs of clean latents whose "VQ" is a known function of the latent: its mean (brightness). A wins when
    it is brighter; pairs closer than 0.05 are ties. Items look like a latent cache's (no text)."""
    g = torch.Generator().manual_seed(seed)
    items, targets = [], []
    for _ in range(n):
        lat = [torch.randn(SHAPE, generator=g) * 0.5 + (torch.rand((), generator=g) * 2 - 1) for _ in range(2)]
        ma, mb = float(lat[0].mean()), float(lat[1].mean())
        label = 0.5 if abs(ma - mb) < 0.05 else float(ma > mb)
        items.append({"latents_a": lat[0], "latents_b": lat[1], "prompt": "x", "label": label})
        targets.append([[ma], [mb]])
    return items, (torch.tensor(targets) if with_targets else None)


def config(tmp_path, name="run", **kw):
    base = {"output_dir": str(tmp_path / name), "dims": ("VQ",), "conditioning": "none", "trunk": "conv",
            "hidden": 16, "depth": 2, "time_dim": 16, "batch_size": 16, "lr": 3e-3, "max_steps": 4,
            "checkpoint_every": 0, "log_every": 1, "target_norm": "none"}
    base.update(kw)
    return LatentRewardTrainConfig(**quiet(**base))


# ------------------------------------------------------------------------------------------ the loss
def test_loss_equals_the_btt_and_mse_formulas_on_a_tiny_batch(adapter, tmp_path):
    items, targets = brightness_pairs(3, seed=0, with_targets=True)
    items[0]["label"], items[1]["label"], items[2]["label"] = 1.0, 0.0, 0.5
    cfg = config(tmp_path, objective="both", pair_weight=0.7, distill_weight=0.3, theta=4.0, batch_size=3)
    trainer = LatentRewardTrainer(adapter, cfg, LatentRewardPairs(items, ("VQ",), targets=targets))
    batch = trainer.collate_fn([trainer.train_dataset[i] for i in range(3)])
    state = trainer.generator.get_state()
    loss, metrics = trainer.compute_loss(batch)

    # independently: the same draws (noise first, then uniform t), the same noise and t for A and B
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    a = torch.stack([it["latents_a"] for it in items])
    b = torch.stack([it["latents_b"] for it in items])
    eps = torch.randn(a.shape, generator=g)
    t = flow.sample_timesteps(3, "uniform", generator=g)
    assert torch.equal(trainer.last_timesteps, t)
    with torch.no_grad():
        ra = trainer.model((1 - t).view(-1, 1, 1, 1) * a + t.view(-1, 1, 1, 1) * eps, t)["VQ"].double()
        rb = trainer.model((1 - t).view(-1, 1, 1, 1) * b + t.view(-1, 1, 1, 1) * eps, t)["VQ"].double()
    d, lt = ra - rb, math.log(4.0)

    def logsig(x):
        return -torch.log1p(torch.exp(-x))

    btt = torch.stack([-logsig(d[0] - lt), -logsig(-d[1] - lt),
                       -(logsig(d[2] - lt) + logsig(-d[2] - lt) + math.log(4.0 ** 2 - 1))]).mean()
    mse = ((ra - targets[:, 0, 0].double()) ** 2 + (rb - targets[:, 1, 0].double()) ** 2).sum() / 6
    assert float(loss.detach()) == pytest.approx(float(0.7 * btt + 0.3 * mse), rel=1e-5)
    assert float(metrics["pairs/loss"]) == pytest.approx(float(btt), rel=1e-5)
    assert float(metrics["distill/mse"]) == pytest.approx(float(mse), rel=1e-5)


def test_labels_per_dimension_or_overall_and_masked_targets():
    assert pair_label_row(1.0, None, ("VQ", "TA"), None) == [1.0, 1.0]
    row = pair_label_row(0.0, None, ("Overall", "TA"), ("Overall",))
    assert row[0] == 0.0 and math.isnan(row[1])
    row = pair_label_row(1.0, {"VQ": 0.5, "MQ": 0.0}, ("VQ", "TA"), None)  # per-dimension labels win
    assert row[0] == 0.5 and math.isnan(row[1])
    scores = torch.tensor([[[1.0, 10.0], [3.0, 30.0]], [[5.0, 50.0], [7.0, 70.0]]])
    z, stats = standardize_targets(scores, ("VQ", "TA"), "standardize")
    assert stats["VQ"]["mean"] == pytest.approx(4.0) and stats["TA"]["std"] == pytest.approx(math.sqrt(500))
    assert abs(float(z[..., 0].mean())) < 1e-6 and float(z[..., 1].std(unbiased=False)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ learning
def test_noise_aware_training_learns_brightness_through_the_noise(adapter, tmp_path):
    train, _ = brightness_pairs(512, seed=1)
    heldout, _ = brightness_pairs(256, seed=2)
    cfg = config(tmp_path, max_steps=150, batch_size=32, objective="pairs", loss="btt", lr_scheduler="cosine",
                 warmup_steps=10)
    trainer = LatentRewardTrainer(adapter, cfg, train)
    before = evaluate_latent_reward(trainer.model, adapter, heldout, (0.0, 0.5, 0.75))
    trainer.train()
    after = evaluate_latent_reward(trainer.model, adapter, heldout, (0.0, 0.5, 0.75))
    acc = {t: after["accuracy"]["VQ"][t]["labels_independent"] for t in ("0", "0.5", "0.75")}
    assert acc["0.5"] > 0.85 and acc["0"] > 0.85, acc  # each item noised on its own: no shared-noise help
    assert acc["0.75"] > 0.7, acc  # a quarter of the signal left, still clearly above chance
    assert acc["0.5"] > before["accuracy"]["VQ"]["0.5"]["labels_independent"] + 0.2
    # the clean-latent ablation (t = 0 only) ranks noisy latents worse
    clean = LatentRewardTrainer(adapter, config(tmp_path, name="clean", max_steps=150, batch_size=32,
                                                objective="pairs", lr_scheduler="cosine", warmup_steps=10,
                                                noise_aware=False), train)
    clean.train()
    clean_acc = evaluate_latent_reward(clean.model, adapter, heldout, (0.75,))["accuracy"]["VQ"]["0.75"]
    assert acc["0.75"] > clean_acc["labels_independent"] + 0.1, (acc, clean_acc)
    saved = LatentRewardModel.from_pretrained(tmp_path / "run" / "latent_reward", latent_space=latent_space_id(adapter),
                                              latent_shape=SHAPE)
    x = torch.randn(2, *SHAPE)
    assert torch.allclose(saved(x, torch.tensor([0.3, 0.6]))["VQ"], trainer.model.eval()(x, torch.tensor([0.3, 0.6]))["VQ"],
                          atol=1e-6)
    assert saved.config.extra["training"]["noise_aware"] is True


def test_clean_training_only_sees_t_zero_and_clean_latents(adapter, tmp_path):
    items, targets = brightness_pairs(64, seed=3, with_targets=True)
    cfg = config(tmp_path, noise_aware=False, objective="distill", max_steps=3)
    trainer = LatentRewardTrainer(adapter, cfg, LatentRewardPairs(items, ("VQ",), targets=targets))
    seen = []
    forward = trainer.model.forward

    def spy(x, t, cond=None):
        seen.append((x.detach().clone(), torch.as_tensor(t).detach().clone()))
        return forward(x, t, cond)

    trainer.model.forward = spy
    trainer.train()
    assert len(seen) == 3
    pool = torch.stack([it[k] for it in items for k in ("latents_a", "latents_b")]).flatten(1)
    for x, t in seen:
        assert torch.equal(t, torch.zeros_like(t))
        # every scored latent is one of the clean items, exactly
        dist = (x.flatten(1)[:, None] - pool[None]).abs().amax(-1).min(dim=1).values
        assert float(dist.max()) == 0.0
    noisy = LatentRewardTrainer(adapter, config(tmp_path, name="noisy", objective="distill", max_steps=1),
                                LatentRewardPairs(items, ("VQ",), targets=targets))
    noisy.train()
    assert bool((noisy.last_timesteps > 0).all())


# ------------------------------------------------------------------------------------------ resume
def test_resume_is_exact(adapter, tmp_path):
    items, targets = brightness_pairs(64, seed=4, with_targets=True)
    common = {"objective": "both", "max_steps": 6, "checkpoint_every": 3, "lr_scheduler": "cosine",
              "weight_decay": 0.01, "batch_size": 8}

    def trainer(name, **kw):
        return LatentRewardTrainer(adapter, config(tmp_path, name=name, **common, **kw),
                                   LatentRewardPairs(items, ("VQ",), targets=targets))

    straight = trainer("a")
    straight.train()
    first = trainer("b")
    assert first.train(stop_at_step=3).step == 3
    resumed = trainer("b", resume="latest")
    assert resumed.train().step == 6
    a, b = dict(straight.named_trainable), dict(resumed.named_trainable)
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert (tmp_path / "b" / "checkpoint-3" / "latent_reward" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ errors
def test_bad_configs_are_named(adapter, tmp_path):
    for kw, key in [({"objective": "clip"}, "objective"), ({"dims": ("VQ", "VQ")}, "dims"),
                    ({"pair_dims": ("MQ",)}, "pair_dims"), ({"theta": 1.0}, "theta"), ({"loss": "mse"}, "loss"),
                    ({"timestep_sampling": "beta"}, "timestep_sampling"), ({"eval_timesteps": (0.5, 1.0)}, "eval_timesteps"),
                    ({"trunk": "unet"}, "trunk"), ({"distill_weight": -1.0}, "distill_weight"),
                    ({"objective": "both", "pair_weight": 0.0, "distill_weight": 0.0}, "pair_weight")]:
        with pytest.raises(ConfigError, match=key):
            LatentRewardTrainConfig(**kw)
    with pytest.raises(ConfigError, match="nois_aware"):
        load_config(LatentRewardTrainConfig, None, ["nois_aware=false"])
    items, _ = brightness_pairs(8, seed=5)
    with pytest.raises(ConfigError, match="teacher"):
        LatentRewardTrainer(adapter, config(tmp_path, objective="distill"), items)
    with pytest.raises(ConfigError, match="data"):
        LatentRewardTrainer.from_config(LatentRewardTrainConfig(**quiet()))
    cfg = load_config(LatentRewardTrainConfig, recipe_path("latent_reward_world"), ["data=x"])
    assert cfg.noise_aware and cfg.dims == ("VQ", "TA") and cfg.model == "world"


# ------------------------------------------------------------------------------------------ the world
@pytest.fixture(scope="module")
def world_pairs(tmp_path_factory):
    """A few world pairs written like `genalign world pairs` (parquet with oracle_<dim>_0/1 columns): the render
    of the prompt against a miscaptioned or degraded render."""
    from genalign.world.annotators import Annotator, label_image_pairs, write_pickapic_parquet
    from genalign.world.grammar import image_splits
    from genalign.world.render import render_image, to_uint8

    rng = random.Random(0)
    prompts = [rng.choice(image_splits().train) for _ in range(12)]
    a = np.stack([to_uint8(render_image(p, i)) for i, p in enumerate(prompts)])
    b = np.stack([to_uint8(render_image(rng.choice(image_splits().train), 100 + i)) for i in range(12)])
    root = tmp_path_factory.mktemp("world-pairs")
    return write_pickapic_parquet(label_image_pairs(a, b, prompts, Annotator(noise=0.0)), root / "pairs.parquet")


def test_world_distill_targets_come_from_the_oracle_columns_or_the_oracle_itself(world_pairs, tmp_path):
    from genalign.data import load_preference_pairs

    pairs = load_preference_pairs(world_pairs, tie_policy="half")
    cols = oracle_column_scores(pairs, ("VQ", "TA"))
    assert cols is not None and cols.shape == (12, 2, 2)
    common = ["model=world", f"data={world_pairs}", "max_steps=2", "batch_size=4", "objective=distill",
              "checkpoint_every=0", "progress_bar=false", "report_to=none", "num_threads=1", "hidden=8", "depth=1"]
    by_columns = LatentRewardTrainer.from_config(load_config(
        LatentRewardTrainConfig, recipe_path("latent_reward_world"), common + [f"output_dir={tmp_path / 'c'}"]))
    by_oracle = LatentRewardTrainer.from_config(load_config(
        LatentRewardTrainConfig, recipe_path("latent_reward_world"),
        common + [f"output_dir={tmp_path / 'o'}", "teacher=oracle", "preload=false"]))
    t_cols, t_oracle = by_columns.train_dataset.targets, by_oracle.train_dataset.targets
    expected, _ = standardize_targets(cols, ("VQ", "TA"), "standardize")
    assert torch.allclose(t_cols, expected) and torch.allclose(t_oracle, expected, atol=1e-6)
    assert by_columns.model.conditioning == "cond" and by_columns.model.latent_shape == (4, 16, 16)
    assert by_columns.model.config.extra["distill_targets"]["source"] == "oracle columns"


def test_command_trains_saves_and_evaluates_on_world_pairs(world_pairs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert train_main(["--help-config"]) == 0
    assert "noise_aware" in capsys.readouterr().out
    code = train_main([f"data={world_pairs}", f"eval_data={world_pairs}", f"output_dir={out}", "max_steps=3",
                       "batch_size=4", "hidden=8", "depth=1", "progress_bar=false", "report_to=none", "num_threads=1",
                       "eval_timesteps=0,0.5"])
    assert code == 0
    text = capsys.readouterr().out
    assert "latent reward model at" in text and "t=0.5" in text
    import json

    result = json.loads((out / "eval" / "latent_reward_eval.json").read_text())
    assert set(result["accuracy"]) == {"VQ", "TA"} and set(result["accuracy"]["TA"]) == {"0", "0.5"}
    assert result["accuracy"]["TA"]["0"]["oracle_pairs"] > 0
    from genalign.cli import main as cli_main

    assert cli_main(["train", "latent-reward", "objective=foo"]) == 2
    assert "objective" in capsys.readouterr().err


def test_on_a_latent_cache_the_text_encoders_are_released_and_the_run_is_unchanged(world_pairs, tmp_path):
    """`from_config` on a latent cache with the prompts' embeddings (train and eval) drops the generator's text
    encoders (the model's text width comes from a cached item), and trains exactly as with them kept; a model
    that reads no text releases them on pixel data too."""
    from genalign.data import build_cache, load_cache, load_preference_pairs
    from genalign.models import load_adapter
    from genalign.world import resolve_model

    model_path, extra, _ = resolve_model("world")
    cache = str(tmp_path / "cache")
    build_cache(load_adapter(model_path, **extra), load_preference_pairs(world_pairs, tie_policy="half"), cache,
                resolution=32, progress=False)
    common = [f"data={cache}", f"eval_data={cache}", "objective=pairs", "preload=false", "max_steps=3",
              "batch_size=4", "hidden=8", "depth=1", "checkpoint_every=0", "log_every=1", "progress_bar=false",
              "report_to=none", "num_threads=1"]
    cfg = load_config(LatentRewardTrainConfig, recipe_path("latent_reward_world"),
                      common + [f"output_dir={tmp_path / 'released'}"])
    released = LatentRewardTrainer.from_config(cfg)
    assert released.adapter.released_text_encoders and released.adapter.text_encoders() == []
    assert released.model.conditioning == "cond"
    released.train()
    kept_adapter = load_adapter(model_path, **extra)
    kept_cfg = load_config(LatentRewardTrainConfig, recipe_path("latent_reward_world"),
                           common + [f"output_dir={tmp_path / 'kept'}"])
    kept = LatentRewardTrainer(kept_adapter, kept_cfg, load_cache(cache, adapter=kept_adapter, resolution=32))
    assert kept.model.config.cond_dim == released.model.config.cond_dim > 0  # the encoder's width, both ways
    kept.train()
    import json

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]

    assert len(losses("released")) == 3 and losses("released") == pytest.approx(losses("kept"), abs=1e-6)
    untexted = LatentRewardTrainer.from_config(load_config(
        LatentRewardTrainConfig, recipe_path("latent_reward_world"),
        [f"data={world_pairs}", "conditioning=none", "max_steps=1", "batch_size=4", "hidden=8", "depth=1",
         "progress_bar=false", "report_to=none", "num_threads=1", f"output_dir={tmp_path / 'none'}"]))
    assert untexted.model.conditioning == "none" and untexted.adapter.text_encoders() == []


@pytest.mark.parametrize("trunk", ["mlp", "transformer"])
def test_other_trunks_train_with_the_prompt_encoding(trunk, adapter, tmp_path):
    items, targets = brightness_pairs(16, seed=6, with_targets=True)
    shape = adapter.latent_shape(32, 32)
    for it in items:  # the tiny generator's own latent size (the transformer trunk patchifies it)
        it["latents_a"], it["latents_b"] = it["latents_a"].repeat(1, 2, 2), it["latents_b"].repeat(1, 2, 2)
    cfg = config(tmp_path, trunk=trunk, num_blocks=1, conditioning="cond", objective="both", max_steps=2,
                 batch_size=4)
    trainer = LatentRewardTrainer(adapter, cfg, LatentRewardPairs(items, ("VQ",), targets=targets))
    assert trainer.model.conditioning == "cond" and trainer.model.latent_shape == shape
    result = trainer.train()
    assert math.isfinite(result.last_metrics["loss"])
    loaded = LatentRewardModel.from_pretrained(result.final_model_dir, latent_space=latent_space_id(adapter),
                                               latent_shape=shape)
    cond = adapter.encode_prompt(["x", "x"])
    x, t = torch.randn(2, *shape), torch.tensor([0.2, 0.7])
    assert torch.allclose(loaded(x, t, cond)["VQ"], trainer.model.eval()(x, t, cond)["VQ"], atol=1e-5)


def test_shipped_world_latent_reward_models_load_and_match_their_build_record():
    import json

    from genalign.cli import load_model
    from genalign.world import ASSETS, WorldModelMissing, latent_reward_path

    adapter = load_model(None, "image")[0]
    space, shape = latent_space_id(adapter), adapter.latent_shape(32, 32)
    stats = json.loads((ASSETS / "BUILD.json").read_text())["latent-reward"]["stats"]
    assert stats["command"].startswith("genalign world build --only latent-reward")
    cond = adapter.encode_prompt(["two red circles", "blue square"])
    for clean, limit, name in ((False, 2_000_000, "noise_aware"), (True, 1_000_000, "clean")):
        path = latent_reward_path("image", clean=clean)
        assert sum(f.stat().st_size for f in path.iterdir()) < limit
        model = LatentRewardModel.from_pretrained(path, latent_space=space, latent_shape=shape)
        assert model.dims == ("VQ", "TA") and model.conditioning == "cond"
        assert model.config.extra["training"]["noise_aware"] is not clean
        scores = model(torch.randn(2, *shape), torch.tensor([0.5, 0.5]), cond)
        assert all(bool(torch.isfinite(s).all()) for s in scores.values())
        assert stats[name]["shipped"] == path.name
    acc = {name: stats[name]["accuracy"] for name in ("noise_aware", "clean")}
    for d in ("VQ", "TA"):  # the record: the noise-aware model keeps ranking through the noise, the clean one not
        assert acc["noise_aware"][d]["0.5"]["oracle"] > 0.7
        assert acc["noise_aware"][d]["0.75"]["oracle"] > acc["clean"][d]["0.75"]["oracle"] + 0.1
    with pytest.raises(WorldModelMissing):
        latent_reward_path("video")
