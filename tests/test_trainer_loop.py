"""The shared training loop (genalign.trainers.loop) and Flow-DPO on it, on CPU with tiny models.

Generic loop behaviour (non-finite steps, SIGKILL + resume, refusing to overwrite a run) is checked on a
one-layer toy trainer that needs no diffusers; Flow-DPO behaviour on the tiny SD3 pipeline of genalign.models.tiny.
"""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genalign.config import ConfigError, load_config
from genalign.recipes import recipe_path
from genalign.trainers import (
    CheckpointError,
    FlowDPOConfig,
    FlowDPOTrainer,
    NonFiniteLossError,
    TrainConfig,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: more threads only wait on each other (see test_adapters.py).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quiet(**kw):
    return dict(progress_bar=False, report_to="none", **kw)


# ------------------------------------------------------------------------------------------ a toy trainer
TOY_TRAINER = '''
import torch
from genalign.trainers.loop import Trainer


class ToyData(torch.utils.data.Dataset):
    """y = x . w_true; items carry their index so tests can poison chosen items."""

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "idx": i}


class ToyTrainer(Trainer):
    def __init__(self, config, nan_items=(), nan_from_step=None, sleep=0.0):
        torch.manual_seed(1)
        self.nan_items, self.nan_from_step, self.sleep = set(nan_items), nan_from_step, sleep
        super().__init__(config, torch.nn.Linear(4, 1), ToyData())

    def compute_loss(self, batch):
        if self.sleep:
            import time
            time.sleep(self.sleep)
        pred = self.model(batch["x"]).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        poisoned = any(int(i) in self.nan_items for i in batch["idx"])
        if poisoned or (self.nan_from_step is not None and self.state.step + 1 >= self.nan_from_step):
            loss = loss * float("nan")
        return loss, {"pred_mean": pred.mean().detach()}
'''
_toy_ns: dict = {}
exec(compile(TOY_TRAINER, "toy_trainer", "exec"), _toy_ns)  # noqa: S102 - the same source runs in the subprocess
ToyTrainer = _toy_ns["ToyTrainer"]


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.named_trainable}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_nonfinite_loss_skips_the_step_counts_and_logs_it(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=4, lr=0.05, shuffle=False,
                      log_every=2, checkpoint_every=0, **quiet())
    trainer = ToyTrainer(cfg, nan_items={5})  # item 5 is in the second batch (shuffle off): step 2
    after_step = {}
    trainer.on_step_end = lambda step: after_step.__setitem__(step, weights(trainer))
    result = trainer.train()
    assert result.step == 4 and result.nonfinite_total == 1
    records = {r["step"]: r for r in read_metrics(cfg.output_dir)}
    assert records[2]["skipped_nonfinite"] is True and records[2]["nonfinite_skipped"] == 1
    assert records[2]["loss"] is None and records[4]["nonfinite_skipped"] == 1  # logged, and counted on
    assert "skipped_nonfinite" not in records[4]
    # the skipped step did not move the weights; the next one did, and nothing became NaN
    assert max_diff(after_step[2], after_step[1]) == 0.0
    assert max_diff(after_step[3], after_step[2]) > 0.0
    assert all(torch.isfinite(p).all() for p in weights(trainer).values())


def test_nonfinite_losses_in_a_row_abort_naming_the_step_and_cause(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=20, batch_size=4, lr=0.05, log_every=1,
                      checkpoint_every=2, max_nonfinite_in_a_row=3, **quiet())
    trainer = ToyTrainer(cfg, nan_from_step=3)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    msg = str(err.value)
    assert "step 5" in msg and "steps 3-5" in msg and "3 steps in a row" in msg
    assert "learning rate" in msg and "checkpoint-4" in msg  # skipped steps leave the weights as they were
    assert [r["step"] for r in read_metrics(cfg.output_dir)] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(p).all() for p in weights(trainer).values())


def test_refuses_to_mix_a_fresh_run_into_an_old_one(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, checkpoint_every=1, **quiet())
    ToyTrainer(cfg).train()
    with pytest.raises(CheckpointError, match="resume=latest"):
        ToyTrainer(cfg).train()
    cfg.resume = str(tmp_path / "run" / "checkpoint-99")
    with pytest.raises(CheckpointError, match="does not exist"):
        ToyTrainer(cfg).train()


def test_sigkill_leaves_only_complete_checkpoints_and_resume_finishes(tmp_path):
    """A training subprocess killed with SIGKILL at a random moment after its first checkpoint: every
    checkpoint-* folder left is complete, temp folders are never taken for checkpoints, and resume=latest
    finishes the run with the weights of an uninterrupted one."""
    out = tmp_path / "run"
    script = tmp_path / "train_toy.py"
    max_steps = 40
    script.write_text(TOY_TRAINER + textwrap.dedent(f"""
        import sys
        from genalign.trainers.loop import TrainConfig
        torch.set_num_threads(1)
        cfg = TrainConfig(output_dir={str(out)!r}, max_steps={max_steps}, batch_size=4, lr=0.05, lr_scheduler="cosine",
                          warmup_steps=3, ema_decay=0.9, checkpoint_every=1, keep_checkpoints=3, log_every=1,
                          resume="latest", progress_bar=False, report_to="none")
        result = ToyTrainer(cfg, sleep=0.02).train()
        print("finished", result.step)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list_checkpoints(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert list_checkpoints(out), proc.communicate()[1].decode()[-2000:]
    time.sleep(random.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: the test checked nothing"
    killed_at = latest_checkpoint(out)
    # Every folder under a checkpoint name is complete; anything else (.tmp-, .trash-) is not listed.
    for p in out.iterdir():
        if p.name.startswith("checkpoint-"):
            state = verify_checkpoint(p)
            assert state["step"] == int(p.name.split("-")[1])
            assert (p / "model" / "trainable.safetensors").is_file() and (p / "optimizer.bin").is_file()
        else:
            assert not p.is_dir() or p.name.startswith((".tmp-", ".trash-")), p.name
    assert all(not p.name.startswith(".") for _, p in list_checkpoints(out))

    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"finished {max_steps}" in done.stdout
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, max_steps + 1)), f"killed after {killed_at}: {steps}"
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert len(list_checkpoints(out)) == 3 and latest_checkpoint(out).name == f"checkpoint-{max_steps}"

    # the same run without the kill, in this process: identical weights and EMA
    straight_cfg = TrainConfig(output_dir=str(tmp_path / "straight"), max_steps=max_steps, batch_size=4, lr=0.05,
                               lr_scheduler="cosine", warmup_steps=3, ema_decay=0.9, checkpoint_every=0, **quiet())
    straight = ToyTrainer(straight_cfg)
    straight.train()
    from safetensors.torch import load_file

    resumed = load_file(str(out / "model" / "trainable.safetensors"))
    assert max_diff(resumed, weights(straight)) <= 1e-6
    resumed_ema = load_file(str(out / "model_ema" / "trainable.safetensors"))
    with straight.ema_weights():
        assert max_diff(resumed_ema, weights(straight)) <= 1e-6


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_double_batch_across_a_resume(tmp_path):
    """2 gloo ranks x batch 4 (stopped at step 3, resumed in a new trainer) == 1 process x batch 8: the data
    slices, the gradient averaging and the per-rank checkpoint state fit together (about 15 s)."""
    script = tmp_path / "train_mp.py"
    common = ("max_steps=6, lr=0.05, lr_scheduler='cosine', ema_decay=0.5, checkpoint_every=3, log_every=1, "
              "progress_bar=False, report_to='none'")
    script.write_text(TOY_TRAINER + textwrap.dedent(f"""
        import json
        from genalign.trainers.loop import TrainConfig
        torch.set_num_threads(1)
        out = {str(tmp_path / "mp")!r}
        ToyTrainer(TrainConfig(output_dir=out, batch_size=4, {common})).train(stop_at_step=3)
        trainer = ToyTrainer(TrainConfig(output_dir=out, batch_size=4, resume="latest", {common}))
        trainer.train()
        if trainer.is_main:
            print("RESULT", trainer.accelerator.num_processes,
                  json.dumps({{n: p.detach().tolist() for n, p in trainer.named_trainable}}))
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    # `--cpu --num_processes 2` silently starts ONE process (ENVIRONMENT.md): --multi_gpu + ACCELERATE_USE_CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    _, nproc, payload = line.split(" ", 2)
    assert nproc == "2"
    two = {k: torch.tensor(v) for k, v in json.loads(payload).items()}
    state = verify_checkpoint(tmp_path / "mp" / "checkpoint-6")
    assert state["num_processes"] == 2
    assert (tmp_path / "mp" / "checkpoint-6" / "generator_1.safetensors").is_file()

    one = ToyTrainer(TrainConfig(output_dir=str(tmp_path / "one"), batch_size=8, max_steps=6, lr=0.05,
                                 lr_scheduler="cosine", ema_decay=0.5, checkpoint_every=0, **quiet()))
    one.train()
    assert max_diff(two, weights(one)) <= 1e-6
    assert [r["step"] for r in read_metrics(tmp_path / "mp")] == list(range(1, 7))


# ------------------------------------------------------------------------------------------ Flow-DPO
@pytest.fixture(scope="module")
def sd3_pipe():
    from genalign.models import tiny

    pipe = tiny.tiny_sd3_pipeline(with_t5=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_adapter(pipe):
    from genalign.models import SD3Adapter

    return SD3Adapter(copy.deepcopy(pipe))


def solid(rgb) -> np.ndarray:
    img = np.zeros((32, 32, 3), np.uint8)
    img[...] = rgb
    return img


def separable_pairs(n=16, with_ties=0):
    """A red image always wins over a blue one; half the pairs list it second (label 0: B wins). Brightness
    differs from pair to pair, so that the data order matters (the resume test relies on it)."""
    from genalign.data import PreferencePair

    pairs = []
    for i in range(n):
        red, blue = solid((120 + 8 * i, 30, 30)), solid((30, 30, 120 + 8 * i))
        pairs.append(PreferencePair("red circle", red, blue, 1.0) if i % 2 else
                     PreferencePair("red circle", blue, red, 0.0))
    pairs += [PreferencePair("red circle", solid((200, 30, 30)), solid((210, 30, 30)), 0.5) for _ in range(with_ties)]
    return pairs


def dpo_config(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), batch_size=4, lr=1e-2, beta=1000.0, lora_rank=4, log_every=1,
                checkpoint_every=0, **quiet())
    base.update(kw)
    return FlowDPOConfig(**base)


def fixed_batch_loss(trainer, batch, seed=123):
    trainer.generator.manual_seed(seed)
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(batch)
    return loss.item(), float(metrics["implicit_acc"])


def velocity_probe(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        return adapter.velocity(x, torch.tensor([0.3, 0.8]), adapter.encode_prompt(["red circle", "blue square"]))


def test_flow_dpo_learns_a_separable_pair_set_and_the_lora_loads_in_diffusers(sd3_pipe, tmp_path):
    cfg = dpo_config(tmp_path, max_steps=8)
    trainer = FlowDPOTrainer(sd3_adapter(sd3_pipe), cfg, separable_pairs())
    probe = trainer.collate_fn(separable_pairs(8))
    loss0, _ = fixed_batch_loss(trainer, probe)
    assert loss0 == pytest.approx(np.log(2), abs=1e-6)  # fresh LoRA (B = 0): the model IS the reference
    result = trainer.train()
    loss1, acc1 = fixed_batch_loss(trainer, probe)
    assert loss1 < 0.5 * loss0 and acc1 == 1.0, (loss0, loss1, acc1)
    logged = read_metrics(cfg.output_dir)
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert {"loss", "implicit_acc", "z_mean", "model_minus_ref_w", "model_minus_ref_l", "grad_norm", "lr"} <= set(logged[-1])
    assert logged[-1]["model_minus_ref_w"] < logged[-1]["model_minus_ref_l"]  # winners' error fell relative to losers'

    # The final LoRA (and the checkpoint's) loads into the stock diffusers pipeline and reproduces the model.
    assert result.final_model_dir == Path(cfg.output_dir) / "lora"
    v_trained = velocity_probe(trainer.adapter)
    from genalign.models import SD3Adapter

    for lora_dir in (result.final_model_dir, result.last_checkpoint / "lora"):
        stock = copy.deepcopy(sd3_pipe)
        stock.load_lora_weights(str(lora_dir))
        v_loaded = velocity_probe(SD3Adapter(stock))
        assert (v_loaded - v_trained).abs().max().item() < 1e-5
    assert (velocity_probe(SD3Adapter(copy.deepcopy(sd3_pipe))) - v_trained).abs().max().item() > 1e-3
    # readable as the umask says, not only by their owner (safetensors writes 0600 files: genalign.files)
    from genalign.files import current_umask

    files = [f for d in (result.final_model_dir, result.last_checkpoint) for f in d.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~current_umask()}


FAMILY_PIPELINES = {  # family -> (tiny pipeline, adapter class name, adapter kwargs, frames)
    "flux": ("tiny_flux_pipeline", "FluxAdapter", {"max_sequence_length": 8}, None),
    "wan": ("tiny_wan_pipeline", "WanAdapter", {"max_sequence_length": 8}, 5),
    "sd": ("tiny_unet_pipeline", "UNetAdapter", {}, None),
}


def family_trainer(family, tmp_path, name="run", **config):
    """A Flow-DPO trainer (2 steps of 2 pairs) on the family's tiny pipeline; returns (trainer, pipeline builder,
    adapter class, adapter kwargs, frames)."""
    from genalign import models
    from genalign.data import PreferencePair
    from genalign.models import tiny

    build_name, cls_name, kw, frames = FAMILY_PIPELINES[family]
    build, cls = getattr(tiny, build_name), getattr(models, cls_name)

    def media(rgb):
        return solid(rgb) if frames is None else np.stack([solid(rgb)] * frames)

    pairs = [PreferencePair("red circle", media((150 + 9 * i, 20, 20)), media((20, 20, 150 + 9 * i)), float(i % 2))
             for i in range(4)]
    trainer = FlowDPOTrainer(cls(build(), **kw), dpo_config(tmp_path, name, max_steps=2, batch_size=2, **config), pairs)
    return trainer, build, cls, kw, frames


@pytest.mark.parametrize("family", list(FAMILY_PIPELINES))
def test_flow_dpo_runs_on_every_adapter_family(family, tmp_path):
    """FLUX (packed latents), Wan (video latents) and an SD1.5 UNet (epsilon -> velocity): two steps move the
    LoRA and the saved LoRA loads into the family's stock pipeline."""
    trainer, build, cls, kw, frames = family_trainer(family, tmp_path)
    adapter = trainer.adapter
    result = trainer.train()
    logged = read_metrics(trainer.config.output_dir)
    assert logged[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and logged[1]["loss"] != logged[0]["loss"]
    stock = build()
    stock.load_lora_weights(str(result.final_model_dir))
    loaded = cls(stock, **kw)
    x = torch.randn(2, *adapter.latent_shape(32, 32, frames))
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        v_trained = adapter.velocity(x, t, adapter.encode_prompt(["red circle"] * 2))
        v_loaded = loaded.velocity(x, t, loaded.encode_prompt(["red circle"] * 2))
        with adapter.lora_disabled():
            v_base = adapter.velocity(x, t, adapter.encode_prompt(["red circle"] * 2))
    assert (v_loaded - v_trained).abs().max().item() < 1e-5
    assert (v_base - v_trained).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_recompute_attention_inputs_trains_the_same_weights_on_flux_and_wan(family, tmp_path):
    """FLUX's and Wan's processors swapped for genalign.models.attention's: the same trained weights."""
    plain, *_ = family_trainer(family, tmp_path, "plain")
    lean, *_ = family_trainer(family, tmp_path, "lean", recompute_attention_inputs=True)
    processors = {type(m.processor).__name__ for m in lean.adapter.denoiser.modules() if hasattr(m, "set_processor")}
    assert processors == {f"RecomputedInputs{family.capitalize()}AttnProcessor"}
    for t in (plain, lean):
        t.train()
    assert max_diff(weights(plain), weights(lean)) <= 1e-6


def test_cached_latents_give_the_same_loss_as_pixels(sd3_pipe, tmp_path):
    from genalign.data import build_cache, load_cache

    pairs = separable_pairs(4)
    encoder = sd3_adapter(sd3_pipe)
    cache = load_cache(build_cache(encoder, pairs, tmp_path / "cache", resolution=32, progress=False), adapter=encoder)
    trainer = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, max_steps=3), pairs)
    trainer.train()  # a LoRA that is not a no-op, so that the loss depends on the latents
    from_pixels = trainer.collate_fn(pairs)
    from_cache = trainer.collate_fn([cache[i] for i in range(len(cache))])
    assert "latents_a" in from_cache and "cond" in from_cache and "pixels_a" in from_pixels
    for a, b in zip(trainer.pair_latents(from_pixels), trainer.pair_latents(from_cache)):
        assert (a - b).abs().max().item() < 1e-5  # VAE batch composition differs: float rounding only
    loss_pixels, _ = fixed_batch_loss(trainer, from_pixels)
    loss_cache, _ = fixed_batch_loss(trainer, from_cache)
    assert loss_pixels != pytest.approx(np.log(2), abs=1e-3)
    # beta = 1000 amplifies that rounding (z = 500 x a difference of MSEs): compare to 1e-3 relative
    assert loss_cache == pytest.approx(loss_pixels, rel=1e-3)


def test_training_on_a_cache_releases_the_text_encoders(tmp_path):
    """`from_config` on a latent cache (the CLI's path) drops the text encoders, T5 included, after the cache's
    model check; the run's losses equal those of a trainer that kept them; encode_prompt says why it cannot run."""
    from unittest import mock

    import transformers

    from genalign.data import CacheMismatchError, build_cache, load_cache
    from genalign.models import load_adapter, tiny

    tiny.tiny_sd3_pipeline(with_t5=True).save_pretrained(tmp_path / "model")
    model, cache = str(tmp_path / "model"), str(tmp_path / "cache")
    build_cache(load_adapter(model), separable_pairs(8), cache, resolution=32, progress=False)
    # They are never even loaded: built empty from their configs, checked against the cache from their files.
    never = mock.patch.object(transformers.PreTrainedModel, "from_pretrained",
                              side_effect=AssertionError("a text encoder was loaded"))
    with never:
        released = FlowDPOTrainer.from_config(dpo_config(tmp_path, "released", model=model, data=cache,
                                                         max_steps=3))
    # ... and the check still reads their weights: another T5 with the same config is refused.
    other = load_adapter(model).pipe
    with torch.no_grad():
        other.text_encoder_3.shared.weight.mul_(-1)
    other.save_pretrained(tmp_path / "other-t5")
    with never, pytest.raises(CacheMismatchError, match="text encoder weights"):
        FlowDPOTrainer.from_config(dpo_config(tmp_path, "other", model=str(tmp_path / "other-t5"), data=cache))
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert released.adapter.released_text_encoders == names
    assert all(getattr(released.adapter.pipe, n) is None for n in names) and released.adapter.text_encoders() == []
    with pytest.raises(RuntimeError, match="text_encoder_3.*released"):
        released.adapter.encode_prompt(["red circle"])
    released.train()
    kept_adapter = load_adapter(model)
    kept = FlowDPOTrainer(kept_adapter, dpo_config(tmp_path, "kept", max_steps=3),
                          load_cache(cache, adapter=kept_adapter))
    kept.train()
    assert len(kept_adapter.text_encoders()) == 3
    losses = [r["loss"] for r in read_metrics(tmp_path / "released")]
    assert len(losses) == 3 and losses[-1] != pytest.approx(losses[0])
    assert losses == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "kept")], abs=1e-6)


def test_a_reference_model_with_the_same_text_encoders_reads_the_cached_embeddings(tmp_path):
    """reference=model on a latent cache: a reference whose text encoders are the cache's (the usual case, a
    model fine-tuned from the same base) never loads them and reads the batch's embeddings, with the same reference
    velocity as encoding the prompts itself; one with another T5 loads its own and encodes each batch's prompts."""
    from unittest import mock

    import transformers

    from genalign.data import build_cache
    from genalign.models import load_adapter, tiny

    tiny.tiny_sd3_pipeline(with_t5=True).save_pretrained(tmp_path / "model")
    model, cache = str(tmp_path / "model"), str(tmp_path / "cache")
    build_cache(load_adapter(model), separable_pairs(8), cache, resolution=32, progress=False)
    other = load_adapter(model).pipe
    with torch.no_grad():
        other.text_encoder_3.shared.weight.mul_(-1)
    other.save_pretrained(tmp_path / "other-t5")
    never = mock.patch.object(transformers.PreTrainedModel, "from_pretrained",
                              side_effect=AssertionError("a text encoder was loaded"))

    def reference_velocity(trainer, encode_itself=None):
        batch = trainer.collate_fn([trainer.train_dataset[i] for i in range(4)])
        cond = {k: torch.cat([v, v]) for k, v in batch["cond"].items()}
        torch.manual_seed(0)
        x_t, t = torch.randn(8, *trainer.adapter.latent_shape(32, 32)), torch.rand(8)
        if encode_itself is not None:
            trainer.reference_adapter, trainer.reference_shares_text_encoding = encode_itself, False
        return trainer.reference_velocity(x_t, t, cond, batch["prompt"])

    with never:
        shared = FlowDPOTrainer.from_config(dpo_config(tmp_path, "shared", model=model, data=cache, max_steps=2,
                                                       reference="model", reference_model_path=model))
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert shared.reference_shares_text_encoding
    assert all(getattr(shared.reference_adapter.pipe, n) is None for n in names)
    v_shared = reference_velocity(shared)
    v_encoding = reference_velocity(shared, encode_itself=load_adapter(model))
    assert (v_shared - v_encoding).abs().max().item() < 1e-5

    own = FlowDPOTrainer.from_config(dpo_config(tmp_path, "own", model=model, data=cache, max_steps=2,
                                                reference="model", reference_model_path=str(tmp_path / "other-t5")))
    assert not own.reference_shares_text_encoding and len(own.reference_adapter.text_encoders()) == 3
    v_own = reference_velocity(own)
    v_other_encoding = reference_velocity(own, encode_itself=load_adapter(str(tmp_path / "other-t5")))
    assert (v_own - v_other_encoding).abs().max().item() < 1e-5 and (v_own - v_shared).abs().max().item() > 1e-3
    shared.train()
    assert [r["step"] for r in read_metrics(tmp_path / "shared")] == [1, 2]


def test_flow_dpo_resume_is_exact(sd3_pipe, tmp_path):
    """N steps + resume + N steps == 2N steps (max abs diff <= 1e-6), with warmup + cosine, grad accumulation,
    EMA and an online reference adapter refreshed every 2 steps (its snapshot must be checkpointed too)."""
    kw = {"max_steps": 6, "grad_accum": 2, "batch_size": 2, "lr_scheduler": "cosine", "warmup_steps": 2,
          "ema_decay": 0.8, "reference": "adapter", "reference_refresh_every": 2, "checkpoint_every": 3,
          "beta": 500.0, "lr": 5e-3}
    straight = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, "straight", **kw), separable_pairs(12))
    straight.train()

    first = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, "split", **kw), separable_pairs(12))
    first.train(stop_at_step=3)
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-3"
    del first
    second = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, "split", resume="latest", **kw),
                            separable_pairs(12))
    assert max_diff(weights(second), weights(straight)) > 1e-4  # a fresh LoRA before loading: the test can fail
    second.train()
    assert second.state.step == 6
    assert max_diff(weights(second), weights(straight)) <= 1e-6
    assert max_diff(second.reference_snapshot, straight.reference_snapshot) <= 1e-6
    with second.ema_weights():
        ema_second = weights(second)
    with straight.ema_weights():
        assert max_diff(ema_second, weights(straight)) <= 1e-6
    split_log, straight_log = read_metrics(tmp_path / "split"), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in split_log] == list(range(1, 7))  # no duplicated steps after the resume
    assert [r["loss"] for r in split_log] == pytest.approx([r["loss"] for r in straight_log], abs=1e-6)
    assert (tmp_path / "split" / "lora_ema" / "pytorch_lora_weights.safetensors").is_file()


def test_flow_dpo_tie_policies(sd3_pipe, tmp_path):
    pairs = separable_pairs(4, with_ties=4)  # [decided x4, ties x4]
    out = {}
    for policy in ("drop", "half", "keep_first"):
        trainer = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, policy, tie_policy=policy, max_steps=1),
                                 pairs)
        batch = trainer.collate_fn(pairs)
        swap, keep, label_w = trainer.orient_pairs(batch["label"])
        out[policy] = (keep.tolist(), label_w.tolist())
        loss, metrics = trainer.compute_loss(batch)
        assert torch.isfinite(loss) and metrics["ties_in_batch"] == 4.0
    assert swap.tolist() == [True, False, True, False] + [False] * 4
    assert out["drop"] == ([True] * 4 + [False] * 4, [1.0] * 4 + [0.5] * 4)
    assert out["half"] == ([True] * 8, [1.0] * 4 + [0.5] * 4)
    assert out["keep_first"] == ([True] * 8, [1.0] * 8)


def test_flow_dpo_reference_model_and_gradient_checkpointing(sd3_pipe, tmp_path):
    # A separate reference model identical to the base: before training the loss is exactly log 2.
    cfg = dpo_config(tmp_path, "ref-model", reference="model", reference_model_path="unused-when-given", max_steps=1)
    trainer = FlowDPOTrainer(sd3_adapter(sd3_pipe), cfg, separable_pairs(4), reference_adapter=sd3_adapter(sd3_pipe))
    loss, _ = trainer.compute_loss(trainer.collate_fn(separable_pairs(4)))
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)

    # Gradient checkpointing changes memory, not the result.
    after = {}
    for gc in (False, True):
        t = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, f"gc-{gc}", gradient_checkpointing=gc,
                                                            max_steps=2), separable_pairs(8))
        t.train()
        after[gc] = weights(t)
    assert max_diff(after[False], after[True]) <= 1e-6


@pytest.mark.parametrize("share", [0.5, 1 / 3])
def test_checkpointing_a_share_of_the_blocks_recomputes_those_and_keeps_the_result(sd3_pipe, tmp_path, share):
    """checkpoint_share: the chosen blocks (evenly spread) run their forward again in the backward pass, the
    others do not; the trained weights equal an unchecked run's."""
    from genalign.trainers.loop import checkpointable_blocks, evenly_spread

    assert evenly_spread(6, 0.5) == [1, 3, 5] and evenly_spread(6, 1 / 3) == [2, 5] and evenly_spread(24, 0.25) == [
        3, 7, 11, 15, 19, 23] and evenly_spread(2, 0.1) == [1] and evenly_spread(5, 1.0) == [0, 1, 2, 3, 4]

    def forwards_per_block(trainer):
        blocks = checkpointable_blocks(trainer.adapter.denoiser)
        calls = [0] * len(blocks)
        hooks = [b.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
                 for i, b in enumerate(blocks)]
        loss, _ = trainer.compute_loss(trainer.collate_fn(separable_pairs(4)))
        loss.backward()
        for h in hooks:
            h.remove()
        return calls

    plain = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, "plain", max_steps=2), separable_pairs(8))
    chosen = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, f"share-{share:.2f}", max_steps=2,
                                                             gradient_checkpointing=True, checkpoint_share=share),
                            separable_pairs(8))
    base, checked = forwards_per_block(plain), forwards_per_block(chosen)
    n = len(base)
    assert n >= 2 and set(base) == {2}  # the policy's forward and the reference's (the adapter-disabled network)
    assert checked == [2 + (i in evenly_spread(n, share)) for i in range(n)] and 2 < max(checked) and min(checked) == 2
    for t in (plain, chosen):
        t.model.zero_grad(set_to_none=True)
        t.train()
    assert max_diff(weights(plain), weights(chosen)) <= 1e-6
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="checkpoint_share"):
            dpo_config(tmp_path, "bad", checkpoint_share=bad)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_checkpointing_feedforwards_recomputes_only_those_and_keeps_the_result(sd3_pipe, tmp_path, share):
    """checkpoint_unit=feedforward: the chosen blocks' FeedForward modules run again in the backward pass, the
    blocks themselves (and the other blocks' feed-forwards) do not; the trained weights equal an unchecked run's."""
    from genalign.trainers.loop import checkpointable_blocks, evenly_spread, feedforward_modules

    def forwards(trainer):
        blocks = checkpointable_blocks(trainer.adapter.denoiser)
        watched = [(i, m) for i, b in enumerate(blocks) for m in [b, *feedforward_modules(b)]]
        calls = [0] * len(watched)
        # a recomputation calls the checkpointed module's forward directly, its submodules as modules: hook those
        hooks = [(m.net[0] if type(m).__name__ == "FeedForward" else m).register_forward_pre_hook(
                 lambda *_, k=k: calls.__setitem__(k, calls[k] + 1)) for k, (_, m) in enumerate(watched)]
        loss, _ = trainer.compute_loss(trainer.collate_fn(separable_pairs(4)))
        loss.backward()
        for h in hooks:
            h.remove()
        return [(i, type(m).__name__, n) for (i, m), n in zip(watched, calls)]

    plain = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, "plain", max_steps=2), separable_pairs(8))
    ff = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, f"ff-{share}", max_steps=2, checkpoint_share=share,
                                                         gradient_checkpointing=True, checkpoint_unit="feedforward"),
                        separable_pairs(8))
    base, checked = forwards(plain), forwards(ff)
    n = len(checkpointable_blocks(plain.adapter.denoiser))
    chosen = evenly_spread(n, share)
    assert {kind for _, kind, _ in base} == {"JointTransformerBlock", "FeedForward"} and {c for *_, c in base} == {2}
    expected = [(i, kind, 2 + (kind == "FeedForward" and i in chosen)) for i, kind, _ in base]
    assert checked == expected and any(c == 3 for *_, c in checked)
    for t in (plain, ff):
        t.model.zero_grad(set_to_none=True)
        t.train()
    assert max_diff(weights(plain), weights(ff)) <= 1e-6
    with pytest.raises(ConfigError, match="checkpoint_unit"):
        dpo_config(tmp_path, "bad", checkpoint_unit="layer")


def test_recompute_attention_inputs_trains_the_same_weights(sd3_pipe, tmp_path):
    """recompute_attention_inputs: SD3's attention processors swapped for genalign.models.attention's, the same
    trained weights as a plain run (with feed-forward checkpointing too: the setting the benchmark measures)."""
    from genalign.models.attention import RecomputedInputsJointAttnProcessor

    plain = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, "plain", max_steps=2), separable_pairs(8))
    lean = FlowDPOTrainer(sd3_adapter(sd3_pipe), dpo_config(tmp_path, "lean", max_steps=2, recompute_attention_inputs=True,
                                                           gradient_checkpointing=True, checkpoint_unit="feedforward"),
                          separable_pairs(8))
    processors = [m.processor for m in lean.adapter.denoiser.modules() if hasattr(m, "set_processor")]
    assert processors and all(isinstance(p, RecomputedInputsJointAttnProcessor) for p in processors)
    for t in (plain, lean):
        t.train()
    assert max_diff(weights(plain), weights(lean)) <= 1e-6


def test_bf16_keeps_the_lora_in_float32(sd3_pipe, tmp_path):
    cfg = dpo_config(tmp_path, "bf16", mixed_precision="bf16", max_steps=2)
    trainer = FlowDPOTrainer(sd3_adapter(sd3_pipe), cfg, separable_pairs(8))
    trainer.train()
    dtypes = {p.dtype for _, p in trainer.named_trainable}
    frozen = {p.dtype for p in trainer.adapter.denoiser.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    assert all(r["loss"] is not None for r in read_metrics(cfg.output_dir))  # finite losses (NaN is written null)


def test_recipe_loads_and_unknown_keys_are_named(tmp_path):
    cfg = load_config(FlowDPOConfig, recipe_path("flow_dpo_world"), ["data=pairs.parquet", "lora_rank=4"])
    assert cfg.model == "world" and cfg.beta == 100.0 and cfg.mixed_precision == "no" and cfg.lora_rank == 4
    with pytest.raises(ConfigError, match="'bta'.*did you mean beta"):
        load_config(FlowDPOConfig, recipe_path("flow_dpo_world"), ["bta=3"])
    with pytest.raises(ConfigError, match="'reference'"):
        load_config(FlowDPOConfig, None, ["reference=ema"])
    with pytest.raises(ConfigError, match="'lr_scheduler'"):
        load_config(FlowDPOConfig, None, ["lr_scheduler=step"])
    with pytest.raises(ConfigError, match="reference_model_path"):
        FlowDPOConfig(reference="model")


def test_sft_weight_adds_the_winners_flow_matching_error(sd3_pipe, tmp_path):
    """loss(sft_weight=w) = Flow-DPO loss + w * mean winners' error, on the same batch, noise and t."""
    adapter = sd3_adapter(sd3_pipe)
    plain = FlowDPOTrainer(adapter, dpo_config(tmp_path, "plain", max_steps=1), separable_pairs())
    batch = plain.collate_fn(separable_pairs(8))
    plain.generator.manual_seed(5)
    with torch.no_grad():
        loss0, metrics0 = plain.compute_loss(batch)
    with_sft = FlowDPOTrainer(adapter, dpo_config(tmp_path, "sft", max_steps=1, sft_weight=2.5), separable_pairs())
    with_sft.generator.manual_seed(5)
    with torch.no_grad():
        loss1, _ = with_sft.compute_loss(batch)
    assert float(loss1) == pytest.approx(float(loss0) + 2.5 * float(metrics0["mse_w"]), rel=1e-5)
    with pytest.raises(ConfigError, match="sft_weight"):
        dpo_config(tmp_path, sft_weight=-1.0)


def test_lora_disabled_switches_off_adapters_added_after_its_first_use(sd3_pipe):
    from genalign.models import LoraSpec

    adapter = sd3_adapter(sd3_pipe)
    base = velocity_probe(adapter)
    adapter.add_lora(LoraSpec(rank=2))
    with adapter.lora_disabled():
        pass
    # on other layers than the first: new LoRA layers the cached list does not hold
    adapter.add_lora(LoraSpec(rank=2, adapter_name="second", target_modules=("proj_out",)))
    adapter.denoiser.set_adapters(["default", "second"])
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert (velocity_probe(adapter) - base).abs().max() > 1e-2
    with adapter.lora_disabled():
        assert (velocity_probe(adapter) - base).abs().max() < 1e-5
    assert (velocity_probe(adapter) - base).abs().max() > 1e-2


def test_compile_memory_budget_keeps_fewer_activations_and_gives_the_same_gradients(sd3_pipe, tmp_path):
    """compile_memory_budget < 1: the compiled step saves fewer bytes for its backward (torch.compile recomputes
    instead) and computes the same loss and gradients as the default budget."""
    results = {}
    for budget in (1.0, 0.1):
        torch._dynamo.reset()
        cfg = dpo_config(tmp_path, f"budget-{budget}", compile="full", compile_memory_budget=budget)
        trainer = FlowDPOTrainer(sd3_adapter(sd3_pipe), cfg, separable_pairs(8))
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = trainer.compute_loss(trainer.collate_fn(separable_pairs(8)))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for _, p in trainer.named_trainable])
        results[budget] = (sum(saved.values()), loss.item(), grads)
    (kept_default, loss_default, g_default), (kept_low, loss_low, g_low) = results[1.0], results[0.1]
    assert kept_low < 0.8 * kept_default, (kept_low, kept_default)
    assert loss_low == pytest.approx(loss_default, abs=1e-6)
    assert (g_low - g_default).abs().max().item() < 1e-5 and g_default.abs().max().item() > 1e-4
    torch._functorch.config.activation_memory_budget = 1.0  # process-wide: leave it as found
    with pytest.raises(ConfigError, match="compile_memory_budget"):
        dpo_config(tmp_path, compile_memory_budget=1.5)


@pytest.mark.parametrize("how", ["blocks", "full"])
def test_compiled_training_matches_eager_and_saves_the_same_lora_names(sd3_pipe, tmp_path, how):
    """compile=blocks / full trains the same numbers as eager (to float round-off: inductor fuses differently)
    and, compiled in place, writes the LoRA under the same names, loadable by the stock pipeline."""
    from genalign.models import SD3Adapter
    from genalign.trainers.loop import compile_model

    results = {}
    for mode in ("no", how):
        torch._dynamo.reset()
        cfg = dpo_config(tmp_path, f"run-{mode}", max_steps=2, compile=mode)
        trainer = FlowDPOTrainer(sd3_adapter(sd3_pipe), cfg, separable_pairs(8))
        compiled = [m for m in trainer.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        expected = {"no": 0, "full": 1, "blocks": len(trainer.model.transformer_blocks)}[mode]
        assert len(compiled) == expected, (mode, len(compiled))
        result = trainer.train()
        results[mode] = (weights(trainer), velocity_probe(trainer.adapter), result.final_model_dir)
    (w_eager, v_eager, _), (w_compiled, v_compiled, lora_dir) = results["no"], results[how]
    assert set(w_compiled) == set(w_eager)
    assert max_diff(w_eager, w_compiled) < 1e-4
    assert max(p.abs().max().item() for n, p in w_compiled.items() if "lora_B" in n) > 1e-3  # it trained
    assert (v_compiled - v_eager).abs().max().item() < 1e-3
    stock = copy.deepcopy(sd3_pipe)
    stock.load_lora_weights(str(lora_dir))
    assert (velocity_probe(SD3Adapter(stock)) - v_compiled).abs().max().item() < 1e-4

    with pytest.raises(ConfigError, match="'compile'.*no, blocks, full"):
        dpo_config(tmp_path, compile="yes")
    with pytest.raises(ConfigError, match="no '\\*blocks' / 'layers' module lists"):
        compile_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), "blocks")


def test_regional_compilation_finds_the_repeated_blocks_of_diffusers_and_transformers_models():
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from genalign.models import tiny
    from genalign.trainers.loop import repeated_blocks

    clip = CLIPModel(CLIPConfig(text_config=CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2, vocab_size=64),
                                vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                               num_attention_heads=2, image_size=32, patch_size=8)))
    assert repeated_blocks(clip) == [*clip.text_model.encoder.layers, *clip.vision_model.encoder.layers]
    flux = tiny.tiny_flux_pipeline().transformer
    assert repeated_blocks(flux) == [*flux.transformer_blocks, *flux.single_transformer_blocks]
    unet = tiny.tiny_unet_pipeline().unet  # down / up blocks; never a module inside one already taken
    found = repeated_blocks(unet)
    assert found[:len(unet.down_blocks) + len(unet.up_blocks)] == [*unet.down_blocks, *unet.up_blocks]
    inside = {id(m) for block in found for m in block.modules() if m is not block}
    assert not any(id(block) in inside for block in found)


def test_compiled_training_resumes_exactly(sd3_pipe, tmp_path):
    """compile=full: 2 steps + resume + 2 steps gives the same LoRA as 4 straight (the compiled model's state and
    the checkpoint's names are the eager ones)."""
    torch._dynamo.reset()

    def run(name, steps, resume=None):
        cfg = dpo_config(tmp_path, name, max_steps=steps, compile="full", checkpoint_every=2, resume=resume)
        trainer = FlowDPOTrainer(sd3_adapter(sd3_pipe), cfg, separable_pairs(16))
        trainer.train()
        return weights(trainer)

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, resume="latest")
    assert max_diff(straight, resumed) <= 1e-6
    assert max(p.abs().max().item() for n, p in resumed.items() if "lora_B" in n) > 1e-3


def test_the_sd35_medium_recipe_is_a_valid_gpu_config_that_asks_for_its_model(tmp_path):
    cfg = load_config(FlowDPOConfig, recipe_path("flow_dpo_sd35_medium"), [f"data={tmp_path}"])
    assert (cfg.mixed_precision, cfg.compile, cfg.resolution, cfg.reference) == ("bf16", "blocks", 512, "disabled_adapter")
    with pytest.raises(ConfigError, match="'model': give the pipeline folder"):
        FlowDPOTrainer.from_config(cfg)
