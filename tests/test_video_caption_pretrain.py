"""Stage 0 of the world's VideoReward: caption pretraining of the tiny Qwen2-VL (genalign.world.video_caption_pretrain)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genalign.world.grammar import split_prompts
from genalign.world.oracle import judge_video
from genalign.world.video_caption_pretrain import (
    CaptionedClips,
    CollateClips,
    VideoCaptionConfig,
    VideoCaptionTrainer,
    caption_log_likelihood,
    caption_token_log_probs,
    with_attribute,
)

TINY = {"video_hidden_size": 32, "video_layers": 1, "video_vision_width": 16, "video_vision_depth": 1}


def tiny_model(seed=0):
    return VideoCaptionConfig(**TINY).build_world_video_reward(seed, VideoCaptionConfig().reward_settings())


def test_caption_log_probs_are_next_token_log_softmax_over_the_tied_embeddings():
    """Each caption token's log-probability: the hidden state one position before it, times the input embedding
    table, log-softmaxed; the caption tokens located independently (just before the template's closing text)."""
    model = tiny_model()
    captions = ["red circle moving left", "magenta triangle moving still"]
    clips = torch.rand(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    log_probs, rows = caption_token_log_probs(model, clips, captions)

    hidden, text = model.last_hidden_states(list(clips), captions)
    embeddings = model.base_model.get_input_embeddings().weight
    after_prompt = model._template_parts[2]
    ta_offset = after_prompt.index(model.reward_token_ids["TA"])
    expected = []
    for i, caption in enumerate(captions):
        ids = model.tokenizer(caption, add_special_tokens=False)["input_ids"]
        end = int(text["positions"]["TA"][i]) - ta_offset
        start = end - len(ids)
        assert text["input_ids"][i, start:end].tolist() == ids
        logits = hidden[i, start - 1:end - 1] @ embeddings.T
        expected.append(-F.cross_entropy(logits, torch.tensor(ids), reduction="none"))
    assert rows.tolist() == [i for i, e in enumerate(expected) for _ in e]
    assert torch.allclose(log_probs, torch.cat(expected), atol=1e-5)
    summed = caption_log_likelihood(model, clips, captions, batch_size=1)
    assert torch.allclose(summed, torch.stack([e.sum() for e in expected]).detach(), atol=1e-5)


def test_captioned_clips_are_seeded_train_split_renders_that_show_their_caption():
    clips = CaptionedClips(12, seed=3, motion_flaws=0.0, degraded=0.0, autoencoder=0.5)
    train = set(split_prompts("video", "train"))
    items = [clips[i] for i in range(12)]
    assert all(it["caption"] in train for it in items)
    assert all(np.array_equal(it["clip"], clips[i]["clip"]) for i, it in enumerate(items))  # per-index seed
    assert items[0]["clip"].dtype == np.uint8 and items[0]["clip"].shape == (8, 32, 32, 3)
    assert len({it["caption"] for it in items}) > 1 and 0 < sum(it["autoencode"] for it in items) < 12
    for it in items:  # clean renders: the oracle reads colour, shape and direction as the caption says
        assert judge_video(it["clip"], it["caption"]).TA == 1.0, it["caption"]
    other_seed = CaptionedClips(12, seed=4)
    assert not np.array_equal(other_seed[0]["clip"], items[0]["clip"])


def test_collate_round_trips_only_the_flagged_clips_frame_by_frame():
    from genalign.world.clip_pretrain import autoencoder_round_trip, load_world_autoencoder

    vae = load_world_autoencoder()
    clips = CaptionedClips(4, seed=0, autoencoder=0.0)
    items = [clips[i] for i in range(4)]
    items[1]["autoencode"] = True
    batch = CollateClips(vae)(items)
    assert batch["pixels"].shape == (4, 8, 3, 32, 32) and batch["captions"] == [it["caption"] for it in items]
    as_uint8 = (batch["pixels"] * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    assert np.array_equal(as_uint8[0], items[0]["clip"]) and np.array_equal(as_uint8[2], items[2]["clip"])
    assert np.array_equal(as_uint8[1], autoencoder_round_trip(items[1]["clip"], vae))
    assert not np.array_equal(as_uint8[1], items[1]["clip"])
    with pytest.raises(ValueError, match="no autoencoder"):
        CollateClips(None)(items)


def test_with_attribute_changes_one_thing():
    assert with_attribute("red circle moving left", "color", "blue") == "blue circle moving left"
    assert with_attribute("red circle moving left", "shape", "cross") == "red cross moving left"
    assert with_attribute("red circle moving left", "direction", "still") == "red circle moving still"
    with pytest.raises(ValueError, match="unknown attribute"):
        with_attribute("red circle moving left", "size", "big")


def test_config_rejects_bad_shares():
    from genalign.config import ConfigError

    with pytest.raises(ConfigError, match="'autoencoder'"):
        VideoCaptionConfig(autoencoder=1.5)
    with pytest.raises(ConfigError, match="'clips'"):
        VideoCaptionConfig(clips=-1)


def test_trainer_lowers_the_caption_loss_and_writes_a_video_reward_folder(tmp_path):
    """A tiny run: the caption loss falls, the head (the reward stages' part) is untouched, the folder loads as a
    VideoReward with the trained weights, and the caption check is logged."""
    from genalign.rewards import load_reward_model

    cfg = VideoCaptionConfig(output_dir=str(tmp_path / "run"), max_steps=40, batch_size=8, lr=3e-3, warmup_steps=5,
                             log_every=10, checkpoint_every=20, autoencoder=0.25, eval_clips=4, report_to="none",
                             progress_bar=False, **TINY)
    trainer = VideoCaptionTrainer.from_config(cfg)
    head_before = trainer.model.head.weight.detach().clone()
    result = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(trainer.model.head.weight, head_before)
    check = records[-1]
    assert set(check) == {"step", "caption_check/color", "caption_check/shape", "caption_check/direction",
                          "caption_check/n"}
    assert check["caption_check/n"] == 4 and all(0 <= check[f"caption_check/{a}"] <= 1
                                                 for a in ("color", "shape", "direction"))
    loaded = load_reward_model(result.final_model_dir)
    assert loaded.kind == "video_reward" and loaded.training_fps == 8.0
    for (name, p), (_, q) in zip(trainer.model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


def test_cluttered_clips_keep_the_prompts_object_the_largest_and_their_caption():
    """`render_cluttered_video`: smaller distractors of other colours, frames without the prompt's object; the
    oracle, which reads the largest object of each frame, still finds the caption in most of them."""
    from genalign.world.grammar import COLORS
    from genalign.world.render import render_cluttered_video, render_video

    prompt = "red circle moving left"
    clip = render_cluttered_video(prompt, 0, distractors=2, dropped_frames=2)
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.float32
    assert np.array_equal(clip, render_cluttered_video(prompt, 0, distractors=2, dropped_frames=2))
    red = np.asarray(COLORS["red"], dtype=np.float32)
    red_pixels = (np.abs(clip - red).max(axis=-1) < 0.05).sum(axis=(1, 2))
    assert (red_pixels == 0).sum() == 2  # two frames without the prompt's object
    other = ~(np.abs(clip - red).max(axis=-1) < 0.05) & (np.abs(clip - clip[:, :1, :1]).max(axis=-1) > 0.3)
    assert other.any()  # distractors of other colours
    # without distractors and dropped frames it is the clean render of the same seed
    assert np.array_equal(render_cluttered_video(prompt, 0, distractors=0, dropped_frames=0), render_video(prompt, 0))
    clips = CaptionedClips(60, seed=1, cluttered=1.0, degraded=0.0, autoencoder=0.0)
    agree = [judge_video(clips[i]["clip"], clips[i]["caption"]).TA == 1.0 for i in range(60)]
    assert np.mean(agree) >= 0.75
    # cluttered = 0 draws nothing extra: the clips of runs made before the option are unchanged
    before = CaptionedClips(3, seed=2)
    assert all(np.array_equal(before[i]["clip"], CaptionedClips(3, seed=2, cluttered=0.0)[i]["clip"]) for i in range(3))
