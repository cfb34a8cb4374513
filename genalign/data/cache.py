"""Latent and text-embedding caches: encode a data set once with a model's VAE and text encoders.

Layout of a cache folder::

    out_dir/
      manifest.json             what the cache was built from and for (see below)
      shard-00000.safetensors   up to `shard_size` items (rounded up to whole batches)
      shard-00001.safetensors
      ...

A shard holds, for its n items and its p distinct prompts:

- pairs (`PreferencePair`): `latents_a`, `latents_b` (n, *latent_shape), `labels` (n,) float32 (1 = A wins,
  0 = B wins, 0.5 = kept tie) and, when the pairs have per-dimension labels, `dim_labels` (n, D) float32 (NaN
  where a pair lacks a dimension; the names are the manifest's `dims`);
- items (`MediaItem`): `latents` (n, *latent_shape) and `rewards` (n,) or (n, D) float32 (NaN when unknown);
- prompts (plain strings / `PromptRecord`): text embeddings only;
- always `prompt_index` (n,) int64 into the shard's prompts and `text.<key>` (p, ...) for every key that
  `adapter.encode_prompt` returns; the prompt strings are in the shard's safetensors metadata ("prompts",
  JSON).

`manifest.json`: `format`, `version`, `kind` (pairs | items | prompts), `model` (`name_or_path`, `family`,
`fingerprint`: a hash of its `components`: denoiser config, VAE config, text-encoder configs and the adapter's
encode settings; and `weights_sample`, a strided sample of the VAE and text-encoder weights compared with a
tolerance so the same weights in another precision match), `resolution` [H, W],
`num_frames` (videos), `dtype`, `media` (image | video), `latent_shape`, `text_keys`, `dims`, `num_items`,
`shards`, `skipped` (+ the first messages), `source`, `source_stats`, `created`, `genalign_version`.

Media are resized (bicubic, antialiased) to cover `resolution` and centre-cropped, scaled to [-1, 1] and
encoded as (B, 3, H, W) images or (B, 3, F, H, W) videos (`num_frames` frames sampled uniformly when given;
otherwise every video must have the first video's frame count). Latents and text embeddings are stored in
`dtype`.

The cache is written to a temporary folder next to `out_dir` and renamed into place when complete: a failed or
interrupted build leaves no partial cache. `load_cache` refuses (CacheMismatchError) a cache built for another
model fingerprint, resolution, dtype or frame count than the one asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import share_like_umask
from .errors import CacheMismatchError, DataError
from .media import MediaItem, sample_frames, to_pixels
from .preference import ON_ERROR, PreferencePair
from .prompts import PromptRecord

logger = logging.getLogger("genalign.data")

CACHE_FORMAT = "genalign-latent-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Keys that change when a model is saved and reloaded (or with the load dtype), not with what it computes.
_DROP_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures"}


# ------------------------------------------------------------------------------------------- small helpers
def dtype_name(dtype: str | torch.dtype) -> str:
    """'fp16' / 'float16' / torch.float16 -> 'float16' (also float32, bfloat16)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported cache dtype {dtype!r} (use float32, float16 or bfloat16)")
    return str(_DTYPES[key]).removeprefix("torch.")


def parse_resolution(resolution: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """512 / "512" / "512x768" (H x W) / (512, 768) -> (H, W)."""
    if isinstance(resolution, str):
        parts = resolution.lower().replace(",", "x").split("x")
        resolution = [int(p) for p in parts] if len(parts) > 1 else int(parts[0])
    if isinstance(resolution, (int, np.integer)):
        h = w = int(resolution)
    else:
        h, w = (int(v) for v in resolution)
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return h, w


def _genalign_version() -> str:
    try:
        from importlib.metadata import version

        return version("genalign")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+unknown"


def _config_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict") and not isinstance(cfg, Mapping):
        cfg = cfg.to_dict()
    elif not isinstance(cfg, Mapping):
        cfg = vars(cfg)
    return {k: v for k, v in dict(cfg).items() if not str(k).startswith("_") and k not in _DROP_CONFIG_KEYS}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _module_desc(module) -> dict | None:
    if module is None:
        return None
    return {"class": type(module).__name__, "config": _config_dict(getattr(module, "config", None))}


WEIGHT_SAMPLE_SIZE = 32
WEIGHT_RTOL, WEIGHT_ATOL = 2e-2, 1e-3  # loose enough for a bf16 / fp16 copy of the same weights


def _weights_sample(modules) -> list[float]:
    """A strided sample of the first and last parameter of each module (VAE, text encoders).

    Compared with a tolerance (`weights_match`), so the same weights loaded in another precision still match,
    while another checkpoint with the same config (a fine-tuned VAE, say) does not.
    """
    from ..models.base import first_and_last_parameters

    out: list[float] = []
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for p in first_and_last_parameters(m):  # read from the files for text encoders built empty
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // WEIGHT_SAMPLE_SIZE)
            out.extend(float(f"{v:.6g}") for v in flat[::step][:WEIGHT_SAMPLE_SIZE].float().cpu().tolist())
    return out


def weights_match(a: list[float] | None, b: list[float] | None) -> bool:
    a, b = list(a or []), list(b or [])
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL))


def encodes_prompts_alike(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether two model fingerprints (`model_fingerprint`, or a cache manifest's "model") turn prompts into the
    same embeddings: the same text encoder configs and encode settings, and matching sampled weights (VAE and text
    encoders; read from the files for encoders built empty)."""
    have_parts, want_parts = have.get("components") or {}, want.get("components") or {}
    same_configs = all(have_parts.get(k) == want_parts.get(k) is not None
                       for k in ("text encoder configs", "encode settings"))
    return same_configs and weights_match(have.get("weights_sample"), want.get("weights_sample"))


def _denoiser(adapter):
    try:
        return adapter.denoiser
    except Exception:  # noqa: BLE001 - a minimal adapter without a pipeline transformer
        pipe = getattr(adapter, "pipe", None)
        return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)


def _text_encoders(adapter) -> list:
    if hasattr(adapter, "text_encoders"):
        try:
            return list(adapter.text_encoders())
        except Exception as e:  # noqa: BLE001 - fall back to the pipeline's attributes
            logger.debug("adapter.text_encoders() failed (%s); reading the pipeline", e)
    from ..models.base import TEXT_ENCODER_NAMES

    pipe = getattr(adapter, "pipe", None)
    return [getattr(pipe, n) for n in TEXT_ENCODER_NAMES if getattr(pipe, n, None) is not None]


def model_fingerprint(adapter) -> dict[str, Any]:
    """What identifies the model a cache was built with (the path is informative, not compared)."""
    pipe = getattr(adapter, "pipe", None)
    name = getattr(pipe, "name_or_path", None)
    if name is None:
        name = _config_dict_raw(getattr(pipe, "config", None)).get("_name_or_path")
    vae = getattr(pipe, "vae", None)
    encoders = _text_encoders(adapter)
    encode_settings = {"adapter": type(adapter).__name__, "family": getattr(adapter, "family", None)}
    for attr in ("max_sequence_length", "num_frames"):
        if getattr(adapter, attr, None) is not None:
            encode_settings[attr] = getattr(adapter, attr)
    components = {
        "denoiser config": _hash(_module_desc(_denoiser(adapter))),
        "VAE config": _hash(_module_desc(vae)),
        "text encoder configs": _hash([_module_desc(m) for m in encoders]),
        "encode settings": _hash(encode_settings),
    }
    return {
        "name_or_path": None if name is None else str(name),
        "family": getattr(adapter, "family", None),
        "fingerprint": _hash(components),
        "components": components,
        "weights_sample": _weights_sample([vae, *encoders]),
    }


def _config_dict_raw(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return dict(getattr(cfg, "__dict__", {}))


def _adapter_device(adapter) -> torch.device:
    try:
        return torch.device(adapter.device)
    except Exception:  # noqa: BLE001
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------- writing
class _ShardWriter:
    def __init__(self, folder: Path, kind: str, dims: list[str]):
        self.folder, self.kind, self.dims = folder, kind, dims
        self.shards: list[dict[str, Any]] = []
        self.text_shapes: dict[str, list[int]] = {}
        self._reset()

    def _reset(self):
        self.items: dict[str, list[torch.Tensor]] = {}
        self.prompt_index: list[int] = []
        self.prompts: dict[str, int] = {}
        self.text: dict[str, list[torch.Tensor]] = {}

    def __len__(self):
        return len(self.prompt_index)

    def has_prompt(self, prompt: str) -> bool:
        return prompt in self.prompts

    def add_prompt(self, prompt: str, cond_row: dict[str, torch.Tensor]) -> None:
        for key, t in cond_row.items():
            shape = list(t.shape)
            if self.text_shapes.setdefault(key, shape) != shape:
                raise DataError(
                    f"encode_prompt returned {key!r} of shape {self.text_shapes[key]} for some prompts and "
                    f"{shape} for {prompt!r}: caching needs fixed-length text embeddings"
                )
            self.text.setdefault(key, []).append(t)
        self.prompts[prompt] = len(self.prompts)

    def add(self, prompt: str, tensors: dict[str, torch.Tensor]) -> None:
        self.prompt_index.append(self.prompts[prompt])
        for k, t in tensors.items():
            self.items.setdefault(k, []).append(t)

    def flush(self) -> None:
        if not self.prompt_index:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {k: torch.stack(v).contiguous() for k, v in self.items.items()}
        tensors["prompt_index"] = torch.tensor(self.prompt_index, dtype=torch.int64)
        for key, rows in self.text.items():
            tensors[f"text.{key}"] = torch.stack(rows).contiguous()
        save_file(
            tensors,
            str(self.folder / name),
            metadata={"format": CACHE_FORMAT, "kind": self.kind, "prompts": json.dumps(list(self.prompts))},
        )
        share_like_umask(self.folder / name)  # safetensors writes 0600 files (genalign.files)
        self.shards.append(
            {"file": name, "num_items": len(self.prompt_index), "num_prompts": len(self.prompts)}
        )
        self._reset()


def _item_kind(item) -> str:
    if isinstance(item, PreferencePair):
        return "pairs"
    if isinstance(item, MediaItem):
        return "items"
    if isinstance(item, (str, PromptRecord)):
        return "prompts"
    raise DataError(f"cannot cache a {type(item).__name__}: expected PreferencePair, MediaItem or a prompt")


def _iter_items(items, errors: list[str], on_error: str):
    """Items in order; decoding errors (DataError from a lazy dataset) follow `on_error`."""
    if hasattr(items, "__getitem__") and hasattr(items, "__len__") and not isinstance(items, (str, bytes)):
        for i in range(len(items)):
            try:
                item = items[i]
            except DataError as e:
                if on_error == "raise":
                    raise
                errors.append(str(e))
                logger.warning("cache: skipped item %d: %s", i, e)
                yield None
                continue
            yield item
    else:
        yield from items


def _item_media(item, kind: str) -> list[np.ndarray]:
    if kind == "pairs":
        return [item.media_a, item.media_b]
    if kind == "items":
        return [item.media]
    return []


def _item_prompt(item) -> str:
    return item.prompt if not isinstance(item, str) else item


def build_cache(
    adapter,
    pairs_or_items: Iterable,
    out_dir: str | os.PathLike,
    resolution: int | str | tuple[int, int],
    batch_size: int = 8,
    dtype: str | torch.dtype = "float32",
    *,
    num_frames: int | None = None,
    shard_size: int = 256,
    on_error: str = "skip",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode `pairs_or_items` with `adapter` into a cache folder `out_dir` (see the module docstring).

    pairs_or_items: a PreferenceDataset (or any sequence / iterable) of PreferencePair, MediaItem, or prompt
    strings / PromptRecords (all of one kind). on_error="skip" leaves out (and counts in the manifest) items
    whose media cannot be decoded or do not fit the cache (an image among videos, another frame count);
    "raise" stops at the first. Returns the path of the finished cache.
    """
    from tqdm.auto import tqdm

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    res = parse_resolution(resolution)
    dname = dtype_name(dtype)
    tdtype = _DTYPES[dname]
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise DataError("refusing to overwrite an existing cache (pass overwrite=True)", file=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _encode_all(
            adapter,
            pairs_or_items,
            tmp,
            res,
            batch_size,
            dname,
            tdtype,
            num_frames,
            shard_size,
            on_error,
            progress,
            tqdm,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():  # overwrite=True: swap, then remove the old one
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "cache written to %s: %d items in %d shards (%d skipped)",
        out,
        manifest["num_items"],
        len(manifest["shards"]),
        manifest["skipped"],
    )
    return out


def _encode_all(
    adapter,
    items,
    folder: Path,
    res,
    batch_size,
    dname,
    tdtype,
    num_frames,
    shard_size,
    on_error,
    progress,
    tqdm,
) -> dict[str, Any]:
    device = _adapter_device(adapter)
    errors: list[str] = []
    total = len(items) if hasattr(items, "__len__") else None
    state: dict[str, Any] = {"kind": None, "media": None, "frames": num_frames, "latent_shape": None}
    dims: list[str] = list(getattr(items, "dims", []) or [])
    writer: _ShardWriter | None = None
    batch: list[tuple[Any, list[torch.Tensor]]] = []

    def skip(msg: str) -> None:
        if on_error == "raise":
            raise DataError(msg)
        errors.append(msg)
        logger.warning("cache: skipped %s", msg)

    def prepare(item) -> list[torch.Tensor] | None:
        pixels = []
        for m in _item_media(item, state["kind"]):
            m = np.asarray(m)
            media = "video" if m.ndim == 4 else "image" if m.ndim == 3 else None
            if media is None or m.shape[-1] != 3:
                return skip(
                    f"{getattr(item, 'source', '')}: media of shape {m.shape} is neither (H, W, 3) nor "
                    "(F, H, W, 3)"
                )
            if state["media"] is None:
                state["media"] = media
            if media != state["media"]:
                return skip(f"{getattr(item, 'source', '')}: a {media} in a cache of {state['media']}s")
            if media == "video":
                if num_frames is not None:
                    m = sample_frames(m, num_frames)
                elif state["frames"] is None:
                    state["frames"] = m.shape[0]
                elif m.shape[0] != state["frames"]:
                    return skip(
                        f"{getattr(item, 'source', '')}: {m.shape[0]} frames where the cache has "
                        f"{state['frames']} (pass num_frames to sample a fixed count)"
                    )
            pixels.append(to_pixels(m, res))
        return pixels

    @torch.no_grad()
    def encode(batch):
        nonlocal writer
        if len(writer) >= shard_size:
            writer.flush()
        latents = []
        for j in range(len(batch[0][1])):  # A then B (pairs), or the one medium (items)
            x = torch.stack([px[j] for _, px in batch]).to(device)
            lat = adapter.encode_pixels(x).to(dtype=tdtype, device="cpu")
            if state["latent_shape"] is None:
                state["latent_shape"] = list(lat.shape[1:])
            latents.append(lat)
        new = list(
            dict.fromkeys(p for p in (_item_prompt(it) for it, _ in batch) if not writer.has_prompt(p))
        )
        if new:
            cond = adapter.encode_prompt(new)
            for k, p in enumerate(new):
                writer.add_prompt(
                    p, {key: v[k].detach().to(dtype=tdtype, device="cpu") for key, v in cond.items()}
                )
        for i, (item, _) in enumerate(batch):
            tensors: dict[str, torch.Tensor] = {}
            if state["kind"] == "pairs":
                tensors["latents_a"], tensors["latents_b"] = latents[0][i], latents[1][i]
                tensors["labels"] = torch.tensor(float(item.label), dtype=torch.float32)
                if dims:
                    tensors["dim_labels"] = torch.tensor(
                        [(item.labels or {}).get(d, float("nan")) for d in dims], dtype=torch.float32
                    )
            elif state["kind"] == "items":
                tensors["latents"] = latents[0][i]
                r = item.reward
                if dims:
                    r = [
                        (r or {}).get(d, float("nan")) if isinstance(r, Mapping) else float("nan")
                        for d in dims
                    ]
                tensors["rewards"] = torch.tensor(float("nan") if r is None else r, dtype=torch.float32)
            writer.add(_item_prompt(item), tensors)

    bar = tqdm(total=total, desc="caching", unit="item", disable=not progress)
    try:
        for item in _iter_items(items, errors, on_error):
            bar.update(1)
            if item is None:
                continue
            kind = _item_kind(item)
            if state["kind"] is None:
                state["kind"] = kind
                if not dims and kind == "pairs" and item.labels:
                    dims = list(item.labels)
                if not dims and kind == "items" and isinstance(item.reward, Mapping):
                    dims = list(item.reward)
                writer = _ShardWriter(folder, kind, dims)
            elif kind != state["kind"]:
                raise DataError(f"cannot mix {state['kind']} and {kind} in one cache")
            if not _item_prompt(item).strip():
                skip(f"{getattr(item, 'source', '')}: empty prompt")
                continue
            pixels = prepare(item)
            if pixels is None:
                continue
            batch.append((item, pixels))
            if len(batch) == batch_size:
                encode(batch)
                batch = []
        if batch:
            encode(batch)
    finally:
        bar.close()
    if writer is None or (len(writer) == 0 and not writer.shards):
        raise DataError(f"nothing to cache: no usable items ({len(errors)} skipped)")
    writer.flush()
    num_items = sum(s["num_items"] for s in writer.shards)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "kind": state["kind"],
        "model": model_fingerprint(adapter),
        "resolution": list(res),
        "num_frames": state["frames"] if state["media"] == "video" else None,
        "dtype": dname,
        "media": state["media"],
        "latent_shape": state["latent_shape"],
        "text_keys": writer.text_shapes,
        "dims": dims,
        "num_items": num_items,
        "num_prompts": sum(s["num_prompts"] for s in writer.shards),
        "shards": writer.shards,
        "skipped": len(errors),
        "skipped_messages": errors[:100],
        "source": str(getattr(items, "source", type(items).__name__)),
        "source_stats": dict(getattr(items, "stats", {}) or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "genalign_version": _genalign_version(),
    }


# ------------------------------------------------------------------------------------------- reading
def holds_prompt_embeddings(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a latent cache with every prompt's text encodings (training on it encodes no prompt)."""
    manifest = Path(path) / "manifest.json" if path else None
    if manifest is None or not manifest.is_file():
        return False
    try:
        return bool(json.loads(manifest.read_text()).get("text_keys"))
    except (OSError, ValueError):
        return False  # load_cache reports the broken manifest


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"not a genalign cache: no {MANIFEST}", file=cache_dir)
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"unreadable {MANIFEST} ({e})", file=cache_dir) from None
    if manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"{MANIFEST} is not a {CACHE_FORMAT} manifest", file=cache_dir)
    if int(manifest.get("version", 0)) > CACHE_VERSION:
        raise DataError(
            f"cache format version {manifest['version']} is newer than this genalign reads "
            f"({CACHE_VERSION}); upgrade genalign",
            file=cache_dir,
        )
    return manifest


class CachedPreferenceDataset(torch.utils.data.Dataset):
    """Items of a cache folder, read lazily (memory-mapped safetensors).

    Items are dicts: pairs `{"latents_a", "latents_b", "label", ["dim_labels"], "prompt", "cond"}`, items
    `{"latents", "reward", "prompt", "cond"}`, prompts `{"prompt", "cond"}`; `cond` maps every
    `encode_prompt` key to that prompt's embedding, ready for `adapter.velocity` after batching (default
    collate). Prefer `load_cache`, which checks the cache against the model and settings first.
    """

    def __init__(self, cache_dir: str | os.PathLike, manifest: dict[str, Any] | None = None):
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest or read_manifest(cache_dir)
        self.kind = self.manifest["kind"]
        self.dims = list(self.manifest.get("dims") or [])
        self.text_keys = list(self.manifest.get("text_keys") or {})
        self.shards = [self.cache_dir / s["file"] for s in self.manifest["shards"]]
        for s in self.shards:
            if not s.is_file():
                raise DataError(f"shard {s.name} listed in the manifest is missing", file=self.cache_dir)
        self._starts = np.cumsum([0] + [s["num_items"] for s in self.manifest["shards"]]).tolist()
        self._handles: dict[int, Any] = {}
        self._prompts: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _open(self, j: int):
        if j not in self._handles:
            from safetensors import safe_open

            h = safe_open(str(self.shards[j]), framework="pt")
            self._handles[j] = h
            self._prompts[j] = json.loads(h.metadata()["prompts"])
        return self._handles[j]

    def __getstate__(self):  # DataLoader workers reopen the shards
        return {**self.__dict__, "_handles": {}, "_prompts": {}}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = int(np.searchsorted(self._starts, i, side="right") - 1)
        k = i - self._starts[j]
        h = self._open(j)

        def row(name: str, r: int) -> torch.Tensor:
            return h.get_slice(name)[r : r + 1][0]

        p = int(row("prompt_index", k))
        out: dict[str, Any] = {}
        if self.kind == "pairs":
            out["latents_a"], out["latents_b"], out["label"] = (
                row("latents_a", k),
                row("latents_b", k),
                row("labels", k),
            )
            if self.dims:
                out["dim_labels"] = row("dim_labels", k)
        elif self.kind == "items":
            out["latents"], out["reward"] = row("latents", k), row("rewards", k)
        out["prompt"] = self._prompts[j][p]
        out["cond"] = {key: row(f"text.{key}", p) for key in self.text_keys}
        return out

    @property
    def prompts(self) -> list[str]:
        out = []
        for j in range(len(self.shards)):
            h = self._open(j)
            idx = h.get_tensor("prompt_index").tolist()
            out.extend(self._prompts[j][p] for p in idx)
        return out


def load_cache(
    cache_dir: str | os.PathLike,
    *,
    adapter=None,
    resolution: int | str | tuple[int, int] | None = None,
    dtype: str | torch.dtype | None = None,
    num_frames: int | None = None,
) -> CachedPreferenceDataset:
    """Open a cache after checking it was built for `adapter`'s model, `resolution`, `dtype` and `num_frames`
    (each only when given). A difference raises CacheMismatchError naming the cache and the field."""
    manifest = read_manifest(cache_dir)
    if adapter is not None:
        want = model_fingerprint(adapter)
        have = manifest.get("model") or {}
        same_weights = weights_match(have.get("weights_sample"), want["weights_sample"])
        if want["fingerprint"] != have.get("fingerprint") or not same_weights:
            differing = [
                c for c, h in want["components"].items() if (have.get("components") or {}).get(c) != h
            ]
            if not same_weights:
                differing.append("VAE / text encoder weights")
            hint = "differs in: " + ", ".join(differing)
            if have.get("family") != want["family"]:
                hint = f"family {have.get('family')!r} vs {want['family']!r}; {hint}"

            def desc(m):
                name = m.get("name_or_path") or "<in-memory pipeline>"
                return f"{name} ({m.get('family')}, fingerprint {m.get('fingerprint')})"

            raise CacheMismatchError(cache_dir, "model", desc(have), desc(want), hint)
        if want["name_or_path"] != have.get("name_or_path"):
            logger.info(
                "cache %s was built from %s; %s has the same fingerprint",
                cache_dir,
                have.get("name_or_path"),
                want["name_or_path"],
            )
    if resolution is not None and list(parse_resolution(resolution)) != list(manifest["resolution"]):
        raise CacheMismatchError(
            cache_dir, "resolution", tuple(manifest["resolution"]), parse_resolution(resolution)
        )
    if dtype is not None and dtype_name(dtype) != manifest["dtype"]:
        raise CacheMismatchError(cache_dir, "dtype", manifest["dtype"], dtype_name(dtype))
    if num_frames is not None and manifest.get("num_frames") != num_frames:
        raise CacheMismatchError(cache_dir, "num_frames", manifest.get("num_frames"), num_frames)
    return CachedPreferenceDataset(cache_dir, manifest)


# ------------------------------------------------------------------------------------------- the CLI command
_CACHE_OPTIONS = {
    "model": None,
    "data": None,
    "out": None,
    "resolution": None,
    "batch_size": 8,
    "dtype": "float32",
    "device": None,
    "num_frames": None,
    "shard_size": 256,
    "tie_policy": "drop",
    "dims": None,
    "on_error": "skip",
    "verify": "header",
    "overwrite": False,
    "progress": True,
    "adapter_kwargs": None,
}


def _looks_like_pairs_jsonl(path: Path) -> bool:
    from .preference import JSONL_A_KEYS, JSONL_B_KEYS

    with open(path, encoding="utf-8-sig") as f:
        for text in f:
            if text.strip():
                try:
                    obj = json.loads(text)
                except ValueError:
                    return True  # let the pair reader report it
                return isinstance(obj, dict) and bool(set(obj) & set(JSONL_A_KEYS + JSONL_B_KEYS))
    return True


def load_cache_source(data, *, tie_policy="drop", dims=None, on_error="skip", verify="header"):
    """What `genalign cache --data D` encodes: prompts for .txt / .json / prompt-only .jsonl, otherwise
    preference pairs (`load_preference_pairs`)."""
    from .preference import load_preference_pairs
    from .prompts import read_prompts

    p = Path(data) if isinstance(data, (str, os.PathLike)) else None
    if p is not None and p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".txt", ".json") or (
            suffix in (".jsonl", ".ndjson") and not _looks_like_pairs_jsonl(p)
        ):
            return read_prompts(p)
    return load_preference_pairs(data, tie_policy=tie_policy, dims=dims, on_error=on_error, verify=verify)


def cache_main(args=None, /, **kwargs) -> Path:
    """`genalign cache --model M --data D --out O --resolution R [--batch-size B] [--dtype T] ...`.

    Takes plain keyword arguments (model, data, out, resolution, batch_size=8, dtype="float32", device=None
    (cuda when available), num_frames, shard_size, tie_policy, dims, on_error, verify, overwrite, progress,
    adapter_kwargs), or an argparse Namespace / mapping as the first argument (unknown keys in it are
    ignored). Loads the model with `genalign.models.load_adapter` and returns the cache path.
    """
    opts: dict[str, Any] = {}
    if args is not None:
        given = dict(args) if isinstance(args, Mapping) else dict(vars(args))
        opts.update(
            {k.replace("-", "_"): v for k, v in given.items() if k.replace("-", "_") in _CACHE_OPTIONS}
        )
    unknown = set(kwargs) - set(_CACHE_OPTIONS)
    if unknown:
        raise TypeError(f"cache_main got unknown option(s): {', '.join(sorted(unknown))}")
    opts.update(kwargs)
    missing = [k for k in ("model", "data", "out", "resolution") if opts.get(k) is None]
    if missing:
        raise ValueError(f"genalign cache needs {', '.join('--' + m for m in missing)}")
    o = {k: (opts[k] if opts.get(k) is not None else d) for k, d in _CACHE_OPTIONS.items()}
    device = o["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    items = load_cache_source(
        o["data"], tie_policy=o["tie_policy"], dims=o["dims"], on_error=o["on_error"], verify=o["verify"]
    )
    from genalign.models import load_adapter  # lazy: heavy, and written alongside

    adapter = load_adapter(o["model"], device=device, **(o["adapter_kwargs"] or {}))
    return build_cache(
        adapter,
        items,
        o["out"],
        o["resolution"],
        batch_size=int(o["batch_size"]),
        dtype=o["dtype"],
        num_frames=o["num_frames"],
        shard_size=int(o["shard_size"]),
        on_error=o["on_error"],
        overwrite=bool(o["overwrite"]),
        progress=bool(o["progress"]),
    )
