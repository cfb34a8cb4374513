"""The benchmark scripts' CPU modes run end to end and write the JSON the GPU runs are read from.

Tiny budgets only (a few steps / items): these check the code paths and the report's keys, never timings.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT, check=False)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_flow_dpo_step_tiny_runs_the_at_scale_path_and_reports_flops_and_timings(tmp_path):
    out = tmp_path / "flow.json"
    run_script("flow_dpo_step.py", "--tiny", "--px", "64", "--variants", "eager", "raw", "--steps", "2",
               "--warmup", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report) >= {"meta", "ceiling", "results"}
    assert report["meta"]["tiny"] and report["meta"]["pairs_per_step"] == 2
    assert report["ceiling"]["tflops"] > 0
    assert [(r["variant"], r["px"]) for r in report["results"]] == [("eager", 64), ("raw", 64)]
    for r in report["results"]:
        assert "error" not in r, r
        assert r["ms_per_step"] > 0 and r["flops_per_step"] > 0 and r["tflops"] > 0
        assert r["share_of_ceiling"] > 0 and len(r["ms_all"]) == 2 and r["flops_by_op"]
        assert r["lora_params"] > 0 and r["nonfinite_skipped"] == 0
    # one FLOP count per resolution, shared by the variants
    assert len({r["flops_per_step"] for r in report["results"]}) == 1


def import_benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_live_heap_peak_sees_a_short_lived_allocation_and_its_release():
    """The CPU benchmark's live memory (glibc's bytes in use, sampled by a thread): a 256 MB tensor held for a
    moment raises the peak by its size; freed, the bytes in use fall back (where the resident size need not)."""
    bench = import_benchmark("flow_dpo_step")
    if bench.heap_in_use_mb() is None:
        pytest.skip("not glibc: no mallinfo2")
    before = bench.heap_in_use_mb()
    with bench.HeapPeak() as live:
        x = torch.ones(64, 2**20)  # 256 MiB
        time.sleep(0.05)
        del x
    assert live.peak - before == pytest.approx(256, abs=16)
    assert bench.heap_in_use_mb() - before < 16
    # restart(): a new peak from now on (as after the warm-up steps); the whole block's peak is kept
    with bench.HeapPeak() as live:
        x = torch.ones(64, 2**20)
        time.sleep(0.05)
        del x
        live.restart()
        y = torch.ones(16, 2**20)  # 64 MiB
        time.sleep(0.05)
        del y
    assert live.above(before) == pytest.approx(64, abs=16)
    assert live.above(before, whole_run=True) == pytest.approx(256, abs=16)


def test_tensor_memory_counts_resident_state_once_and_a_steps_highest_rise():
    """The benchmark's GPU-like tensor memory: the storages of the modules' weights and the optimizer's state,
    each once however many tensors view it (tied weights), none for the meta device; and the highest rise of
    tensor memory inside a step, from the allocator's events, however it ends."""
    bench = import_benchmark("flow_dpo_step")
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    model[1].weight = model[0].weight  # tied: one storage
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 512)).sum().backward()
    opt.step()
    weights = 512 * 512 + 2 * 512
    assert bench.resident_tensor_mb([model, torch.nn.Linear(64, 64, device="meta")], [opt]) * 2**20 == \
        pytest.approx(4 * 3 * weights + 8, abs=64)  # weights, exp_avg, exp_avg_sq (+ the scalar steps)

    def step():
        a = torch.ones(8, 2**20)  # 32 MiB
        b = torch.ones(4, 2**20)  # 16 MiB, both alive: 48
        del a, b
        return torch.ones(2**20)  # 4 MiB, kept

    assert bench.step_tensor_rise_mb(step) == pytest.approx(48, abs=0.5)


def test_flow_dpo_step_cpu_on_sd35m_proportions_and_the_meta_count_agrees_with_the_trainer(tmp_path):
    """The CPU mode on the proportioned SD3 (T5 + two CLIPs + a 4-level VAE): both ways train and report; the
    FLOPs counted on the real trainer's step and on the peer's equal the meta-device count of the same configs
    (`count_two_ways`, the method behind --count-real-size), so that count can stand for the real model's."""
    run_script("flow_dpo_step.py", "--model", "sd35m-proportions", "--pairs", "1", "--steps", "3", "--warmup", "1",
               "--variants", "genalign", "--rounds", "2", "--out", str(tmp_path))
    report = json.loads((tmp_path / "flow_dpo_step_cpu_sd35m-proportions.json").read_text())
    assert report["model"] == "sd35m-proportions" and report["px"] == 256 and set(report["results"]) == {"peer", "genalign"}
    # two rounds of both ways in turn: the speedup is the median (here: the mean) of the two rounds' ratios
    times = {v: r["step_s_per_round"] for v, r in report["results"].items()}
    per_round = [p / g for p, g in zip(times["peer"], times["genalign"])]
    assert report["speedup_per_round"]["genalign"] == pytest.approx(per_round)
    assert report["speedup"]["genalign"] == pytest.approx(sum(per_round) / 2)
    for r in report["results"].values():
        assert r["step_s"] > 0 and r["peak_mb"] > 0
        assert r["peak_reset"] or not sys.platform.startswith("linux")  # the peak is that of training, not loading
        assert r["live_peak_mb"] is None or 0 < r["live_peak_mb"] <= r["peak_mb"] * 1.5
        assert 0 < r["tensor_resting_mb"] < r["tensor_peak_mb"]
    # kept between steps: the peer's two transformers, text encoders and VAE against genalign's one transformer
    assert report["results"]["peer"]["tensor_resting_mb"] > 2 * report["results"]["genalign"]["tensor_resting_mb"]
    bench = import_benchmark("flow_dpo_step")
    count = bench.count_two_ways(bench.PROPORTIONED_TRANSFORMER, bench.PROPORTIONED_T5, 64, bench.PROPORTIONED_CLIPS,
                                 16, bench.PROPORTIONED_VAE, pairs=1, resolutions=(256,))["resolutions"][256]
    measured = report["results"]
    assert measured["genalign"]["gflop_per_step"] == pytest.approx(count["genalign_tflop"] * 1e3, rel=0.03)
    assert measured["peer"]["gflop_per_step"] == pytest.approx(count["peer_tflop"] * 1e3, rel=0.03)
    assert report["arithmetic_ratio"] == pytest.approx(count["arithmetic_ratio"], rel=0.03) and count["arithmetic_ratio"] > 1.2


def test_reward_throughput_cpu_reports_batched_and_reload_per_call_items_per_second(tmp_path):
    out = tmp_path / "reward.json"
    run_script("reward_throughput.py", "--items", "4", "--reload-calls", "1", "--batch-sizes", "1", "4",
               "--reps", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"image", "video"}
    for kind, entry in report["results"].items():
        assert "error" not in entry, (kind, entry)
        rows = {r["mode"]: r for r in entry["rows"]}
        assert set(rows) == {"reload_per_call", "resident_bs1", "resident_bs4"}
        assert all(r["items_per_s"] > 0 for r in rows.values())
        assert entry["speedup_best_vs_reload"] > 0 and entry["best_resident"]["items_per_s"] > 0


@pytest.mark.parametrize("mode, dtype, tolerance", [((), "torch.float32", 1e-4), (("--smoke",), "torch.bfloat16", 5e-2)])
def test_rlg_step_times_every_variant_and_checks_rlg_against_the_public_method(tmp_path, mode, dtype, tolerance):
    """The CPU mode and --smoke (the --gpu path's SD3.5 block types in bf16, tiny): every variant timed, and one
    step of genalign's mixed batch equals the public two-call method."""
    out = tmp_path / "rlg.json"
    run_script("rlg_step.py", *mode, "--steps", "2", "--rounds", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["meta"]["dtype"] == dtype
    if mode:
        assert report["meta"]["config"]["qk_norm"] == "rms_norm" and report["meta"]["config"]["dual_attention_layers"]
    (result,) = report["results"]
    assert set(result["step_ms"]) == {"a_stock_cfg", "b_genalign_cfg", "c_public_rlg", "d_genalign_rlg",
                                      "d2_genalign_rlg_seq", "d3_rlg_peft_mixed", "e_nrg", "e2_rlg_nrg"}
    assert all(ms > 0 for ms in result["step_ms"].values()) and result["ratio_to_stock_cfg"]["a_stock_cfg"] == 1.0
    assert result["check_public_vs_mixed_rel_maxdiff"] < tolerance


def test_memory_tools_world_reports_each_setting_against_plain(tmp_path):
    out = tmp_path / "mem.json"
    run_script("memory_tools_world.py", "--kind", "image", "--pairs", "2", "--settings", "plain",
               "checkpoint_feedforward", "--out", str(out))
    report = json.loads(out.read_text())
    plain, ff = report["results"]["plain"], report["results"]["checkpoint_feedforward"]
    assert plain["resting_mb"] == ff["resting_mb"] > 0  # the same model and LoRA
    assert plain["peak_ratio"] == 1.0 and 0 < ff["step_rise_mb"] < plain["step_rise_mb"]
    assert ff["peak_ratio"] == pytest.approx(ff["peak_mb"] / plain["peak_mb"])


def test_video_decode_benchmark_compares_both_decoders_on_the_same_frames(tmp_path):
    out = tmp_path / "decode.json"
    run_script("video_decode.py", "--clips", "3", "--threads", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert [(r["encoding"], r["threads"]) for r in report["results"]] == [("libx264rgb lossless", 1),
                                                                         ("libx264 yuv420p", 1)]
    for r in report["results"]:
        assert r["same_frames"] and r["pyav_files_per_s"] > 0 and r["imageio_files_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["pyav_files_per_s"] / r["imageio_files_per_s"], rel=0.05)
