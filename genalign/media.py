"""Writing what people look at: image grids (PNG) and clips (MP4), plus small plot helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def unit_to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 0..255, rounded (values outside are clipped)."""
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def uint8_pixels(pixels, what: str) -> np.ndarray:
    """Pixels as uint8 for writing: uint8 as is; floats in [0, 1] (what the renderer and the autoencoder return)
    scaled to 0..255 and rounded. Anything else is refused: a plain cast would truncate [0, 1] floats to an all-black
    file without a word (`what` names the file in the error)."""
    arr = np.asarray(pixels)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what}: pixels must be uint8 or floats in [0, 1], got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: integer pixels must be uint8 (0..255), got dtype {arr.dtype}")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{what}: float pixels must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return unit_to_uint8(arr)


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling so 32x32 samples are visible in a report."""
    return img.repeat(factor, axis=-3).repeat(factor, axis=-2)


def image_grid(images: list[np.ndarray] | np.ndarray, labels: list[str] | None = None, ncols: int = 8,
               scale: int = 4, label_height: int = 14, row_labels: list[str] | None = None) -> np.ndarray:
    """Tile uint8 images (H, W, 3) into one uint8 picture, each with an optional caption underneath."""
    from PIL import Image, ImageDraw

    images = [upscale(np.asarray(im), scale) for im in images]
    h, w = images[0].shape[:2]
    nrows = (len(images) + ncols - 1) // ncols
    lh = label_height if labels else 0
    left = 90 if row_labels else 0
    canvas = Image.new("RGB", (left + ncols * (w + 4) + 4, nrows * (h + lh + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        x, y = left + 4 + c * (w + 4), 4 + r * (h + lh + 4)
        canvas.paste(Image.fromarray(im), (x, y))
        if labels:
            draw.text((x, y + h + 1), labels[i][: max(4, w // 6)], fill=(0, 0, 0))
    for r, text in enumerate(row_labels or []):
        draw.text((4, 4 + r * (h + lh + 4) + h // 2), text[:14], fill=(0, 0, 0))
    return np.asarray(canvas)


def save_png(path: str | Path, img: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(uint8_pixels(img, str(path))).save(path)
    return path


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, lossless: bool = True) -> Path:
    """Write frames (F, H, W, 3), uint8 or floats in [0, 1], as MP4. Lossless (libx264rgb, crf 0) by default: at 32x32, the usual
    4:2:0 chroma subsampling would change the colours the oracle reads."""
    import imageio.v2 as imageio

    path = Path(path)
    frames = uint8_pixels(frames, str(path))  # before the file is opened: a refused clip leaves no file
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"fps": fps, "macro_block_size": 1}
    if lossless:
        kwargs.update(codec="libx264rgb", output_params=["-crf", "0", "-preset", "ultrafast"], pixelformat="rgb24")
    with imageio.get_writer(str(path), **kwargs) as writer:
        for f in frames:
            writer.append_data(f)
    return path


def video_strip(frames: np.ndarray, scale: int = 3) -> np.ndarray:
    """All frames of a clip side by side, for a PNG report."""
    return upscale(np.concatenate(list(frames), axis=1), scale)
