"""Load test of the demo: 20 concurrent requests against `python -m genalign.app`, latency p50 / p95.

Launches the demo in a subprocess on a free port of 127.0.0.1 (the world's image model + its shipped LoRA),
waits until it answers, then fires --requests generate calls at once from a bounded pool of gradio_client
callers (ThreadPoolExecutor(max_workers=--workers)). Checks that every request comes back with two images and
with its own seed (none lost, none mixed up), then prints latency percentiles (submit -> result, as a user
waits: queueing included) and the throughput.

    python benchmarks/demo_load.py                      # 20 requests, 20 steps, server --concurrency 1
    python benchmarks/demo_load.py --concurrency 2 --steps 8

tests/test_demo.py runs the same `fire` with few steps and asserts only that all requests succeed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, extra_args=(), log_path: str | os.PathLike | None = None,
                 timeout: float = 180.0) -> subprocess.Popen:
    """`python -m genalign.app --port PORT --threads 1 ...` in a subprocess; returns once GET / answers 200.
    Raises RuntimeError with the server's output if it exits or does not answer within `timeout` seconds."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONWARNINGS": "ignore"}
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "genalign.app", "--port", str(port), "--threads", "1",
                             *map(str, extra_args)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    out = Path(log_path).read_text()[-3000:] if log_path else ""
    raise RuntimeError(f"the demo did not answer on {url} (exit code {proc.returncode}):\n{out}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def fire(url: str, n: int = 20, workers: int = 20, steps: int = 20, prompt: str = "red circle",
         w_values=(1.0,)) -> list[dict]:
    """n generate requests at once from `workers` threads (request i: seed i, w = w_values[i % len]).
    Returns one dict per request: ok, seconds, seed, w, result (the 5 outputs) or error."""
    from gradio_client import Client

    client = Client(url, verbose=False)

    def one(i: int) -> dict:
        w = w_values[i % len(w_values)]
        t0 = time.perf_counter()
        try:
            result = client.predict(prompt=prompt, seed=i, steps=steps, cfg=4.0, w=w, height=32, width=32,
                                    api_name="/generate")
            return {"ok": True, "seconds": time.perf_counter() - t0, "seed": i, "w": w, "result": result}
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            return {"ok": False, "seconds": time.perf_counter() - t0, "seed": i, "w": w, "error": repr(e)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(n)))


def check(results: list[dict], n: int) -> list[str]:
    """Problems: lost or failed requests, a missing image, a result carrying another request's seed."""
    problems = []
    if len(results) != n:
        problems.append(f"{n - len(results)} requests lost")
    for r in results:
        if not r["ok"]:
            problems.append(f"seed {r['seed']}: {r['error']}")
            continue
        base, aligned, _, _, info = r["result"]
        if not (base and Path(base).is_file() and aligned and Path(aligned).is_file()):
            problems.append(f"seed {r['seed']}: no image")
        if not str(info).startswith(f"seed {r['seed']} "):
            problems.append(f"seed {r['seed']}: the reply describes another request ({info[:40]!r})")
    return problems


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--workers", type=int, default=20, help="client threads firing requests")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per sample (the world's default: 20)")
    ap.add_argument("--concurrency", type=int, default=1, help="the server's --concurrency")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)

    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"genalign-demo-load-{port}.log"
    t0 = time.perf_counter()
    proc = start_server(port, ["--concurrency", args.concurrency], log_path=log)
    startup = time.perf_counter() - t0
    try:
        url = f"http://127.0.0.1:{port}/"
        fire(url, n=1, workers=1, steps=args.steps)  # warm-up (first-call overheads), not counted
        t1 = time.perf_counter()
        results = fire(url, n=args.requests, workers=args.workers, steps=args.steps)
        wall = time.perf_counter() - t1
    finally:
        stop_server(proc)
    problems = check(results, args.requests)
    lat = [r["seconds"] for r in results if r["ok"]]
    summary = {"requests": args.requests, "succeeded": len(lat), "workers": args.workers, "steps": args.steps,
               "server_concurrency": args.concurrency, "startup_s": round(startup, 1), "wall_s": round(wall, 2),
               "throughput_rps": round(len(lat) / wall, 2),
               "p50_s": round(percentile(lat, 0.5), 2) if lat else None,
               "p95_s": round(percentile(lat, 0.95), 2) if lat else None,
               "max_s": round(max(lat), 2) if lat else None, "problems": problems}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
