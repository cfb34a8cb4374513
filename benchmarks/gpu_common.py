"""Helpers shared by the benchmarks that also run on a GPU (flow_dpo_step.py, reward_throughput.py).

Timing (CUDA events on a GPU, perf_counter on the CPU), the bf16 matmul ceiling, peak memory, random-init
construction straight on the device in the target dtype, per-configuration error records (an OOM or a missing
package is written down and the run goes on) and the JSON output path (`--out FILE.json`, `--out FOLDER`, or
`$OUT`). Imports nothing heavy: the scripts stay importable without diffusers / transformers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import time
import traceback
from pathlib import Path

import torch

OFFLINE_ENV = {  # scripts/offline-env.sh: no hub lookups (they retry for minutes offline), no progress bars
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1",
}


def offline_env() -> None:
    """Set the offline defaults (before transformers / diffusers are imported) and quiet their loggers."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("transformers", "diffusers"):
        try:
            module = __import__(f"{name}.utils", fromlist=["logging"])
            module.logging.set_verbosity_error()
            module.logging.disable_progress_bar()
        except ImportError:  # not installed: the script records that itself
            continue


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def build_on(device, dtype):
    """Create modules directly on `device` in `dtype` (random init of a multi-billion-parameter model on the CPU
    in float32 takes minutes; on the GPU in bf16, seconds)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def time_calls(fn, n: int, device) -> list[float]:
    """Seconds per call of `fn` for n consecutive calls (CUDA events on a GPU: no sync between calls)."""
    device = torch.device(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            fn()
            events[i + 1].record()
        torch.cuda.synchronize()
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(n)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def wall(fn, device) -> float:
    """Wall seconds of one call, synchronised (warm-up / compile calls)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_ceiling(device, dtype=torch.bfloat16, n: int | None = None, reps: int | None = None) -> dict:
    """Measured dense matmul throughput (TFLOP/s): n x n @ n x n in `dtype` (GPU: 8192^3, as GPU.md's anchor)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 512)
    reps = reps or (20 if device.type == "cuda" else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    def product():
        return a @ b

    for _ in range(3):
        product()
    sync(device)
    times = time_calls(product, reps, device)
    best = min(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "reps": reps,
            "tflops": 2 * n**3 / best / 1e12, "tflops_median": 2 * n**3 / sorted(times)[len(times) // 2] / 1e12}


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None


def allocated_gib(device) -> float | None:
    if torch.device(device).type == "cuda":
        return round(torch.cuda.memory_allocated() / 2**30, 3)
    return None


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_memory(device) -> None:
    gc.collect()
    import torch._dynamo

    torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def error_record(e: BaseException) -> dict:
    """What went wrong in one configuration, for the JSON (the run continues with the next one)."""
    oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
    missing = isinstance(e, ImportError)
    tail = traceback.format_exception(type(e), e, e.__traceback__)[-3:]
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
            "error_kind": "oom" if oom else "missing_package" if missing else "other",
            "traceback_tail": "".join(tail)[-1500:]}


def output_path(out: str | None, default_name: str) -> Path | None:
    """`--out x.json` -> that file; `--out DIR` -> DIR/default_name; nothing -> $OUT/default_name or None."""
    if out:
        p = Path(out)
        return p if p.suffix == ".json" else p / default_name
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / default_name
    return None


def write_json(path: Path | None, obj) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft", "open_clip", "accelerate"):
        try:
            from importlib.metadata import version

            out[name] = version(name if name != "open_clip" else "open_clip_torch")
        except Exception:  # noqa: BLE001 - not installed
            out[name] = None
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
