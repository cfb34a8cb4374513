"""Decoding, checking and resizing images and videos.

Conventions (used by every reader and by the cache):

- an image is a uint8 numpy array (H, W, 3), RGB; images with transparency are composited onto white;
- a video is a uint8 numpy array (F, H, W, 3). Video files are `.mp4 .webm .mov .mkv .avi .m4v`, `.gif` (every
  frame, read with Pillow) or a folder of frame images (sorted by the numbers in their names, then by name).
  Video files are decoded in-process by PyAV (`av`, in the `video` extra) when it is installed, else by imageio +
  imageio-ffmpeg, which starts an `ffmpeg` process per file (24-67x slower on 8-frame 32x32 clips:
  `benchmarks/video_decode.py`; both give the same pixels: ffmpeg's libraries convert to RGB either way, tested);
- model pixels are float tensors in [-1, 1]: (3, H, W) for an image, (3, F, H, W) for a video.

Checks come in levels (the `verify` argument of the readers):

- "none": nothing is opened;
- "exists": files exist and are not empty;
- "header" (default): plus a cheap structural check without decoding pixels: the image header parses and, for
  PNG, every chunk's CRC (Pillow's `verify`); a JPEG must end with its end-of-image marker (a truncated
  download does not); an MP4/MOV's top-level boxes must fit in the file and include `moov`; a GIF must start
  with `GIF8` and end with its trailer byte; a frame folder must hold at least one frame, each header-checked;
- "decode": every image and video is fully decoded once (slow on large sets, definitive).
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif"}
VERIFY_LEVELS = ("none", "exists", "header", "decode")
SMALL_FRAME_AREA = 256 * 256  # pixels; PyAV decodes videos up to this frame size on one thread


class MediaCheckError(Exception):
    """Internal: a media file or blob that failed a check. `kind` is "missing" or "corrupt"."""

    def __init__(self, reason: str, kind: str = "corrupt"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass
class MediaItem:
    """One prompt with one image or video and an optional reward (a float, or a dict per dimension).

    `build_cache` accepts these (RWR-style data) as well as `PreferencePair`s and plain prompt strings.
    """

    prompt: str
    media: np.ndarray
    reward: float | dict[str, float] | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def media_kind_of_path(path: str | os.PathLike) -> str:
    """'video' for video files, gifs and folders of frames; 'image' otherwise."""
    p = Path(path)
    if p.suffix.lower() in VIDEO_EXTS or p.is_dir():
        return "video"
    return "image"


# ------------------------------------------------------------------------------------------- decoding
def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes | str | os.PathLike) -> np.ndarray:
    """Image bytes or a path -> uint8 (H, W, 3). Raises the decoder's error on corrupt data."""
    src = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
    with Image.open(src) as im:
        im.load()
        return np.array(_to_rgb(im), dtype=np.uint8)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frame_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: _natural_key(p.name))


def video_decoder() -> str:
    """'pyav' when the `av` package is installed, else 'imageio' (both optional: the `video` extra)."""
    import importlib.util

    return "pyav" if importlib.util.find_spec("av") is not None else "imageio"


def decode_video_file(path: Path, decoder: str) -> np.ndarray:
    """Every frame of a video container as RGB. `decoder` is 'pyav' (in-process) or 'imageio' (an ffmpeg process)."""
    if decoder == "pyav":
        import av  # lazy: optional, and heavy to import

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaCheckError(f"{str(path)!r} holds no video stream")
            stream = container.streams.video[0]
            # Small frames: one thread for decoding and for the colour conversion. FFmpeg's default starts a pool
            # per file and per conversion, whose start-up and hand-offs cost more than the work: 32x32 clips went
            # from 16 to 450 files/s with both cores busy. Callers decode several files at once instead.
            threads = 1 if stream.codec_context.width * stream.codec_context.height <= SMALL_FRAME_AREA else 0
            stream.codec_context.thread_count = threads
            frames = [f.to_ndarray(format="rgb24", threads=threads) for f in container.decode(stream)]
        if not frames:
            raise MediaCheckError(f"{str(path)!r} holds no decodable frame")
        return np.stack(frames)
    if decoder == "imageio":
        import imageio.v3 as iio  # lazy: imageio is an optional (video) dependency

        return np.asarray(iio.imread(path, index=None))
    raise ValueError(f"unknown video decoder {decoder!r}; use 'pyav' or 'imageio'")


def read_video(path: str | os.PathLike) -> np.ndarray:
    """A video file, gif or folder of frames -> uint8 (F, H, W, 3)."""
    p = Path(path)
    if p.is_dir():
        files = frame_files(p)
        if not files:
            raise MediaCheckError(f"frame folder {str(p)!r} holds no image files", "missing")
        frames = [decode_image(f) for f in files]
    elif p.suffix.lower() == ".gif":
        from PIL import ImageSequence

        with Image.open(p) as im:
            frames = [np.array(_to_rgb(f.copy()), dtype=np.uint8) for f in ImageSequence.Iterator(im)]
    else:
        arr = decode_video_file(p, video_decoder())
        if arr.ndim == 3:  # a single frame
            arr = arr[None]
        if arr.ndim != 4:
            raise MediaCheckError(f"unexpected video array shape {arr.shape}")
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        elif arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return np.ascontiguousarray(arr, dtype=np.uint8)
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise MediaCheckError(f"frames of {str(p)!r} have different sizes: {sorted(shapes)}")
    return np.stack(frames)


def load_media(value, kind: str) -> np.ndarray:
    """bytes or a path -> uint8 array; `kind` is 'image' or 'video' (videos must be paths)."""
    if kind == "video":
        return read_video(value)
    return decode_image(value)


# ------------------------------------------------------------------------------------------- checks
def _check_image_header(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        im.verify()  # PNG: walks every chunk and checks its CRC; others: header only
    if fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
        raise MediaCheckError("JPEG data has no end-of-image marker (truncated file?)")


def _check_mp4_boxes(path: Path) -> None:
    size = path.stat().st_size
    seen = set()
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                raise MediaCheckError(f"truncated box header at byte {pos}")
            box_size, box_type = struct.unpack(">I4s", head)
            if box_size == 1:
                ext = f.read(8)
                if len(ext) < 8:
                    raise MediaCheckError(f"truncated box header at byte {pos}")
                box_size = struct.unpack(">Q", ext)[0]
            elif box_size == 0:
                box_size = size - pos
            if box_size < 8 or pos + box_size > size:
                raise MediaCheckError(
                    f"box {box_type!r} at byte {pos} claims {box_size} bytes but the file ends at {size} "
                    "(truncated file?)"
                )
            seen.add(box_type)
            pos += box_size
    if b"moov" not in seen:
        raise MediaCheckError("no 'moov' box (truncated or unfinished recording?)")


def _check_gif(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(6)
        f.seek(-1, os.SEEK_END)
        tail = f.read(1)
    if head[:4] != b"GIF8":
        raise MediaCheckError("not a GIF file (bad header)")
    if tail != b"\x3b":
        raise MediaCheckError("GIF has no trailer byte (truncated file?)")


def check_media(value, kind: str, level: str = "header") -> None:
    """Raise MediaCheckError if `value` (bytes or a path) fails the check `level` (see the module doc)."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {level!r}")
    if level == "none":
        return
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise MediaCheckError("empty image bytes", "missing")
        if kind == "video":
            raise MediaCheckError("videos must be given as file paths, not bytes")
        if level == "exists":
            return
        try:
            if level == "decode":
                decode_image(data)
            else:
                _check_image_header(data)
        except MediaCheckError:
            raise
        except Exception as e:
            raise MediaCheckError(f"cannot decode image bytes ({type(e).__name__}: {e})") from e
        return

    p = Path(value)
    if not p.exists():
        raise MediaCheckError(f"file not found: {str(p)!r}", "missing")
    if p.is_dir():
        if kind != "video":
            raise MediaCheckError(f"{str(p)!r} is a folder, expected an image file")
        files = frame_files(p)
        if not files:
            raise MediaCheckError(f"frame folder {str(p)!r} holds no image files", "missing")
        if level == "exists":
            return
        for f in files:
            check_media(f, "image", level)
        return
    if p.stat().st_size == 0:
        raise MediaCheckError(f"empty file: {str(p)!r}", "missing")
    if level == "exists":
        return
    try:
        if level == "decode":
            load_media(p, kind)
        elif kind == "image":
            _check_image_header(p.read_bytes())
        elif p.suffix.lower() in (".mp4", ".mov", ".m4v"):
            _check_mp4_boxes(p)
        elif p.suffix.lower() == ".gif":
            _check_gif(p)
    except MediaCheckError as e:
        raise MediaCheckError(f"{str(p)!r}: {e.reason}", e.kind) from e
    except Exception as e:
        raise MediaCheckError(f"cannot decode {str(p)!r} ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------- model pixels
def _size(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def resize_center_crop(media: np.ndarray, resolution: int | tuple[int, int]) -> np.ndarray:
    """Scale (bicubic, antialiased) so the media covers `resolution` (H, W), then crop the centre.

    Works on an image (H, W, 3) or a video (F, H, W, 3); an input already at the size is returned unchanged.
    """
    th, tw = _size(resolution)
    if media.ndim == 4:
        return np.stack([resize_center_crop(f, (th, tw)) for f in media])
    h, w = media.shape[:2]
    if (h, w) == (th, tw):
        return media
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    im = Image.fromarray(media)
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return np.array(im.crop((left, top, left + tw, top + th)), dtype=np.uint8)


def to_pixels(media: np.ndarray, resolution: int | tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 image (H, W, 3) -> float (3, H, W) in [-1, 1]; video (F, H, W, 3) -> (3, F, H, W)."""
    if resolution is not None:
        media = resize_center_crop(media, resolution)
    x = torch.from_numpy(np.array(media, dtype=np.uint8, copy=True)).float() / 127.5 - 1.0
    if x.ndim == 3:
        return x.permute(2, 0, 1).contiguous()
    if x.ndim == 4:
        return x.permute(3, 0, 1, 2).contiguous()
    raise ValueError(f"expected (H, W, 3) or (F, H, W, 3) media, got shape {tuple(media.shape)}")


def sample_frames(video: np.ndarray, num_frames: int) -> np.ndarray:
    """Uniformly sample `num_frames` frames (first and last included); shorter videos repeat frames."""
    idx = np.linspace(0, video.shape[0] - 1, num_frames).round().astype(int)
    return video[idx]
