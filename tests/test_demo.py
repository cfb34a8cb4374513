"""The Gradio demo (`genalign demo` / `python -m genalign.app`) as a person uses it.

- A real server in a subprocess on a free port, driven with gradio_client: the w slider changes the aligned
  image, w = 0 gives the base image pixel for pixel, bad requests get the documented messages, 20 concurrent
  requests all come back right (the server runs --concurrency 2 here, so the lock around the shared LoRA state
  is exercised).
- A real browser (Debian's chromium + chromedriver, headless, selenium): type a prompt, move the slider, click
  Generate, the aligned image changes and the page makes no request off this machine. Its screenshot goes to
  tmp_path; `GENALIGN_DEMO_SCREENSHOT=docs/demo.png pytest tests/test_demo.py -k browser` writes the README's.
- In process: several LoRAs (expert sliders, beta from the run's config.yaml), a learned reward, Flow-NRG
  sliders, the world's video model, and the input validation on its own.
"""

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
PROMPT = "green cross above magenta circle"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("demo_load", REPO / "benchmarks" / "demo_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_load = _load_benchmark()


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = demo_load.free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    proc = demo_load.start_server(port, ["--concurrency", "2"], log_path=log)
    yield f"http://127.0.0.1:{port}/"
    demo_load.stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def generate(client, **kw):
    args = {"prompt": PROMPT, "seed": 3, "steps": STEPS, "cfg": 4.0, "w": 1.0, "height": 32, "width": 32}
    args.update(kw)
    return client.predict(**args, api_name="/generate")


def test_the_w_slider_changes_the_aligned_image_and_w0_is_the_base_image(client):
    base0, aligned0, base_scores, aligned_scores, info0 = generate(client, w=0.0)
    base2, aligned2, _, aligned2_scores, info2 = generate(client, w=2.0)
    img = {k: png(v) for k, v in {"base0": base0, "aligned0": aligned0, "base2": base2, "aligned2": aligned2}.items()}
    assert img["base0"].shape == (256, 256, 3)  # 32x32, nearest-neighbour x8
    assert np.array_equal(img["base0"][::8, ::8].repeat(8, 0).repeat(8, 1), img["base0"])
    assert np.array_equal(img["aligned0"], img["base0"])  # w = 0: the base model, pixel for pixel
    assert np.array_equal(img["base2"], img["base0"])  # same seed, same base
    assert np.abs(img["aligned2"].astype(int) - img["aligned0"]).max() > 30  # w = 2 moves the aligned image
    # the world oracle scores both columns; at w = 0 they agree
    assert set(base_scores["oracle"]) == {"VQ", "TA"} and aligned_scores == base_scores
    assert 0 <= aligned2_scores["oracle"]["TA"] <= 1
    # the shipped LoRA's config.yaml says beta 100: w = 2 acts like KL coefficient 50
    assert "w 0 " in info0 and "beta/w" in info2 and "100/2 = **50**" in info2


@pytest.mark.parametrize("kw, message", [
    ({"w": 5.0}, ("RLG weight w must be a number from 0 to 3, got 5 (0 = the base model, 1 = the aligned model, "
                  "above 1 extrapolates).")),
    ({"prompt": ""}, "Enter a prompt: the prompt is empty."),
    ({"prompt": "   "}, "Enter a prompt: the prompt is empty."),
    ({"steps": 1000}, "Steps must be a whole number from 1 to 100, got 1000."),
    ({"seed": -1}, "Seed must be a whole number from 0 to 4294967295, got -1."),
    ({"height": 50}, "Height must be a multiple of 16 from 16 to 64, got 50."),
    ({"prompt": "red circle " * 40}, "characters long; at most 300 are allowed."),
])
def test_out_of_range_requests_get_the_documented_message(client, kw, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        generate(client, **kw)
    assert message in str(err.value)
    assert "Traceback" not in str(err.value)


def test_twenty_concurrent_requests_all_succeed_and_none_is_mixed_up(server, client):
    """benchmarks/demo_load.py's client loop with 4 steps; w alternates 0 / 2 between requests, so a request that
    saw another one's LoRA state would break w = 0 == base."""
    results = demo_load.fire(server, n=20, workers=20, steps=4, prompt=PROMPT, w_values=(0.0, 2.0))
    assert demo_load.check(results, 20) == []
    assert sorted(r["seed"] for r in results) == list(range(20))
    for r in results:
        base, aligned = png(r["result"][0]), png(r["result"][1])
        assert np.array_equal(base, aligned) == (r["w"] == 0.0), r["seed"]
    # the same request alone gives the same images as under load
    alone = generate(client, seed=5, steps=4, w=2.0)
    under_load = next(r["result"] for r in results if r["seed"] == 5)
    assert np.array_equal(png(alone[0]), png(under_load[0])) and np.array_equal(png(alone[1]), png(under_load[1]))


def test_the_demo_base_image_is_what_genalign_sample_draws(client, tmp_path):
    env = {**os.environ, **demo_load.OFFLINE_ENV, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "genalign", "sample", "--prompt", PROMPT, "--num-per-prompt", "1",
                          "--steps", str(STEPS), "--seed", "3", "--out", str(tmp_path / "s")],
                         check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    base = png(generate(client, seed=3, w=2.0)[0])
    assert np.array_equal(base[::8, ::8], png(tmp_path / "s" / "0000.png"))


# ------------------------------------------------------------------------------------------- the browser
def _chrome():
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").is_file()):
        pytest.skip("chromium / chromedriver are not installed (scripts/test.sh installs them with apt-get when "
                    "run as root; elsewhere: apt-get install -y chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
              "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-quic", "--disable-default-apps"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def test_in_a_browser_moving_the_slider_changes_the_aligned_image(server, tmp_path):
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome()
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate button, button#generate"))
        find = driver.find_element

        def src(elem_id):
            imgs = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
            return imgs[0].get_attribute("src") if imgs else None

        def fetch(url) -> np.ndarray:
            with urllib.request.urlopen(url, timeout=10) as r:
                return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))

        def set_number(elem_id, value):  # the number box next to a slider, as a person types into it
            box = find(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(value), Keys.TAB)

        box = find(By.CSS_SELECTOR, "#prompt textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("red circle left of blue square")
        set_number("steps", 8)
        set_number("w", 0)
        find(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: src("aligned") and src("base"))
        first = src("aligned")
        assert np.array_equal(fetch(first), fetch(src("base")))  # w = 0 on the page too

        set_number("w", 2)
        assert find(By.CSS_SELECTOR, "#w input[type=range]").get_attribute("value") == "2"  # the slider moved
        wait.until(lambda d: "100/2" in find(By.CSS_SELECTOR, "#kl").text)  # beta / w next to it (beta 100)
        find(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: src("aligned") and src("aligned") != first)
        wait.until(lambda d: "w 2 " in find(By.CSS_SELECTOR, "#status").text)
        before, after = fetch(first), fetch(src("aligned"))
        assert after.shape == (256, 256, 3) and np.abs(after.astype(int) - before).max() > 30
        assert '"TA"' in find(By.CSS_SELECTOR, "#aligned-scores").text or "TA" in find(By.CSS_SELECTOR,
                                                                                       "#aligned-scores").text

        shot = Path(os.environ.get("GENALIGN_DEMO_SCREENSHOT") or tmp_path / "demo.png")
        time.sleep(0.5)  # let the image fade-in finish
        assert driver.save_screenshot(str(shot))
        pixels = png(shot)
        assert pixels.shape[0] > 500 and pixels.std() > 10  # a rendered page, not a blank one

        # nothing on the page was fetched from anywhere but the demo itself
        host = server.split("/")[2]
        urls = [json.loads(e["message"])["message"]["params"].get("request", {}).get("url", "")
                for e in driver.get_log("performance")]
        outside = {u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:")) and u.split("/")[2] != host}
        assert not outside, outside
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------- in process
@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """Two Flow-DPO-like runs (<run>/lora, one with config.yaml), a learned reward and a latent reward model,
    all for the world's image model, as a user would point the demo at them."""
    from genalign.rewards import tiny_clip_reward

    from genalign.guidance import LatentRewardModel, latent_space_id
    from genalign.models import load_adapter
    from genalign.world import resolve_model

    root = tmp_path_factory.mktemp("user")
    path, kw, _ = resolve_model("world")
    adapter = load_adapter(path, **kw)
    g = torch.Generator().manual_seed(0)
    for name in ("run_a", "run_b"):
        adapter.add_lora()
        with torch.no_grad():
            for pname, p in adapter.denoiser.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        adapter.save_lora(root / name / "lora")
        adapter.denoiser.delete_adapters("default")
    (root / "run_a" / "config.yaml").write_text("beta: 100.0\nbeta_schedule: constant\nlr: 0.0003\n")
    reward = tiny_clip_reward(seed=1).save_pretrained(root / "reward")
    latent = LatentRewardModel.from_transformer(adapter.denoiser, 1, latent_space=latent_space_id(adapter),
                                                latent_shape=adapter.latent_shape(32, 32), hidden=16)
    with torch.no_grad():
        latent.heads.weight.copy_(torch.randn(latent.heads.weight.shape, generator=g))
    latent.save_pretrained(root / "nrg")
    return {"loras": [str(root / "run_a" / "lora"), str(root / "run_b" / "lora")], "reward": str(reward),
            "nrg": str(root / "nrg")}


@pytest.fixture(scope="module")
def full_model(user_models):
    from genalign.app.demo import DemoModel

    return DemoModel.load("world", user_models["loras"], user_models["reward"], user_models["nrg"])


def test_several_loras_rewards_and_nrg_get_their_controls_and_act(full_model):
    import gradio as gr
    from genalign.app.demo import build_demo

    m = full_model
    assert m.lora_names == ["run_a", "run_b"] and m.nrg_dims == ("VQ", "MQ", "TA")
    demo = build_demo(m)
    assert isinstance(demo, gr.Blocks) and demo.analytics_enabled is False
    labels = {c.get("props", {}).get("label") for c in demo.get_config_file()["components"]}
    assert {"run_a", "run_b", "NRG weight VQ", "NRG weight MQ", "NRG weight TA", "NRG scale lambda",
            "RLG guidance scale w"} <= labels
    # beta from run_a's config.yaml; run_b has none
    text = m.kl_text(2.0, {"run_a": 1.0, "run_b": 1.0})
    assert "run_a: effective KL coefficient **beta/w** = 100/1 = **100**" in text and "run_b" in text
    assert "beta/1 (beta of the training run unknown" in text

    def run(**kw):
        args = {"prompt": "red circle", "seed": 1, "steps": 4, "cfg": 4.0, "w": 1.0, "height": 32, "width": 32,
                "expert_weights": {"run_a": 1.0, "run_b": 0.0}, "nrg_weights": {"VQ": 0.0, "MQ": 0.0, "TA": 1.0},
                "nrg_scale": 0.0}
        args.update(kw)
        return m.generate(m.validate(**args))

    a, b = run(), run(expert_weights={"run_a": 0.0, "run_b": 1.0})
    assert np.array_equal(a.base, b.base) and not np.array_equal(a.aligned, b.aligned)  # the expert sliders act
    assert np.array_equal(run(w=0.0).aligned, a.base)  # w = 0: base, whatever the shares
    nrg = run(nrg_scale=5.0)
    assert np.array_equal(nrg.base, a.base) and not np.array_equal(nrg.aligned, a.aligned)  # NRG acts on aligned
    assert set(a.base_scores) == {"reward", "oracle"} and isinstance(a.base_scores["reward"], float)
    assert b.aligned_scores["reward"] != b.base_scores["reward"]  # scored per column
    assert run(prompt="a cat on a sofa").base_scores["oracle"].startswith("n/a: ")  # not the world's language


def test_the_world_video_model_serves_videos(tmp_path):
    import imageio.v2 as imageio
    from genalign.app.demo import DemoModel, build_demo

    m = DemoModel.load("world-video")
    assert m.is_video and m.lora_names == [] and "No LoRA loaded" in m.kl_text(1.0)
    build_demo(m)  # the page builds with video outputs and a frames control
    r = m.generate(m.validate("red circle moving left", 0, 2, 4.0, 1.0, 32, 32, 8))
    assert r.base.shape == (8, 32, 32, 3) and np.array_equal(r.base, r.aligned)  # no LoRA: aligned = base
    assert set(r.base_scores["oracle"]) == {"VQ", "MQ", "TA"}
    frames = imageio.mimread(m.display(r.aligned))
    assert len(frames) == 8 and frames[0].shape == (256, 256, 3)


def test_bad_model_paths_get_one_clear_line(tmp_path):
    env = {**os.environ, **demo_load.OFFLINE_ENV, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "genalign.app", "--lora", str(tmp_path / "nope")],
                         check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "--lora" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "genalign", "demo", "--help"], check=False, capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--nrg-reward" in out.stdout and "--port" in out.stdout


def test_importing_the_app_does_not_import_gradio():
    code = "import sys, genalign, genalign.app, genalign.app.demo; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# ------------------------------------------------------------------------------------------- validation
def test_validation_accepts_good_input_and_normalises_it():
    from genalign.app.demo import Limits, validate_request

    from genalign.guidance import RLG_WEIGHT_RANGE

    assert Limits().w_range == RLG_WEIGHT_RANGE
    r = validate_request(Limits(max_size=64), "  red circle ", 7.0, 20.0, 4, 3, height=32, width=64,
                         expert_weights={"a": 0.5}, nrg_weights={"VQ": 1}, nrg_scale=2)
    assert (r.prompt, r.seed, r.steps, r.cfg, r.w, r.height, r.width) == ("red circle", 7, 20, 4.0, 3.0, 32, 64)
    assert isinstance(r.seed, int) and isinstance(r.steps, int) and r.num_frames is None
    assert r.expert_weights == {"a": 0.5} and r.nrg_weights == {"VQ": 1.0} and r.nrg_scale == 2.0


@pytest.mark.parametrize("kw, message", [
    ({"prompt": None}, "Enter a prompt: the prompt is empty."),
    ({"prompt": "x" * 301}, "The prompt is 301 characters long; at most 300 are allowed."),
    ({"w": 3.01}, "RLG weight w must be a number from 0 to 3, got 3.01"),
    ({"w": -0.5}, "RLG weight w must be a number from 0 to 3, got -0.5"),
    ({"w": float("nan")}, "RLG weight w must be a number from 0 to 3, got nan"),
    ({"w": "lots"}, "RLG weight w must be a number from 0 to 3, got 'lots'"),
    ({"steps": 0}, "Steps must be a whole number from 1 to 100, got 0."),
    ({"steps": 2.5}, "Steps must be a whole number from 1 to 100, got 2.5."),
    ({"seed": 2**32}, "Seed must be a whole number from 0 to 4294967295, got 4294967296."),
    ({"cfg": 25}, "CFG must be a number from 0 to 20, got 25."),
    ({"height": 8}, "Height must be a multiple of 16 from 16 to 64, got 8."),
    ({"width": 33}, "Width must be a multiple of 16 from 16 to 64, got 33."),
    ({"width": 128}, "Width must be a multiple of 16 from 16 to 64, got 128."),
    ({"num_frames": 0}, "Frames must be a whole number from 1 to 64, got 0."),
    ({"expert_weights": {"a": 0.0, "b": 0.0}}, "Set at least one expert weight above 0"),
    ({"expert_weights": {"a": 2.0}}, "Expert weight 'a' must be a number from 0 to 1, got 2."),
    ({"nrg_weights": {"TA": -1}}, "NRG weight 'TA' must be a number from 0 to 1, got -1."),
    ({"nrg_scale": 11}, "NRG scale must be a number from 0 to 10, got 11."),
])
def test_validation_refuses_bad_input_with_one_sentence(kw, message):
    from genalign.app.demo import DemoInputError, Limits, validate_request

    args = {"prompt": "red circle", "seed": 0, "steps": 20, "cfg": 4.0, "w": 1.0, "height": 32, "width": 32}
    args.update(kw)
    prompt, seed, steps, cfg, w = (args.pop(k) for k in ("prompt", "seed", "steps", "cfg", "w"))
    with pytest.raises(DemoInputError) as err:
        validate_request(Limits(max_size=64), prompt, seed, steps, cfg, w, **args)
    assert message in str(err.value)


def test_rlg_expert_weights_share_w_and_beta_is_read_from_the_run(tmp_path):
    from genalign.app.demo import lora_training_beta, rlg_expert_weights

    assert rlg_expert_weights(2.0, {"a": 1.0, "b": 1.0}) == {"a": 1.0, "b": 1.0}
    assert rlg_expert_weights(1.5, {"a": 1.0, "b": 0.0}) == {"a": 1.5, "b": 0.0}
    assert rlg_expert_weights(0.0, {"a": 1.0, "b": 3.0}) == {"a": 0.0, "b": 0.0}
    (tmp_path / "run" / "lora").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("beta: 500\nbeta_schedule: one_minus_t_sq\n")
    assert lora_training_beta(tmp_path / "run" / "lora") == (500.0, "one_minus_t_sq")
    (tmp_path / "bare").mkdir()
    assert lora_training_beta(tmp_path / "bare") is None
