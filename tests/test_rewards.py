"""Reward models (genalign.rewards) and their losses / metrics (genalign.losses.reward), ALGORITHMS.md section 3.

Losses and accuracies are checked against formulas written out independently in plain Python; the CLIP rewards
against the published layouts (a transformers CLIP folder like PickScore's, an open_clip architecture + state
dict like HPSv2's) written from tiny random models; VideoReward on a tiny Qwen2-VL built offline.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from genalign.rewards import (
    CLIPReward,
    RewardInputWarning,
    RewardLoadError,
    VideoReward,
    build_clip_tokenizer,
    combine_rewards,
    load_reward_model,
    tiny_clip_reward,
    tiny_video_reward,
)

from genalign.data import DataError, PreferencePair
from genalign.losses.reward import (
    accuracy_with_ties,
    accuracy_without_ties,
    bt_loss,
    btt_loss,
    pickscore_loss,
    reward_accuracy,
)

NAN = float("nan")


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------- losses
def reference_btt(delta: float, label: float, theta: float) -> float:
    """Rao-Kupper negative log-likelihood, from the probabilities themselves."""
    p_a = 1 / (1 + theta * math.exp(-delta))  # p_A / (p_A + theta p_B) with p = exp(r)
    p_b = 1 / (1 + theta * math.exp(delta))
    p_tie = (theta**2 - 1) * p_a * p_b
    return -math.log({1.0: p_a, 0.0: p_b, 0.5: p_tie}[label])


@pytest.mark.parametrize("theta", [5.0, 2.0])
def test_btt_loss_matches_the_rao_kupper_likelihood_for_wins_losses_and_ties(theta):
    g = torch.Generator().manual_seed(1)
    r_a, r_b = torch.randn(12, generator=g, dtype=torch.float64) * 3, torch.randn(12, generator=g, dtype=torch.float64)
    labels = [1.0, 0.0, 0.5] * 4
    loss, stats = btt_loss(r_a, r_b, torch.tensor(labels, dtype=torch.float64), theta=theta)
    want = [reference_btt(float(a - b), y, theta) for a, b, y in zip(r_a, r_b, labels)]
    assert torch.allclose(stats["losses"], torch.tensor(want, dtype=torch.float64), atol=1e-10)
    assert loss.item() == pytest.approx(sum(want) / len(want), abs=1e-10)
    # the three outcomes' probabilities sum to one for every delta
    for delta in (-4.0, -0.3, 0.0, 2.5):
        total = sum(math.exp(-btt_loss(torch.tensor([delta]), torch.tensor([0.0]), y, theta=theta)[0].item())
                    for y in (1.0, 0.0, 0.5))
        assert total == pytest.approx(1.0, abs=1e-6)


def test_btt_loss_masks_invalid_labels_out_of_the_mean():
    r_a = torch.tensor([2.0, -1.0, 0.3, 5.0, 0.0], requires_grad=True)
    r_b = torch.zeros(5)
    labels = torch.tensor([1.0, NAN, 0.5, 2.0, 0.0])  # NaN (missing) and 2.0 (not a label) are invalid
    loss, stats = btt_loss(r_a, r_b, labels)
    valid = [reference_btt(2.0, 1.0, 5.0), reference_btt(0.3, 0.5, 5.0), reference_btt(0.0, 0.0, 5.0)]
    assert loss.item() == pytest.approx(sum(valid) / 3, abs=1e-6)  # not sum / 5 (zeros averaged in)
    assert int(stats["num_valid"]) == 3
    loss.backward()
    assert r_a.grad[1] == 0 and r_a.grad[3] == 0 and r_a.grad[0] != 0
    # nothing valid: a zero loss that still backpropagates
    empty, _ = btt_loss(r_a, r_b, torch.full((5,), NAN))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="theta"):
        btt_loss(r_a, r_b, labels, theta=1.0)


def test_btt_loss_per_dimension_with_a_row_label_or_a_label_per_dimension():
    r_a, r_b = torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.5, 0.5]]), torch.zeros(2, 3)
    labels = torch.tensor([[1.0, 0.5, NAN], [0.0, 1.0, 0.5]])
    loss, stats = btt_loss(r_a, r_b, labels)
    entries = [(1.0, 1.0), (0.0, 0.5), (0.5, 0.0), (0.5, 1.0), (0.5, 0.5)]
    assert loss.item() == pytest.approx(sum(reference_btt(d, y, 5.0) for d, y in entries) / 5, abs=1e-6)
    assert stats["loss_per_dim"][2].item() == pytest.approx(reference_btt(0.5, 0.5, 5.0), abs=1e-6)
    row_loss, _ = btt_loss(r_a, r_b, torch.tensor([1.0, 0.0]))  # one label per pair, for every dimension
    want = [reference_btt(d, y, 5.0) for row, y in zip(r_a.tolist(), (1.0, 0.0)) for d in row]
    assert row_loss.item() == pytest.approx(sum(want) / 6, abs=1e-6)


def test_bt_loss_is_minus_log_sigmoid_with_soft_or_masked_ties():
    r_a, r_b = torch.tensor([1.5, -0.5, 0.7, 0.2]), torch.tensor([0.0, 0.0, 0.0, 0.0])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.5])
    want = [-log_sigmoid(1.5), -log_sigmoid(-0.5), -log_sigmoid(-0.7),
            -(0.5 * log_sigmoid(0.2) + 0.5 * log_sigmoid(-0.2))]
    loss, stats = bt_loss(r_a, r_b, labels)
    assert loss.item() == pytest.approx(sum(want) / 4, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # the tie does not count; pairs 2 and 3 are wrong
    masked, stats = bt_loss(r_a, r_b, labels, ties="mask")
    assert masked.item() == pytest.approx(sum(want[:3]) / 3, abs=1e-6) and int(stats["num_valid"]) == 3


def test_pickscore_loss_is_the_cross_entropy_of_the_pair_softmax_with_ties_as_half_half():
    s_a, s_b = torch.tensor([21.0, 18.5, 20.0, 19.0]), torch.tensor([19.0, 20.0, 20.5, NAN * 0 + 19.0])
    labels = torch.tensor([1.0, 0.0, 0.5, NAN])
    loss, stats = pickscore_loss(s_a, s_b, labels)
    want = []
    for a, b, y in zip(s_a.tolist()[:3], s_b.tolist()[:3], labels.tolist()[:3]):
        p_a = math.exp(a) / (math.exp(a) + math.exp(b))
        want.append(-(y * math.log(p_a) + (1 - y) * math.log(1 - p_a)))
    assert loss.item() == pytest.approx(sum(want) / 3, abs=1e-5)  # the NaN label is left out
    assert int(stats["num_valid"]) == 3


# ------------------------------------------------------------------------------------------- accuracy
def test_accuracy_without_ties_counts_only_pairs_with_a_human_winner():
    delta = [2.0, -1.0, 0.5, 0.0, -3.0, 0.1, 4.0]
    label = [1.0, 1.0, 0.0, 1.0, 0.0, 0.5, NAN]  # C, D, D, T_model, C, (human tie), (invalid)
    out = accuracy_without_ties(torch.tensor(delta), torch.tensor(label))
    assert (out["concordant"], out["discordant"], out["model_ties"]) == (2, 2, 1)
    assert out["accuracy"] == pytest.approx(2 / 5)


def test_accuracy_with_ties_picks_the_best_tie_threshold():
    # |delta| sorted: 0.05 (tie), 0.1 (tie), 0.2 (A wins, delta -0.2: wrong sign), 1.0 (A), 2.0 (B, delta -2)
    delta = torch.tensor([1.0, -0.2, 0.05, -2.0, 0.1])
    label = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.5])
    out = accuracy_with_ties(delta, label)
    # epsilon in (0.1, 0.2]: both human ties predicted as ties, then pairs 1.0 and -2.0 right, -0.2 wrong: 4/5;
    # epsilon in (0.2, 1.0] also gives 4/5 (the wrong pair becomes a tie): the smallest one is reported
    assert out["accuracy"] == pytest.approx(4 / 5)
    assert out["epsilon"] == pytest.approx(0.15)
    assert (out["tie_both"], out["correct"]) == (2, 2)
    # without any tie threshold the ties cannot be right: 2 / 5
    none = accuracy_with_ties(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]))
    assert none["accuracy"] == pytest.approx(1.0) and none["epsilon"] == pytest.approx(3.0)  # all ties
    per_dim = reward_accuracy({"VQ": torch.tensor([1.0, 0.0])}, {"VQ": torch.tensor([0.0, 1.0])},
                              {"VQ": torch.tensor([1.0, 1.0])})
    assert per_dim["VQ"]["accuracy_without_ties"] == 0.5 and per_dim["VQ"]["pairs_with_ties"] == 2


# ------------------------------------------------------------------------------------------- CLIP rewards
def images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


PROMPTS = ["red circle", "blue square left of green cross", "two yellow triangles"]


def test_clip_tokenizer_built_offline_gives_open_clip_ids():
    import open_clip

    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    reference = open_clip.get_tokenizer("ViT-B-32")
    for text in ["a photo of a red cat!", "PickScore's 2 dogs, running fast"]:
        ours = tokenizer(text)["input_ids"]
        theirs = reference([text])[0].tolist()
        assert ours == theirs[: len(ours)] and theirs[len(ours)] == 0


def test_pickscore_layout_folder_loads_and_scores_like_the_model_it_was_written_from(tmp_path):
    from transformers import CLIPImageProcessor

    reward = tiny_clip_reward(seed=3)
    clip_model, tokenizer = reward.clip, reward.tokenizer
    folder = tmp_path / "pickscore"  # PickScore's published layout: a plain transformers CLIP folder
    clip_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    assert not (folder / "genalign_reward.json").exists()

    loaded = load_reward_model(folder)
    assert isinstance(loaded, CLIPReward) and loaded.backend == "transformers"
    batch = images(3)
    scores = loaded(batch, PROMPTS)
    assert scores.shape == (3,)
    assert torch.equal(scores, reward(batch, PROMPTS))
    # independent check: the CLIPModel's own logits (exp(logit_scale) * cosine) on the processor's pixels
    pixels = CLIPImageProcessor(do_resize=False, do_center_crop=False)(batch, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        logits = clip_model(pixel_values=pixels, **tokens).logits_per_image
    assert torch.allclose(scores, logits.diagonal(), atol=1e-5)


def write_open_clip_config(tmp_path) -> Path:
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "genalign-tiny-clip.json"
    path.write_text(json.dumps(config))
    return path


def test_hpsv2_layout_open_clip_architecture_and_state_dict_scores_plain_cosine(tmp_path):
    import open_clip

    config_path = write_open_clip_config(tmp_path)
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model("genalign-tiny-clip").eval()
    checkpoint = tmp_path / "HPS_v2_tiny.pt"  # HPSv2 ships {"state_dict": ...} in a torch file
    torch.save({"state_dict": model.state_dict()}, checkpoint)

    reward = CLIPReward.from_open_clip("genalign-tiny-clip", checkpoint, model_config=config_path,
                                       use_logit_scale=False)
    batch = images(3, seed=1)
    scores = reward(batch, PROMPTS)
    # independent: open_clip's own encoders, normalised features, plain cosine (no logit scale)
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    x = (torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255 - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        f_img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        f_txt = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("genalign-tiny-clip")(PROMPTS)),
                                              dim=-1)
    assert torch.allclose(scores, (f_img * f_txt).sum(-1), atol=1e-5)
    assert scores.abs().max() <= 1.0
    # round trip through genalign's folder (open_clip's local-dir layout + genalign_reward.json)
    reward.save_pretrained(tmp_path / "saved")
    again = load_reward_model(tmp_path / "saved")
    assert again.backend == "open_clip" and not again.use_logit_scale
    assert torch.equal(again(batch, PROMPTS), scores)
    with pytest.warns(RewardInputWarning, match="16 tokens"):
        reward(batch[:1], ["red " * 30])


def test_probs_is_a_softmax_over_one_prompts_candidates():
    reward = tiny_clip_reward()
    candidates = images(4, seed=2)
    probs = reward.probs(candidates, "red circle")
    assert probs.shape == (4,) and probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    raw = reward(candidates, "red circle", normalize=False)
    assert torch.allclose(probs, torch.softmax(raw, 0))
    with pytest.raises(TypeError, match="ONE prompt"):
        reward.probs(candidates, ["red circle"] * 4)


def test_differentiable_flag_controls_gradients_to_float_pixels():
    reward = tiny_clip_reward()
    pixels = torch.rand(2, 3, 40, 48, requires_grad=True)  # not at the model's size: resize + crop in torch
    assert not reward(pixels, PROMPTS[:2]).requires_grad  # differentiable=False: scored under no_grad
    reward.differentiable = True
    score = reward(pixels, PROMPTS[:2])
    score.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    # uint8 arrays and the same pixels as float tensors in [0, 1] give the same scores
    batch = images(2, seed=5)
    as_float = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(reward(batch, PROMPTS[:2]), reward(as_float, PROMPTS[:2]), atol=1e-6)


def test_clip_reward_of_a_video_is_the_mean_of_its_frame_scores():
    reward = tiny_clip_reward()
    frames = images(3, seed=7)
    video_score = reward([np.stack(frames)], "red circle")
    frame_scores = reward(frames, "red circle")
    assert video_score.item() == pytest.approx(frame_scores.mean().item(), abs=1e-5)


def test_normalisation_is_saved_with_the_checkpoint_and_applied_by_default(tmp_path):
    reward = tiny_clip_reward(seed=1)
    batch = images(6, seed=3)
    prompts = (PROMPTS * 2)[:6]
    stats = reward.fit_normalization(batch, prompts)
    normalised = reward(batch, prompts)
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normalised.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    raw = reward(batch, prompts, normalize=False)
    assert torch.allclose(normalised, (raw - stats["score"]["mean"]) / stats["score"]["std"], atol=1e-5)
    reward.save_pretrained(tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "genalign_reward.json").read_text())
    assert saved["kind"] == "clip" and saved["normalization"]["score"] == pytest.approx(stats["score"])
    loaded = load_reward_model(tmp_path / "r")
    assert torch.allclose(loaded(batch, prompts), normalised, atol=1e-6)
    assert torch.allclose(load_reward_model(tmp_path / "r", normalize=False)(batch, prompts), raw, atol=1e-6)


def test_clip_loss_is_pickscores_objective_and_trains():
    reward = tiny_clip_reward(seed=2).train()
    a, b = images(2, seed=8), images(2, seed=9)
    pairs = [PreferencePair(PROMPTS[0], a[0], b[0], 1.0), PreferencePair(PROMPTS[1], a[1], b[1], 0.5)]
    loss, metrics = reward.loss(pairs)
    s_a, s_b = reward(a, PROMPTS[:2], normalize=False), reward(b, PROMPTS[:2], normalize=False)
    want, _ = pickscore_loss(s_a, s_b, torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    loss.backward()
    assert reward.clip.logit_scale.grad is not None and set(metrics) >= {"loss", "accuracy", "margin"}


def test_clip_loss_btt_is_the_rao_kupper_likelihood_of_the_score_difference():
    reward = tiny_clip_reward(seed=2).train()
    reward.training_loss, reward.tie_theta = "btt", 3.0
    a, b = images(3, seed=8), images(3, seed=9)
    labels = [1.0, 0.5, 0.0]
    pairs = [PreferencePair(PROMPTS[i], a[i], b[i], labels[i]) for i in range(3)]
    loss, _ = reward.loss(pairs)
    with torch.no_grad():
        d = (reward(a, PROMPTS[:3], normalize=False) - reward(b, PROMPTS[:3], normalize=False)).double()
    p_a, p_b = torch.sigmoid(d - math.log(3.0)), torch.sigmoid(-d - math.log(3.0))
    p_tie = (3.0**2 - 1) * p_a * p_b
    want = -(torch.log(p_a[0]) + torch.log(p_tie[1]) + torch.log(p_b[2])) / 3
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    loss.backward()
    assert reward.clip.logit_scale.grad is not None
    reward.training_loss = "hinge"
    with pytest.raises(ValueError, match="'pickscore' or 'btt', got 'hinge'"):
        reward.loss(pairs)


# ------------------------------------------------------------------------------------------- input errors
def test_bad_inputs_raise_or_warn_with_the_numbers_and_files(tmp_path):
    reward = tiny_clip_reward()
    with pytest.raises(ValueError, match="got 3 media but 2 prompts"):
        reward(images(3), PROMPTS[:2])
    with pytest.warns(RewardInputWarning, match="longer than the text encoder's 16 tokens"):
        reward(images(1), ["red circle " * 12])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        reward([broken], "red circle")
    with pytest.raises(DataError, match="missing.png"):
        reward([tmp_path / "missing.png"], "red circle")
    from PIL import Image

    Image.fromarray(images(1)[0]).save(tmp_path / "ok.png")
    assert reward(str(tmp_path / "ok.png"), "red circle").shape == (1,)


def test_folders_of_another_kind_or_of_nothing_are_named_in_the_error(tmp_path):
    clip_folder = tiny_clip_reward().save_pretrained(tmp_path / "clip")
    with pytest.raises(RewardLoadError, match=r"clip.*holds a 'clip' reward model, not a 'video_reward'"):
        VideoReward.from_pretrained(clip_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardLoadError, match="empty.*holds no reward model"):
        load_reward_model(tmp_path / "empty")


# ------------------------------------------------------------------------------------------- VideoReward
@pytest.fixture(scope="module")
def video_reward():
    return tiny_video_reward(seed=0)


def clips(n, seed=0, frames=8, size=32):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8) for _ in range(n)]


def perturb_trainable(model, seed=0):
    """Non-zero LoRA B (a fresh LoRA is a no-op) and a new head, so a round trip that drops them would fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_patchify_matches_the_qwen2vl_video_processor(video_reward):
    from transformers import Qwen2VLVideoProcessor

    video = clips(1, seed=4)[0]
    processor = Qwen2VLVideoProcessor(patch_size=4, temporal_patch_size=2, merge_size=2)
    theirs = processor(videos=[video], return_tensors="pt", do_resize=False, cap_pixels_per_frame=False)
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    ours, grid = video_reward.video_patches(x)
    assert list(grid) == theirs["video_grid_thw"][0].tolist() == [4, 8, 8]
    assert torch.allclose(ours, theirs["pixel_values_videos"], atol=1e-5)


def test_video_reward_scores_three_dimensions_and_their_sum(video_reward):
    videos = clips(3, seed=1)
    scores = video_reward(videos, ["red circle moving left", "blue square still", "two green crosses"])
    assert set(scores) == {"VQ", "MQ", "TA", "Overall"}
    assert all(s.shape == (3,) for s in scores.values())
    assert torch.allclose(scores["Overall"], scores["VQ"] + scores["MQ"] + scores["TA"])
    # reward tokens: VQ and MQ before the prompt text, TA after it
    text = video_reward.text_inputs(["red circle"], [4])
    ids, positions = text["input_ids"][0].tolist(), {d: int(p[0]) for d, p in text["positions"].items()}
    prompt_start = ids.index(video_reward.vision_end_id) + 1
    assert positions["VQ"] < positions["MQ"] < positions["TA"]
    assert positions["MQ"] < len(ids) - (len(video_reward._template_parts[2]) + 2)  # before the prompt's tokens
    assert prompt_start < positions["VQ"]


def test_vq_and_mq_do_not_depend_on_the_prompt_under_causal_attention(video_reward):
    video = clips(1, seed=2)
    short = video_reward(video * 2, ["red circle", "three magenta triangles above cyan square moving up"])
    assert torch.allclose(short["VQ"][0], short["VQ"][1], atol=1e-5)
    assert torch.allclose(short["MQ"][0], short["MQ"][1], atol=1e-5)
    assert not torch.allclose(short["TA"][0], short["TA"][1], atol=1e-4)


def test_templates_that_let_vq_or_mq_see_the_prompt_are_refused():
    from genalign.rewards import VideoRewardConfig

    with pytest.raises(ValueError, match="before"):
        VideoRewardConfig(prompt_template="{video} {prompt} <|VQ_reward|> <|MQ_reward|> <|TA_reward|>")
    with pytest.raises(ValueError, match="exactly once"):
        VideoRewardConfig(prompt_template="{video} <|VQ_reward|> <|MQ_reward|> {prompt}")


def test_video_reward_warns_on_fps_far_from_training_and_on_long_prompts(video_reward):
    with pytest.warns(RewardInputWarning, match=r"fps 24 far from the fps this reward model was trained at \(8\)"):
        video_reward(clips(1), "red circle moving left", fps=24)
    with pytest.warns(RewardInputWarning, match="longer than 32 tokens"):
        video_reward(clips(1), "red circle moving left " * 20, fps=8)


def test_video_reward_loss_trains_lora_and_head_not_the_frozen_vision_tower():
    model = tiny_video_reward(seed=1).train()
    a, b = clips(2, seed=3), clips(2, seed=4)
    pairs = [PreferencePair("red circle moving left", a[0], b[0], 1.0, labels={"VQ": 1.0, "MQ": 0.5, "TA": 0.0},
                            meta={"fps_A": "8", "fps_B": "8"}),
             PreferencePair("blue square still", a[1], b[1], 0.0, labels={"VQ": 0.0, "MQ": 1.0})]  # TA missing
    loss, metrics = model.loss(pairs)
    assert int(metrics["valid_labels"]) == 5 and set(metrics) >= {"loss/VQ", "accuracy/TA"}
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads) and model.head.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad for n, p in model.base_model.named_parameters() if n.startswith("visual."))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    first = loss.item()
    for _ in range(5):
        optimizer.zero_grad()
        loss, _ = model.loss(pairs)
        loss.backward()
        optimizer.step()
    assert model.loss(pairs)[0].item() < first
    trained_vision = tiny_video_reward(seed=1, train_vision=True)
    assert all(p.requires_grad for n, p in trained_vision.base_model.named_parameters() if n.startswith("visual."))


def test_video_reward_round_trips_lora_head_and_normalisation_through_save_and_load(tmp_path):
    model = tiny_video_reward(seed=2)
    perturb_trainable(model)
    model.set_normalization({"VQ": {"mean": 0.5, "std": 2.0}, "TA": {"mean": -1.0, "std": 0.5}})
    videos, prompts = clips(2, seed=5), ["red circle moving left", "green cross moving down"]
    before = model(videos, prompts)
    folder = model.save_pretrained(tmp_path / "video_reward")
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((folder / "genalign_reward.json").read_text())
    assert saved["config"]["fps"] == 8.0 and saved["config"]["num_frames"] == 8 and saved["training_fps"] == 8.0
    loaded = load_reward_model(folder)
    assert isinstance(loaded, VideoReward) and loaded.uses_lora
    after = loaded(videos, prompts)
    for dim in before:
        assert torch.allclose(before[dim], after[dim], atol=1e-5), dim
    with pytest.raises(RewardLoadError, match=r"holds a 'video_reward' reward model, not a 'clip'"):
        CLIPReward.from_pretrained(folder)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_a_trained_vision_tower_is_saved_once_and_folders_with_two_copies_still_load(tmp_path, lora_rank):
    from safetensors.torch import load_file, save_file

    model = tiny_video_reward(seed=3, train_vision=True, lora_rank=lora_rank)
    perturb_trainable(model, seed=2)
    with torch.no_grad():  # a tower unlike the fresh one the backbone config would build
        for p in model.base_model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    videos, prompts = clips(2, seed=6), ["red circle moving left", "green cross moving down"]
    before = model(videos, prompts)
    folder = model.save_pretrained(tmp_path / "new")
    backbone = load_file(str(folder / "backbone" / "model.safetensors"))
    tower = {k: v for k, v in load_file(str(folder / "non_lora.safetensors")).items() if k.startswith("visual.")}
    assert tower and not any(k.startswith("visual.") for k in backbone)
    # folders written before this change hold the tower in both files
    old = tmp_path / "old"
    __import__("shutil").copytree(folder, old)
    save_file({**backbone, **tower}, str(old / "backbone" / "model.safetensors"))
    for path in (folder, old):
        after = load_reward_model(path)(videos, prompts)
        for dim in before:
            assert torch.allclose(before[dim], after[dim], atol=1e-5), (path, dim)
    # the tower in neither file: a clear error, not a randomly initialised tower
    save_file({k: v for k, v in load_file(str(folder / "non_lora.safetensors")).items() if not k.startswith("visual.")},
              str(folder / "non_lora.safetensors"))
    with pytest.raises(RewardLoadError, match="no vision tower"):
        load_reward_model(folder)


def test_video_reward_saved_without_its_base_keeps_lora_head_and_reward_token_embeddings(tmp_path):
    from genalign.rewards import VideoRewardConfig, build_tiny_qwen2vl_tokenizer, tiny_qwen2vl_backbone
    from transformers import AutoTokenizer, Qwen2VLModel

    base = tmp_path / "base"
    tiny_qwen2vl_backbone(build_tiny_qwen2vl_tokenizer(), seed=5).save_pretrained(base)
    model = VideoReward(Qwen2VLModel.from_pretrained(base), build_tiny_qwen2vl_tokenizer(),
                        VideoRewardConfig(lora_rank=4, frame_size=(32, 32), base_model_path=str(base)))
    perturb_trainable(model, seed=1)
    folder = model.save_pretrained(tmp_path / "reward")
    assert not (folder / "backbone").exists()
    videos, prompts = clips(2, seed=9), ["red circle moving up", "cyan cross still"]
    want, got = model(videos, prompts), load_reward_model(folder)(videos, prompts)
    for dim in want:
        assert torch.allclose(want[dim], got[dim], atol=1e-5), dim
    assert isinstance(AutoTokenizer.from_pretrained(folder / "tokenizer"), type(model.tokenizer))


def test_video_reward_loads_the_published_videoalign_layout(tmp_path):
    """A VideoAlign-style folder: model_config.json + checkpoint-<step>/ with a peft adapter whose keys use
    transformers 4 names (`model.layers.*`) and a non-LoRA torch file with `rm_head` and the embeddings."""
    from genalign.rewards import VideoRewardConfig, build_tiny_qwen2vl_tokenizer, tiny_qwen2vl_backbone
    from safetensors.torch import load_file, save_file

    base = tmp_path / "Qwen2-VL-tiny"  # the base model folder, as downloaded (no reward tokens)
    tiny_qwen2vl_backbone(build_tiny_qwen2vl_tokenizer(), seed=7).save_pretrained(base)
    build_tiny_qwen2vl_tokenizer().save_pretrained(base)
    from transformers import AutoTokenizer, Qwen2VLModel

    model = VideoReward(Qwen2VLModel.from_pretrained(base), AutoTokenizer.from_pretrained(base),
                        VideoRewardConfig(lora_rank=4, lora_alpha=8.0, fps=2.0, num_frames=8, max_pixels=32 * 32))
    perturb_trainable(model, seed=3)
    checkpoint = tmp_path / "VideoReward" / "checkpoint-1200"
    model.backbone.save_pretrained(checkpoint)
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    old_names = {k.replace("base_model.model.language_model.", "base_model.model.model."): v for k, v in adapter.items()}
    assert old_names.keys() != adapter.keys()
    save_file(old_names, str(checkpoint / "adapter_model.safetensors"))
    embeddings = model.base_model.get_input_embeddings().weight.detach().clone()
    torch.save({"base_model.model.rm_head.weight": model.head.weight.detach().clone(),
                "base_model.model.model.embed_tokens.weight": embeddings}, checkpoint / "non_lora_state_dict.pth")
    (tmp_path / "VideoReward" / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "num_frames": 8, "max_frame_pixels": 32 * 32},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct"},
        "inference_config": {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": 0.0, "MQ_std": 1.0, "TA_mean": 0.5, "TA_std": 4.0},
    }))
    videos, prompts = clips(2, seed=6), ["red circle moving left", "blue square still"]
    want = model(videos, prompts, normalize=False, fps=2)

    loaded = VideoReward.from_pretrained(tmp_path / "VideoReward", base_model=base,
                                         prompt_template=model.config.prompt_template)
    got = loaded(videos, prompts, normalize=False, fps=2)
    for dim in want:
        assert torch.allclose(want[dim], got[dim], atol=1e-5), dim
    assert loaded.normalization["TA"] == {"mean": 0.5, "std": 4.0} and loaded.training_fps == 2.0
    with pytest.raises(RewardLoadError, match="base_model"):
        VideoReward.from_pretrained(tmp_path / "VideoReward", prompt_template=model.config.prompt_template)


def test_video_reward_is_differentiable_with_respect_to_pixels():
    model = tiny_video_reward(seed=3, lora_rank=0)
    model.differentiable = True
    pixels = torch.rand(1, 8, 3, 32, 32, requires_grad=True)
    model(pixels, "red circle moving left")["Overall"].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- combinations
def test_combined_reward_is_the_weighted_sum_of_the_named_scores(video_reward):
    clip_reward = tiny_clip_reward(seed=4)
    scorer = combine_rewards({"pickscore": 0.5, "videoreward.TA": 1.0, "videoreward": -0.25},
                             models={"pickscore": clip_reward, "videoreward": video_reward})
    videos, prompts = clips(2, seed=8), ["red circle moving left", "blue square still"]
    total = scorer(videos, prompts)
    video_scores = video_reward(videos, prompts)
    want = 0.5 * clip_reward(videos, prompts) + video_scores["TA"] - 0.25 * video_scores["Overall"]
    assert torch.allclose(total, want, atol=1e-5)
    assert set(scorer.terms(videos, prompts)) == {"pickscore", "videoreward.TA", "videoreward"}
    with pytest.raises(KeyError, match="no dimension 'XX'"):
        combine_rewards({"videoreward.XX": 1.0}, models={"videoreward": video_reward})
    with pytest.raises(KeyError, match="names no model"):
        combine_rewards({"hpsv2": 1.0}, models={"videoreward": video_reward})


# ------------------------------------------------------------------------------------------- ensembles
def test_ensemble_scores_the_weighted_mean_of_the_members_normalised_scores(tmp_path):
    from genalign.rewards import EnsembleReward

    first, second = tiny_clip_reward(seed=1), tiny_clip_reward(seed=2)
    first.set_normalization({"score": {"mean": 3.0, "std": 2.0}})
    second.set_normalization({"score": {"mean": -1.0, "std": 0.5}})
    batch, prompts = images(5, seed=11), (PROMPTS * 2)[:5]
    raw_first, raw_second = first(batch, prompts, normalize=False), second(batch, prompts, normalize=False)
    want = 0.25 * (raw_first - 3.0) / 2.0 + 0.75 * (raw_second + 1.0) / 0.5
    ensemble = EnsembleReward([first, second], weights=[1, 3])
    assert ensemble.weights == [0.25, 0.75] and ensemble.dimensions == ("score",)
    assert torch.allclose(ensemble(batch, prompts), want, atol=1e-5)  # the ensemble's own normalisation: identity
    one_prompt = [first(batch[:3], "red circle", normalize=False), second(batch[:3], "red circle", normalize=False)]
    want_probs = 0.25 * torch.softmax(one_prompt[0], 0) + 0.75 * torch.softmax(one_prompt[1], 0)
    assert torch.allclose(ensemble.probs(batch[:3], "red circle"), want_probs, atol=1e-6)

    ensemble.set_normalization({"score": {"mean": 0.5, "std": 4.0}})
    ensemble.save_pretrained(tmp_path / "ens")
    saved = json.loads((tmp_path / "ens" / "genalign_reward.json").read_text())
    assert saved["kind"] == "ensemble" and saved["config"]["members"] == ["member-0", "member-1"]
    assert saved["config"]["member_kinds"] == ["clip", "clip"]
    loaded = load_reward_model(tmp_path / "ens")
    assert type(loaded).__name__ == "EnsembleReward"
    assert torch.allclose(loaded(batch, prompts), (want - 0.5) / 4.0, atol=1e-5)
    assert torch.allclose(loaded(batch, prompts, normalize=False), want, atol=1e-5)

    # differentiable: gradients reach the pixels through every member, for scores and probs alike
    grad_model = load_reward_model(tmp_path / "ens", differentiable=True)
    assert all(m.differentiable for m in grad_model.members)
    pixels = torch.rand(3, 3, 32, 32, requires_grad=True)
    (grad_model(pixels, PROMPTS).sum() + grad_model.probs(pixels, "red circle")[0]).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert not load_reward_model(tmp_path / "ens")(pixels, PROMPTS).requires_grad


def test_ensemble_of_video_rewards_keeps_their_dimensions_and_overall_sum(video_reward):
    from genalign.rewards import EnsembleReward

    other = tiny_video_reward(seed=9)
    videos, prompts = clips(2, seed=12), ["red circle moving left", "blue square still"]
    ensemble = EnsembleReward([video_reward, other])
    scores = ensemble(videos, prompts)
    assert set(scores) == {"VQ", "MQ", "TA", "Overall"}
    a, b = video_reward(videos, prompts), other(videos, prompts)  # normalised (identity here) member scores
    for dim in ("VQ", "MQ", "TA"):
        assert torch.allclose(scores[dim], 0.5 * (a[dim] + b[dim]), atol=1e-5)
    assert torch.allclose(scores["Overall"], scores["VQ"] + scores["MQ"] + scores["TA"], atol=1e-5)


def test_ensemble_refuses_members_of_other_dimensions_bad_weights_and_missing_folders(tmp_path, video_reward):
    from genalign.rewards import EnsembleReward

    clip_a, clip_b = tiny_clip_reward(seed=1), tiny_clip_reward(seed=2)
    with pytest.raises(ValueError, match=r"member 1 has dimensions \['VQ', 'MQ', 'TA'\]"):
        EnsembleReward([clip_a, video_reward])
    with pytest.raises(ValueError, match="3 weights for 2"):
        EnsembleReward([clip_a, clip_b], weights=[1, 1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        EnsembleReward([clip_a, clip_b], weights=[1, -1])
    with pytest.raises(ValueError, match="at least one"):
        EnsembleReward([])
    with pytest.raises(NotImplementedError, match="train each member"):
        EnsembleReward([clip_a, clip_b]).loss([])
    EnsembleReward([clip_a, clip_b]).save_pretrained(tmp_path / "ens")
    import shutil

    shutil.rmtree(tmp_path / "ens" / "member-1")
    with pytest.raises(RewardLoadError, match="member folder 'member-1' is missing"):
        load_reward_model(tmp_path / "ens")
