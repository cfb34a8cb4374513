"""Video decoding: PyAV in-process (genalign's default when `av` is installed) vs imageio's ffmpeg process per file.

    python benchmarks/video_decode.py [--clips 200] [--frames 8] [--size 32] [--threads 1 2] [--out video_decode.json]

Writes `--clips` clips of the world's kind (random frames; the lossless libx264rgb MP4 the world writes, and the
usual 4:2:0 libx264 of real data), decodes every file with both decoders on 1 and 2 threads, checks that both give
the same frames, and prints files per second and the ratio measured side by side in this run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def write_clips(folder: Path, n: int, frames: int, size: int, lossless: bool) -> list[Path]:
    import imageio.v2 as iio

    from genalign.media import write_video

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        clip = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
        path = folder / f"{'rgb' if lossless else 'yuv'}-{i:05d}.mp4"
        if lossless:
            write_video(path, clip, fps=8)
        else:
            iio.mimwrite(path, clip, fps=8, codec="libx264", macro_block_size=1)
        paths.append(path)
    return paths


def files_per_second(paths: list[Path], decoder: str, threads: int) -> tuple[float, list[np.ndarray]]:
    from genalign.data.media import decode_video_file

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        frames = list(pool.map(lambda p: decode_video_file(p, decoder), paths))
    return len(paths) / (time.perf_counter() - start), frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for lossless in (True, False):
            paths = write_clips(Path(tmp), args.clips, args.frames, args.size, lossless)
            for threads in args.threads:
                pyav_rate, pyav_frames = files_per_second(paths, "pyav", threads)
                imageio_rate, imageio_frames = files_per_second(paths, "imageio", threads)
                same = all(np.array_equal(a, b) for a, b in zip(pyav_frames, imageio_frames))
                row = {"encoding": "libx264rgb lossless" if lossless else "libx264 yuv420p", "threads": threads,
                       "pyav_files_per_s": round(pyav_rate, 1), "imageio_files_per_s": round(imageio_rate, 1),
                       "ratio": round(pyav_rate / imageio_rate, 2), "same_frames": same}
                results.append(row)
                print(f"{row['encoding']:20s} {threads} thread(s): PyAV {row['pyav_files_per_s']:7.1f} files/s, "
                      f"imageio {row['imageio_files_per_s']:6.1f} files/s, {row['ratio']:5.2f}x; "
                      f"same frames: {same}", flush=True)
    report = {"meta": {"clips": args.clips, "frames": args.frames, "size": args.size}, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if all(r["same_frames"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
