"""`genalign sweep rlg|nrg` (genalign.eval.sweep) on the world's image model at a tiny budget (few prompts, 4
steps): the JSON's numbers agree with `genalign eval` and with each other, and the pictures decode."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.cli import main as cli_main
from genalign.eval.sweep import nrg_settings, parse_weights, rlg_settings

TINY = ["--num-prompts", "3", "--samples-per-prompt", "2", "--steps", "4", "--seed", "3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert cli_main(["eval", *TINY, "--out", str(out)]) == 0
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def latent_rewards(tmp_path_factory):
    """Two random (untrained, strong-gradient) latent reward models in the world image model's latent space."""
    from genalign.cli import load_model
    from genalign.guidance import LatentRewardConfig, LatentRewardModel, latent_space_id

    adapter = load_model(None, "image")[0]
    root = tmp_path_factory.mktemp("latent-rewards")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = LatentRewardConfig(dims=("VQ", "TA"), latent_space=latent_space_id(adapter), latent_shape=(4, 16, 16),
                                 hidden=8, depth=1, cond_dim=64)
        model = LatentRewardModel(cfg).eval()
        with torch.no_grad():  # a random model's gradient is tiny: make it strong enough to steer 4 steps
            model.heads.weight.mul_(10.0)
        paths.append(model.save_pretrained(root / f"r{seed}"))
    return paths


def _png(path):
    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def _same_ci(a, b):
    return all(a[k] == pytest.approx(b[k], abs=1e-12) for k in ("mean", "lo", "hi"))


def test_rlg_sweep_rows_agree_with_eval_and_with_each_other(base_eval, tmp_path, capsys):
    out = tmp_path / "rlg"
    assert cli_main(["sweep", "rlg", *TINY, "--scales", "0,1,2", "--out", str(out)]) == 0
    assert "w=2" in capsys.readouterr().out
    report = json.loads((out / "sweep.json").read_text())
    rows = report["settings"]
    assert [r["label"] for r in rows] == ["w=0", "w=1", "w=2"] and report["kind"] == "rlg"
    assert report["lora"].endswith("image-aligned-lora") and report["num_prompts"] == 3
    # w = 0 is the base model: the same seeds give `genalign eval`'s numbers exactly
    for d in ("VQ", "TA", "strict"):
        assert _same_ci(rows[0]["oracle"][d], base_eval[d])
    assert rows[0]["diversity"] == pytest.approx(base_eval["diversity"], abs=1e-12)
    assert rows[0]["vs_first"] is None
    for r in rows[1:]:  # the paired difference vs w = 0: same prompts, so it is the difference of the means
        for d in ("VQ", "TA"):
            assert r["vs_first"][d]["mean"] == pytest.approx(r["oracle"][d]["mean"] - rows[0]["oracle"][d]["mean"])
            assert r["oracle"][d]["lo"] <= r["oracle"][d]["mean"] <= r["oracle"][d]["hi"]
        assert r["vs_first"]["diversity_ratio"] == pytest.approx(r["diversity"] / rows[0]["diversity"])
    assert rows[2]["per_prompt"]["TA"] != rows[0]["per_prompt"]["TA"] or \
        rows[2]["diversity"] != rows[0]["diversity"]  # w = 2 samples something else
    curve, strips = _png(out / "curve.png"), _png(out / "strips.png")
    assert curve.ndim == 3 and curve.shape[0] > 100
    # strips: one row per setting (32 px images, upscaled, + caption), one column per prompt
    assert strips.shape[0] >= 3 * 2 * 32 and strips.shape[1] >= 3 * 2 * 32


def test_nrg_sweep_compares_rewards_at_the_same_weights(base_eval, latent_rewards, tmp_path):
    out = tmp_path / "nrg"
    args = ["sweep", "nrg", *TINY, "--weights", '[{}, {"TA": 1}]', "--nrg-scale", "2,8",
            "--nrg-reward", str(latent_rewards[0]), "--nrg-reward", str(latent_rewards[1]),
            "--reward", str(latent_rewards[0]), "--out", str(out)]
    assert cli_main(args) == 0
    report = json.loads((out / "sweep.json").read_text())
    rows = report["settings"]
    assert [r["label"] for r in rows] == ["none", "r0 TA:1 x2", "r0 TA:1 x8", "r1 TA:1 x2", "r1 TA:1 x8"]
    for d in ("VQ", "TA"):  # {} = no guidance = the base model
        assert _same_ci(rows[0]["oracle"][d], base_eval[d])
    assert set(rows[0]["learned"]) == {"VQ", "TA"}
    assert rows[1]["nrg_reward"] == str(latent_rewards[0]) and rows[3]["nrg_reward"] == str(latent_rewards[1])
    # following r0's TA gradient raises r0's TA on the final images (scored on their re-encoded latents), more
    # with a larger lambda
    gain2, gain8 = rows[1]["vs_first"]["learned/TA"], rows[2]["vs_first"]["learned/TA"]
    assert 0 < gain2["lo"] and gain2["mean"] < gain8["mean"], (gain2, gain8)
    assert _png(out / "strips.png").shape[0] >= 3 * 2 * 32 and _png(out / "curve.png").ndim == 3


def test_settings_and_bad_arguments(capsys):
    assert [s["label"] for s in rlg_settings([0, 1.5])] == ["w=0", "w=1.5"]
    settings = nrg_settings(["a/r"], parse_weights('[{}, {"TA": 1}, {"VQ": 0.5, "TA": 0.5}]'), [1, 2])
    assert [s["label"] for s in settings] == ["none", "TA:1 x1", "TA:1 x2", "VQ:0.5,TA:0.5 x1", "VQ:0.5,TA:0.5 x2"]
    with pytest.raises(ValueError, match="JSON"):
        parse_weights("[{TA: 1}]")
    assert cli_main(["sweep", "nrg", "--weights", "nope", "--nrg-reward", "x", *TINY]) == 2
    assert "--weights" in capsys.readouterr().err
    assert cli_main(["sweep", "rlg", "--scales", "0,9", *TINY]) == 2  # outside RLG's [0, 3]
    assert "error" in capsys.readouterr().err
