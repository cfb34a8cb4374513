"""The world CLIP's pretraining (genalign.world.clip_pretrain, genalign.losses.clip_contrastive_loss): the
InfoNCE loss against an independent formula, the caption pool, and a short run that saves a CLIP folder the
reward trainer fine-tunes."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genalign.losses import clip_contrastive_loss
from genalign.world.clip_pretrain import (
    CLIPPretrainConfig,
    CLIPPretrainTrainer,
    autoencoder_round_trip,
    collate_caption_groups,
    hard_negative_prompt,
    make_caption_pool,
)
from genalign.world.grammar import image_splits, parse_prompt


def unit(n, e, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)


def reference_infonce(img, txt, scale, image_caption, positive):
    """Plain-Python symmetric InfoNCE with multi-positive text -> image targets."""
    n, m = len(img), len(txt)
    logits = [[scale * sum(a * b for a, b in zip(img[i], txt[j])) for j in range(m)] for i in range(n)]
    i2t = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(v) for v in logits[i]))
        i2t += lse - logits[i][image_caption[i]]
    i2t /= n
    t2i, rows = 0.0, 0
    for j in range(m):
        pos = [i for i in range(n) if positive[j][i]]
        if not pos:
            continue
        lse = math.log(sum(math.exp(logits[i][j]) for i in range(n)))
        t2i += sum(lse - logits[i][j] for i in pos) / len(pos)
        rows += 1
    return 0.5 * (i2t + t2i / rows)


def test_infonce_with_one_image_per_caption_is_clips_symmetric_cross_entropy():
    img, txt = unit(6, 8, 0), unit(6, 8, 1)
    loss, stats = clip_contrastive_loss(img, txt, torch.tensor(math.log(10.0)))
    logits = 10.0 * img @ txt.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.item() == pytest.approx(reference_infonce(img.tolist(), txt.tolist(), 10.0, list(range(6)),
                                                          torch.eye(6, dtype=torch.bool).tolist()), rel=1e-6)
    assert 0.0 <= stats["i2t_accuracy"].item() <= 1.0


def test_infonce_multi_positive_and_quality_negatives_match_the_formula():
    # 5 images, 3 captions: images 0 and 1 show caption 0, image 2 caption 1, images 3 and 4 caption 2;
    # image 1 is a degraded copy: a picture of caption 0 but not a text -> image positive of it
    img, txt = unit(5, 8, 2), unit(3, 8, 3)
    image_caption = torch.tensor([0, 0, 1, 2, 2])
    positive = (image_caption[None, :] == torch.arange(3)[:, None]).clone()
    positive[0, 1] = False
    loss, _ = clip_contrastive_loss(img, txt, torch.tensor(math.log(7.0)), image_caption, positive)
    want = reference_infonce(img.tolist(), txt.tolist(), 7.0, image_caption.tolist(), positive.tolist())
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # the degraded copy is a negative of its caption in the text -> image direction only: the loss falls as the
    # copy moves away from the caption
    moved = img.clone()
    moved[1] = F.normalize(img[1] - 0.5 * txt[0], dim=-1)
    lower, _ = clip_contrastive_loss(moved, txt, torch.tensor(math.log(7.0)), image_caption, positive)
    assert reference_infonce(moved.tolist(), txt.tolist(), 7.0, image_caption.tolist(), positive.tolist()) == \
        pytest.approx(lower.item(), rel=1e-6)


def test_infonce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="image_caption"):
        clip_contrastive_loss(unit(4, 8, 0), unit(3, 8, 1), 0.0)


def test_autoencoder_round_trip_keeps_a_render_and_refuses_float_pixels():
    from genalign.world.clip_pretrain import load_world_autoencoder
    from genalign.world.oracle import judge_image
    from genalign.world.render import render_image, to_uint8

    prompt = "red circle left of blue square"
    image = render_image(prompt, 0)
    vae = load_world_autoencoder()
    (back,) = autoencoder_round_trip(to_uint8(image)[None], vae)
    assert back.dtype == np.uint8 and judge_image(back, prompt).TA == 1.0
    with pytest.raises(ValueError, match="takes uint8 pixels, got float32"):
        autoencoder_round_trip(image[None], vae)  # read as uint8 these would be near-black pixels


def test_hard_negatives_change_one_thing_and_stay_in_the_allowed_split():
    train = image_splits().train
    allowed = set(train)
    rng = random.Random(0)
    for prompt in random.Random(1).sample(train, 60):
        other = hard_negative_prompt(prompt, rng, allowed)
        assert other != prompt and other in allowed
        assert parse_prompt(other).template == parse_prompt(prompt).template


def test_caption_pool_uses_train_prompts_and_collates_for_the_loss():
    pool = make_caption_pool(40, seed=3, autoencoder=0.0, quality_negatives=0.5, degraded=0.2)
    again = make_caption_pool(40, seed=3, autoencoder=0.0, quality_negatives=0.5, degraded=0.2)
    assert np.array_equal(pool.images, again.images) and pool.captions == again.captions  # seeded
    assert len(pool) == 40 and pool.images.shape[1:] == (32, 32, 3)
    assert set(pool.captions) <= set(image_splits().train)  # wrong_caption=0: every caption is a train prompt
    assert (~pool.positive).any() and pool.positive.sum() >= 80  # renders + hard negatives, some degraded copies
    batch = collate_caption_groups([pool.group(g) for g in range(8)])
    n, m = len(batch["pixels"]), len(batch["captions"])
    assert batch["pixels"].shape == (n, 3, 32, 32) and 0 <= batch["pixels"].min() and batch["pixels"].max() <= 1
    assert len(set(batch["captions"])) == m and batch["text_positive"].shape == (m, n)
    loss, _ = clip_contrastive_loss(unit(n, 8, 0), unit(m, 8, 1), 0.0, batch["image_caption"],
                                    batch["text_positive"])
    assert torch.isfinite(loss)


def test_composition_negatives_are_flawed_twins_of_clean_renders_the_oracle_marks_down():
    """composition_negatives=1: every clean render is followed by a text -> image negative with its caption: the
    same background and layout with an object missing, added or merged (the oracle's TA lower, its object count
    off by one); 0 leaves the pool exactly as it was."""
    from genalign.world.oracle import analyze_image, judge

    base = make_caption_pool(30, seed=4, autoencoder=0.0, degraded=0.0, quality_negatives=0.0)
    pool = make_caption_pool(30, seed=4, autoencoder=0.0, degraded=0.0, quality_negatives=0.0, composition_negatives=1.0)
    assert len(pool.images) == 2 * len(base.images)  # one twin per render, hard negatives' included
    twins = np.flatnonzero(~pool.positive)
    assert len(twins) == len(base.images) and pool.positive[twins - 1].all()
    np.testing.assert_array_equal(pool.images[twins - 1], base.images)  # the renders themselves are unchanged
    for k in twins:
        clean, twin, caption = pool.images[k - 1], pool.images[k], pool.captions[k]
        assert pool.captions[k - 1] == caption
        np.testing.assert_array_equal(clean[0, 0], twin[0, 0])  # same background
        assert judge(twin, caption).TA < judge(clean, caption).TA
        assert abs(len(analyze_image(twin).objects) - len(analyze_image(clean).objects)) == 1
    same = make_caption_pool(30, seed=4, autoencoder=0.0, degraded=0.0, quality_negatives=0.0, composition_negatives=0.0)
    np.testing.assert_array_equal(same.images, base.images)


def test_flawed_renders_differ_from_the_render_in_the_flaw_only():
    from genalign.world.render import render_flawed_image, render_image

    clean = render_image("red circle left of blue square", 7)
    for flaw in ("missing", "extra", "merged"):
        twin = render_flawed_image("red circle left of blue square", 7, flaw)
        changed = np.abs(twin - clean).max(axis=-1) > 0.01
        assert 0 < changed.mean() < 0.5, flaw  # one object's worth of pixels, not a new picture
    with pytest.raises(ValueError, match="nothing to merge"):
        render_flawed_image("red circle", 0, "merged")
    with pytest.raises(ValueError, match="unknown flaw"):
        render_flawed_image("red circle", 0, "blurry")


def test_pool_does_not_depend_on_the_number_of_workers(monkeypatch):
    import genalign.world.clip_pretrain as cp

    monkeypatch.setattr(cp, "CHUNK_GROUPS", 10)  # 3 chunks (split in the parent process)
    one = make_caption_pool(30, seed=5, autoencoder=0.0, workers=1)
    two = make_caption_pool(30, seed=5, autoencoder=0.0, workers=2)
    assert np.array_equal(one.images, two.images) and one.captions == two.captions


@pytest.mark.parametrize("image_tower", ["vit", "resnet"])
def test_short_pretraining_lowers_the_loss_and_saves_a_clip_folder_the_reward_trainer_loads(tmp_path, image_tower):
    from genalign.rewards import CLIPReward, load_reward_model

    from genalign.trainers.reward import RewardTrainConfig, build_reward_model

    sizes = {"clip_width": 32, "clip_layers": 2, "clip_heads": 2, "clip_patch_size": 8, "clip_projection_dim": 16,
             "clip_image_tower": image_tower, "clip_resnet_width": 8}
    cfg = CLIPPretrainConfig(output_dir=str(tmp_path / "run"), max_steps=40, batch_size=16, pool_groups=64,
                             lr=2e-3, warmup_steps=5, autoencoder=0.5, eval_images=16, report_to="none",
                             progress_bar=False, log_every=5, checkpoint_every=0, **sizes)
    trainer = CLIPPretrainTrainer.from_config(cfg)
    result = trainer.train()
    losses = [r["loss"] for r in map(__import__("json").loads, (tmp_path / "run" / "metrics.jsonl").read_text()
                                                              .splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] - 0.1  # it learns (on its pool)
    folder = result.final_model_dir
    weights = "model.safetensors" if image_tower == "vit" else "open_clip_model.safetensors"  # open_clip's local-dir
    assert (folder / weights).is_file() and (folder / "tokenizer.json").is_file()
    assert set(trainer.zero_shot) == {"caption", "image", "quality", "n"}
    model = load_reward_model(folder)
    assert isinstance(model, CLIPReward) and model.crop_size == (32, 32)
    assert model.backend == ("transformers" if image_tower == "vit" else "open_clip")
    # the reward trainer's model=<a CLIP folder> path (PickScore's stage 2) starts from these weights
    reward = build_reward_model(RewardTrainConfig(kind="pickscore", model=str(folder)))
    torch.testing.assert_close(reward.clip.logit_scale, trainer.model.clip.logit_scale.cpu())
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["red circle", "two blue squares", "green triangle left of yellow star"]
    with torch.no_grad():
        torch.testing.assert_close(reward(pixels, prompts), trainer.model.cpu().eval()(pixels, prompts))


def test_a_larger_resolution_resizes_the_renders_inside_the_model_and_is_checked(tmp_path):
    from genalign.rewards import load_reward_model
    from genalign.rewards.clip_reward import resize_shortest_and_center_crop

    from genalign.config import ConfigError

    sizes = {"clip_width": 32, "clip_layers": 2, "clip_heads": 2, "clip_projection_dim": 16, "clip_resnet_width": 8}
    cfg = CLIPPretrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=8, pool_groups=16,
                             warmup_steps=1, autoencoder=0.0, eval_images=0, report_to="none", progress_bar=False,
                             checkpoint_every=0, resolution=64, **sizes)
    trainer = CLIPPretrainTrainer.from_config(cfg)
    batch = collate_caption_groups([trainer.pool.group(g) for g in range(4)])
    assert batch["pixels"].shape[-1] == 32
    loss, _ = trainer.compute_loss(batch)
    model = trainer.model
    big = resize_shortest_and_center_crop(batch["pixels"], 64, (64, 64))
    want, _ = clip_contrastive_loss(model.encode_images(big), model.encode_text(batch["captions"]),
                                    model.clip.logit_scale, batch["image_caption"], batch["text_positive"])
    torch.testing.assert_close(loss, want)
    assert load_reward_model(trainer.train().final_model_dir).crop_size == (64, 64)
    with pytest.raises(ConfigError, match="'resolution': a multiple of 32"):
        CLIPPretrainConfig(resolution=48)
