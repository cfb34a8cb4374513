"""Preference pairs (A vs B for one prompt) from the formats genalign reads natively.

One entry point, `load_preference_pairs(source, ...)`, dispatches on what `source` is and returns a
`PreferenceDataset` (a torch Dataset whose items are `PreferencePair`s, media decoded when an item is read).

Formats
-------
- **Pick-a-Pic** (images): a `.parquet` file, a folder of `.parquet` files, an HF `datasets` Dataset /
  DatasetDict, or a `save_to_disk` folder, with columns `caption, jpg_0, jpg_1, label_0[, label_1]`. `jpg_*`
  hold image bytes (JPEG/PNG/...), an HF `Image` cell ({"bytes", "path"}) or a path (relative to the parquet's
  folder, or to the `save_to_disk` folder). `label_0` is 1 (A = jpg_0 wins), 0 (B wins) or 0.5 (tie);
  `label_1`, if present, must equal `1 - label_0`. Other numeric columns of parquet files (the world's `oracle_TA_0`,
  `oracle_VQ_1` scores) are kept in `PreferencePair.meta` under their own names.
- **VideoAlign CSV** (videos): columns `path_A, path_B, prompt` and the dimensions `VQ, MQ, TA` (visual
  quality, motion quality, text alignment), each `A`, `B` or `same` (case-insensitive; `tie` is read as
  `same`), and optionally `fps_A, num_frames_A, fps_B, num_frames_B` (kept in `PreferencePair.meta`). Paths
  are relative to the CSV's folder. The overall label is a weighted vote: `sum(w_d * v_d)` with `v_d = +1`
  (A), `-1` (B), `0` (same); > 0: A wins, < 0: B wins, = 0: tie. `dims` sets the weights (default `{"VQ": 1,
  "MQ": 1, "TA": 1}`; a list means weight 1 each); every weighted dimension is a required column.
  Per-dimension labels (1.0 / 0.0 / 0.5) are kept in `PreferencePair.labels`. A blank cell leaves that
  dimension unlabelled for the pair (absent from `labels`: out of that dimension's loss and accuracy, not a
  tie); a row with no weighted dimension labelled is bad.
- **jsonl**: one object per line, paths relative to the file's folder: `{"prompt": ...,
  "chosen"|"media_a"|"image_a"|"video_a": path, "rejected"|"media_b"|"image_b"|"video_b": path, "label": 1}`.
  `label` is optional (default 1: A wins); 1 / 0 / 0.5 or "A" / "B" / "same". An optional `"labels": {"VQ":
  "A", ...}` gives per-dimension labels; without `label` the overall label is the weighted vote above. Blank
  lines are skipped.
- **folders**: one subfolder per prompt::

      root/
        <any name>/
          prompt.txt      the prompt (without it: the subfolder's name, "_" read as a space)
          chosen/         the preferred media (image files, video files, or one folder of frames per video)
          rejected/       the other media

  When `chosen/` and `rejected/` hold the same file names (stems), files pair up by name; otherwise every
  chosen file is paired with every rejected file. A is always the chosen item (label 1.0).

Media kinds: `.gif`, video files and folders of frames are videos (F, H, W, 3), everything else is an image
(H, W, 3) (see `genalign.data.media`).

Ties (`tie_policy`)
-------------------
- `"drop"` (default): tie rows are left out (counted as `ties_dropped`);
- `"half"`: kept with label 0.5 (`ties_half`);
- `"keep_first"`: kept as "A wins" (label 1.0), the behaviour of some reference implementations that read only
  `label_0 > 0` or the first item of a tie. It biases the data towards the first item and is logged as a
  warning with its count (`ties_as_a_wins`). Per-dimension labels keep their 0.5.

Bad rows (`on_error`)
---------------------
A row is bad when its prompt is empty, a label value is unknown (or `label_1 != 1 - label_0`), or a media file
is missing or corrupt (checked at load time to the `verify` level: "none" | "exists" | "header" (default) |
"decode"; see `genalign.data.media`). Rows are checked in this order: prompt and labels, the tie policy (a
dropped tie's media are not opened), then the media. With `on_error="skip"` (default) a bad row is left out,
counted under `skipped` and `skipped_<reason>`, its message (file, row, line, column, reason) kept in
`dataset.skipped` and logged on the "genalign.data" logger: the first 100 as warnings, the rest at debug
level. With `on_error="raise"` the first bad row raises `DataError` naming the file, the row and the column.
Missing required columns always raise `DataError` naming the file and the columns. Media that pass the
load-time check but fail to decode later raise `DataError` from `dataset[i]` (`build_cache` skips and counts
them).

Stats
-----
`dataset.stats` counts: `rows = pairs + ties_dropped + skipped`, `pairs = a_wins + b_wins + ties_half +
ties_as_a_wins` (`a_wins`/`b_wins`/`ties` are the labels as read, before the tie policy). Rows are numbered
from 0 in data order; text files also give their 1-based line.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .media import (
    IMAGE_EXTS,
    VERIFY_LEVELS,
    VIDEO_EXTS,
    MediaCheckError,
    check_media,
    load_media,
    media_kind_of_path,
)

logger = logging.getLogger("genalign.data")

TIE_POLICIES = ("drop", "half", "keep_first")
ON_ERROR = ("skip", "raise")
DEFAULT_DIMS = {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}
VIDEOALIGN_DIMS = ("VQ", "MQ", "TA")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
VIDEOALIGN_COLUMNS = ("path_A", "path_B", "prompt")
JSONL_A_KEYS = ("media_a", "image_a", "video_a", "chosen")
JSONL_B_KEYS = ("media_b", "image_b", "video_b", "rejected")
MAX_LOGGED_SKIPS = 100
SKIP_REASONS = ("empty_prompt", "bad_label", "missing_media", "corrupt_media", "bad_row")


@dataclass
class PreferencePair:
    """One judged pair. `label` is 1.0 when A wins, 0.0 when B wins, 0.5 for a kept tie."""

    prompt: str
    media_a: np.ndarray  # uint8 (H, W, 3) image or (F, H, W, 3) video
    media_b: np.ndarray
    label: float
    labels: dict[str, float] | None = None  # per dimension, e.g. {"VQ": 1.0, "MQ": 0.5, "TA": 0.0}
    source: str = ""  # "<file>#<row>"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        return self.media_a.ndim == 4


# ------------------------------------------------------------------------------------------- media references
class _Bad(Exception):
    """Internal: one bad row (column, reason, kind); turned into a skip or a DataError by the builder."""

    def __init__(self, column: str | None, reason: str, kind: str = "bad_row"):
        super().__init__(reason)
        self.column, self.reason, self.kind = column, reason, kind


def _resolve(path_value: str, base_dir: Path | None) -> Path:
    p = Path(os.path.expanduser(path_value))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def _cell_source(value, base_dir: Path | None):
    """A media cell (bytes, HF Image dict, path string) -> bytes or a Path."""
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return _resolve(str(value).strip(), base_dir)
    raise MediaCheckError("empty media cell", "missing")


class _ParquetStore:
    """Media cells of one parquet file, read one row group at a time (the last one is kept)."""

    def __init__(self, path: Path, media_columns: list[str]):
        import pyarrow.parquet as pq

        self.path, self.base_dir, self.media_columns = path, path.parent, media_columns
        md = pq.ParquetFile(path).metadata
        self._starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)]).tolist()
        self._pf, self._group, self._table = None, None, None

    def value(self, row: int, column: str):
        import pyarrow.parquet as pq

        group = bisect.bisect_right(self._starts, row) - 1
        if group != self._group:
            if self._pf is None:
                self._pf = pq.ParquetFile(self.path)
            self._table = self._pf.read_row_group(group, columns=self.media_columns)
            self._group = group
        return self._table.column(column)[row - self._starts[group]].as_py()

    def __getstate__(self):  # DataLoader workers reopen the file
        return {**self.__dict__, "_pf": None, "_group": None, "_table": None}


class _HFStore:
    """Media cells of an HF datasets Dataset, read row by row from its (memory-mapped) arrow table."""

    def __init__(self, ds, media_columns: list[str], base_dir: Path | None):
        self.ds = ds.select_columns(media_columns).with_format("arrow")
        self.base_dir = base_dir

    def value(self, row: int, column: str):
        return self.ds[int(row)].column(column)[0].as_py()


@dataclass
class _Ref:
    """Where one media item lives: a path, or a cell of a store (parquet / HF dataset)."""

    column: str
    path: Path | None = None
    store: Any = None
    row: int | None = None

    def source(self):
        if self.path is not None:
            return self.path
        return _cell_source(self.store.value(self.row, self.column), self.store.base_dir)

    @staticmethod
    def kind_of(src) -> str:
        return "image" if isinstance(src, bytes) else media_kind_of_path(src)

    def check(self, level: str) -> str:
        """Check to `level`; return the media kind. Raises MediaCheckError."""
        src = self.source()
        kind = self.kind_of(src)
        check_media(src, kind, level)
        return kind

    def load(self) -> np.ndarray:
        src = self.source()
        return load_media(src, self.kind_of(src))


# ------------------------------------------------------------------------------------------- the dataset
@dataclass
class _Record:
    prompt: str
    a: _Ref
    b: _Ref
    label: float  # after the tie policy
    raw_label: float
    labels: dict[str, float] | None
    file: str
    row: int
    line: int | None
    kind: str
    meta: dict[str, Any]

    @property
    def source(self) -> str:
        return f"{self.file}#{self.row}"


def _new_stats() -> dict[str, int]:
    keys = [
        "rows",
        "pairs",
        "a_wins",
        "b_wins",
        "ties",
        "ties_dropped",
        "ties_half",
        "ties_as_a_wins",
        "skipped",
    ]
    return dict.fromkeys(keys + [f"skipped_{r}" for r in SKIP_REASONS], 0)


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs; `dataset[i]` decodes the two media of pair i and returns a `PreferencePair`.

    `stats` holds the counts of the load (see the module docstring), `skipped` the messages of skipped rows.
    Prompts, labels and sources are available without decoding (`prompts`, `labels`, `record_info(i)`).
    Parquet media are read a row group at a time: sequential reads are cheap, random access is not; build a
    latent cache (`genalign.data.build_cache`) for training.
    """

    def __init__(
        self, records: list[_Record], stats: dict[str, int], skipped: list[str], source: str, tie_policy: str
    ):
        self.records = records
        self.stats = stats
        self.skipped = skipped
        self.source = source
        self.tie_policy = tie_policy

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int | slice) -> PreferencePair | list[PreferencePair]:
        if isinstance(i, slice):  # `dataset[:8]`, as for a list
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; out of range: IndexError, which also ends `for pair in dataset`
        r = self.records[i]
        return self.pair_with_media(i, self.load_medium(i, r.a), self.load_medium(i, r.b))

    def load_medium(self, i: int, ref: _Ref) -> np.ndarray:
        """Decode one medium of pair i (`ref` is its `.a` or `.b`); a failure names the file, row and column."""
        r = self.records[i]
        try:
            return ref.load()
        except Exception as e:
            raise DataError(
                f"cannot read media ({type(e).__name__}: {e})", file=r.file, row=r.row, line=r.line, column=ref.column
            ) from e

    def pair_with_media(self, i: int, media_a: np.ndarray, media_b: np.ndarray) -> PreferencePair:
        """Pair i with its media already decoded (as `dataset[i]` returns it)."""
        r = self.records[i]
        return PreferencePair(r.prompt, media_a, media_b, r.label, dict(r.labels) if r.labels else None, r.source,
                              dict(r.meta))

    def record_info(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {
            "prompt": r.prompt,
            "label": r.label,
            "raw_label": r.raw_label,
            "labels": r.labels,
            "source": r.source,
            "kind": r.kind,
            "meta": r.meta,
        }

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    @property
    def labels(self) -> list[float]:
        return [r.label for r in self.records]

    @property
    def dims(self) -> list[str]:
        """Names of the per-dimension labels present (in first-seen order)."""
        out: dict[str, None] = {}
        for r in self.records:
            out.update(dict.fromkeys(r.labels or ()))
        return list(out)

    @property
    def kind(self) -> str:
        kinds = {r.kind for r in self.records}
        return kinds.pop() if len(kinds) == 1 else ("empty" if not kinds else "mixed")

    def summary(self) -> str:
        s = self.stats
        ties = f"{s['ties_dropped']} dropped, {s['ties_half']} kept as 0.5, {s['ties_as_a_wins']} as A wins"
        parts = [
            f"{s['pairs']} pairs from {s['rows']} rows of {self.source}",
            f"{s['a_wins']} A wins, {s['b_wins']} B wins, {s['ties']} ties",
            f"tie_policy={self.tie_policy!r}: {ties}",
        ]
        if s["skipped"]:
            why = ", ".join(
                f"{s['skipped_' + r]} {r.replace('_', ' ')}" for r in SKIP_REASONS if s["skipped_" + r]
            )
            parts.append(f"{s['skipped']} rows skipped ({why})")
        return "; ".join(parts)


def collate_pairs(batch: list[PreferencePair]) -> dict[str, Any]:
    """DataLoader collate for PreferencePair items: media stay lists (their sizes may differ)."""
    return {
        "prompt": [p.prompt for p in batch],
        "media_a": [p.media_a for p in batch],
        "media_b": [p.media_b for p in batch],
        "label": torch.tensor([p.label for p in batch], dtype=torch.float32),
        "labels": [p.labels for p in batch],
        "source": [p.source for p in batch],
    }


# ------------------------------------------------------------------------------------------- the builder
class _Builder:
    """Applies the tie policy, the media checks and the error policy; keeps the counts."""

    def __init__(self, tie_policy: str, on_error: str, verify: str):
        if tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
        self.tie_policy, self.on_error, self.verify = tie_policy, on_error, verify
        self.stats = _new_stats()
        self.records: list[_Record] = []
        self.skipped: list[str] = []

    def bad(self, bad: _Bad, *, file, row: int | None, line: int | None = None) -> None:
        err = DataError(bad.reason, file=file, row=row, line=line, column=bad.column)
        if self.on_error == "raise":
            raise err
        self.stats["rows"] += 1
        self.stats["skipped"] += 1
        self.stats[f"skipped_{bad.kind}"] += 1
        self.skipped.append(str(err))
        level = logging.WARNING if len(self.skipped) <= MAX_LOGGED_SKIPS else logging.DEBUG
        logger.log(level, "skipped bad row: %s", err)
        if len(self.skipped) == MAX_LOGGED_SKIPS + 1:
            logger.warning(
                "more than %d bad rows: the rest are logged at debug level (all are in dataset.skipped)",
                MAX_LOGGED_SKIPS,
            )

    def add(
        self,
        *,
        file,
        row: int,
        line: int | None,
        prompt: str,
        a: _Ref,
        b: _Ref,
        label: float,
        labels: dict[str, float] | None = None,
        meta: dict | None = None,
    ) -> None:
        tie = label == 0.5
        if tie and self.tie_policy == "drop":
            self.stats["rows"] += 1
            self.stats["ties"] += 1
            self.stats["ties_dropped"] += 1
            return
        kinds = []
        for ref in (a, b):
            try:
                kinds.append(ref.check(self.verify))
            except MediaCheckError as e:
                kind = "missing_media" if e.kind == "missing" else "corrupt_media"
                return self.bad(_Bad(ref.column, e.reason, kind), file=file, row=row, line=line)
        if kinds[0] != kinds[1]:
            return self.bad(
                _Bad(None, f"media A is an {kinds[0]} but media B is a {kinds[1]}"),
                file=file,
                row=row,
                line=line,
            )
        final = label
        if tie:
            self.stats["ties"] += 1
            if self.tie_policy == "half":
                self.stats["ties_half"] += 1
            else:
                self.stats["ties_as_a_wins"] += 1
                final = 1.0
        elif label == 1.0:
            self.stats["a_wins"] += 1
        else:
            self.stats["b_wins"] += 1
        self.stats["rows"] += 1
        self.stats["pairs"] += 1
        self.records.append(
            _Record(prompt, a, b, final, label, labels, str(file), row, line, kinds[0], meta or {})
        )

    def finish(self, source: str) -> PreferenceDataset:
        ds = PreferenceDataset(self.records, self.stats, self.skipped, source, self.tie_policy)
        logger.info("%s", ds.summary())
        if self.stats["ties_as_a_wins"]:
            logger.warning(
                "tie_policy='keep_first': %d ties of %s were turned into 'A wins' (label 1.0). This is what "
                "some reference implementations do; it biases training towards the first item. Use "
                "tie_policy='drop' or 'half' to avoid it.",
                self.stats["ties_as_a_wins"],
                source,
            )
        if self.stats["skipped"]:
            logger.warning(
                "%d of %d rows of %s were skipped as bad (see dataset.skipped)",
                self.stats["skipped"],
                self.stats["rows"],
                source,
            )
        return ds


# ------------------------------------------------------------------------------------------- parsing helpers
def _prompt(value, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _Bad(column, "empty prompt", "empty_prompt")
    text = str(value).strip()
    if not text:
        raise _Bad(column, "empty prompt", "empty_prompt")
    return text


_VOTES = {"a": 1.0, "b": 0.0, "same": 0.5, "tie": 0.5}


def parse_label(value) -> float | None:
    """1 / 0 / 0.5 (numbers or numeric strings) or A / B / same / tie -> 1.0 / 0.0 / 0.5; None if unknown."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _VOTES:
            return _VOTES[key]
        try:
            value = float(key)
        except ValueError:
            return None
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    for ok in (1.0, 0.0, 0.5):
        if abs(float(value) - ok) < 1e-6:
            return ok
    return None


def _label(value, column: str) -> float:
    label = parse_label(value)
    if label is None:
        raise _Bad(column, f"unknown label value {value!r} (expected 1, 0, 0.5 or A, B, same)", "bad_label")
    return label


def _vote(value, column: str) -> float:
    key = str(value).strip().lower() if value is not None else ""
    if key not in _VOTES:
        raise _Bad(column, f"unknown label value {value!r} (expected A, B or same)", "bad_label")
    return _VOTES[key]


def _dim_weights(dims) -> dict[str, float]:
    if dims is None:
        return dict(DEFAULT_DIMS)
    if isinstance(dims, str):
        return {dims: 1.0}
    if isinstance(dims, Mapping):
        weights = {str(k): float(v) for k, v in dims.items()}
    else:
        weights = {str(k): 1.0 for k in dims}
    if not weights or not any(weights.values()):
        raise ValueError(f"dims must give at least one dimension a non-zero weight, got {dims!r}")
    return weights


def _mix(labels: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted vote of per-dimension labels (1 -> +1, 0 -> -1, 0.5 -> 0): the overall label."""
    score = sum(w * (2.0 * labels[d] - 1.0) for d, w in weights.items() if d in labels)
    return 1.0 if score > 1e-9 else 0.0 if score < -1e-9 else 0.5


def _require(file, columns: Iterable[str], required: Iterable[str]) -> None:
    have = set(columns)
    missing = [c for c in required if c not in have]
    if missing:
        raise DataError(
            f"missing required column(s) {', '.join(repr(c) for c in missing)} "
            f"(found: {', '.join(repr(c) for c in columns)})",
            file=file,
        )


# ------------------------------------------------------------------------------------------- Pick-a-Pic
def _is_string_field(feature_or_type) -> bool:
    import pyarrow as pa

    if isinstance(feature_or_type, pa.DataType):
        return pa.types.is_string(feature_or_type) or pa.types.is_large_string(feature_or_type)
    return getattr(feature_or_type, "dtype", None) in ("string", "large_string")


def _read_pickapic_rows(
    b: _Builder,
    *,
    name: str,
    columns: list[str],
    cheap: dict[str, list],
    n: int,
    store,
    base_dir: Path | None,
    extra_cols: Sequence[str] = (),
) -> None:
    has_label_1 = "label_1" in columns
    for row in range(n):
        try:
            prompt = _prompt(cheap["caption"][row], "caption")
            label = _label(cheap["label_0"][row], "label_0")
            if has_label_1 and cheap["label_1"][row] is not None:
                l1 = _label(cheap["label_1"][row], "label_1")
                if abs(l1 - (1.0 - label)) > 1e-6:
                    raise _Bad(
                        "label_1",
                        f"label_1={cheap['label_1'][row]!r} is not 1 - label_0 "
                        f"(label_0={cheap['label_0'][row]!r})",
                        "bad_label",
                    )
            refs = []
            for col in ("jpg_0", "jpg_1"):
                if col in cheap:  # a column of paths
                    value = cheap[col][row]
                    if value is None or not str(value).strip():
                        raise _Bad(col, "empty media cell", "missing_media")
                    refs.append(_Ref(col, path=_resolve(str(value).strip(), base_dir)))
                else:
                    refs.append(_Ref(col, store=store, row=row))
        except _Bad as e:
            b.bad(e, file=name, row=row)
            continue
        meta = {c: cheap[c][row] for c in extra_cols if cheap[c][row] is not None}
        b.add(file=name, row=row, line=None, prompt=prompt, a=refs[0], b=refs[1], label=label, meta=meta)


def _read_pickapic_parquet(b: _Builder, path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"cannot read parquet file ({type(e).__name__}: {e})", file=path) from e
    schema = pf.schema_arrow
    columns = list(schema.names)
    _require(path, columns, PICKAPIC_COLUMNS)
    path_cols = [c for c in ("jpg_0", "jpg_1") if _is_string_field(schema.field(c).type)]
    cheap_cols = ["caption", "label_0"] + (["label_1"] if "label_1" in columns else []) + path_cols
    extra_cols = _extra_numeric_columns(columns, cheap_cols, lambda c: schema.field(c).type)
    cheap = pf.read(columns=cheap_cols + extra_cols).to_pydict()
    media_cols = [c for c in ("jpg_0", "jpg_1") if c not in path_cols]
    store = _ParquetStore(path, media_cols) if media_cols else None
    _read_pickapic_rows(
        b,
        name=str(path),
        columns=columns,
        cheap=cheap,
        n=pf.metadata.num_rows,
        store=store,
        base_dir=path.parent,
        extra_cols=extra_cols,
    )


def _extra_numeric_columns(columns: list[str], taken: list[str], type_of) -> list[str]:
    """Numeric scalar columns besides the Pick-a-Pic ones (kept in `PreferencePair.meta`)."""
    import pyarrow as pa

    out = []
    for c in columns:
        if c in taken or c in ("jpg_0", "jpg_1"):
            continue
        typ = type_of(c)
        if pa.types.is_integer(typ) or pa.types.is_floating(typ):
            out.append(c)
    return out


def _pick_split(dsd, split: str | None, name: str):
    splits = list(dsd.keys())
    if split is None:
        if "train" in dsd:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataError(f"a DatasetDict with splits {splits}: pass split=...", file=name)
    if split not in dsd:
        raise DataError(f"no split {split!r} (splits: {splits})", file=name)
    return dsd[split], split


def _read_pickapic_hf(b: _Builder, ds, *, name: str, base_dir: Path | None, split: str | None) -> str:
    if type(ds).__name__ == "DatasetDict":
        ds, split = _pick_split(ds, split, name)
        name = f"{name}[{split}]"
    if type(ds).__name__ != "Dataset":
        raise DataError(
            f"expected a datasets.Dataset or DatasetDict, got {type(ds).__name__} (streaming "
            "datasets are not supported: save_to_disk or write parquet first)",
            file=name,
        )
    columns = list(ds.column_names)
    _require(name, columns, PICKAPIC_COLUMNS)
    path_cols = [c for c in ("jpg_0", "jpg_1") if _is_string_field(ds.features[c])]
    cheap_cols = ["caption", "label_0"] + (["label_1"] if "label_1" in columns else []) + path_cols
    cheap = ds.select_columns(cheap_cols).with_format(None)[:]
    media_cols = [c for c in ("jpg_0", "jpg_1") if c not in path_cols]
    store = _HFStore(ds, media_cols, base_dir) if media_cols else None
    _read_pickapic_rows(b, name=name, columns=columns, cheap=cheap, n=len(ds), store=store, base_dir=base_dir)
    return name


def _is_hf_dataset(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def _is_saved_hf_folder(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def _load_hf_folder(b: _Builder, p: Path, split: str | None) -> str:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"cannot load a saved HF dataset ({type(e).__name__}: {e})", file=p) from e
    return _read_pickapic_hf(b, ds, name=str(p), base_dir=p, split=split)


# ------------------------------------------------------------------------------------------- VideoAlign CSV
def _num(value):
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return int(f) if f.is_integer() else f


def _read_videoalign_csv(b: _Builder, path: Path, weights: dict[str, float]) -> None:
    base = path.parent
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = [c.strip() for c in (reader.fieldnames or [])]
        _require(path, columns, list(VIDEOALIGN_COLUMNS) + [d for d, w in weights.items() if w])
        reader.fieldnames = columns
        dims = [d for d in dict.fromkeys([*VIDEOALIGN_DIMS, *weights]) if d in columns]
        meta_cols = [c for c in ("fps_A", "num_frames_A", "fps_B", "num_frames_B") if c in columns]
        for row, rec in enumerate(reader):
            line = reader.line_num
            try:
                prompt = _prompt(rec.get("prompt"), "prompt")
                # a blank cell: that dimension is not labelled for this pair (left out of its loss, not a tie)
                labels = {d: _vote(rec.get(d), d) for d in dims if (rec.get(d) or "").strip()}
                if not any(weights.get(d) for d in labels):
                    raise _Bad(",".join(d for d, w in weights.items() if w), "no dimension labelled", "bad_label")
                label = _mix(labels, weights)
                refs = []
                for col in ("path_A", "path_B"):
                    value = (rec.get(col) or "").strip()
                    if not value:
                        raise _Bad(col, "empty path", "missing_media")
                    refs.append(_Ref(col, path=_resolve(value, base)))
            except _Bad as e:
                b.bad(e, file=path, row=row, line=line)
                continue
            meta = {c.lower(): _num(rec.get(c)) for c in meta_cols}
            b.add(
                file=path,
                row=row,
                line=line,
                prompt=prompt,
                a=refs[0],
                b=refs[1],
                label=label,
                labels=labels,
                meta=meta,
            )


# ------------------------------------------------------------------------------------------- jsonl
def _read_jsonl(b: _Builder, path: Path, weights: dict[str, float]) -> None:
    base = path.parent
    objs: list[tuple[int, int, Any]] = []  # (row, line, object or _Bad)
    keys: set[str] = set()
    with open(path, encoding="utf-8-sig") as f:
        row = 0
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                obj = _Bad(None, f"invalid JSON line ({e})")
            if isinstance(obj, dict):
                keys.update(obj)
            elif not isinstance(obj, _Bad):
                obj = _Bad(None, f"invalid JSON line (expected an object, got {type(obj).__name__})")
            objs.append((row, line_no, obj))
            row += 1
    if not objs:
        raise DataError("no rows (the file is empty)", file=path)
    missing = [
        k
        for k, group in (
            ("prompt", ("prompt",)),
            ("chosen|media_a|image_a|video_a", JSONL_A_KEYS),
            ("rejected|media_b|image_b|video_b", JSONL_B_KEYS),
        )
        if not keys.intersection(group)
    ]
    if missing and any(isinstance(o, dict) for _, _, o in objs):
        raise DataError(
            f"missing required column(s) {', '.join(repr(m) for m in missing)} in every row "
            f"(found keys: {', '.join(sorted(keys))})",
            file=path,
        )
    for row, line, obj in objs:
        try:
            if isinstance(obj, _Bad):
                raise obj
            prompt = _prompt(obj.get("prompt"), "prompt")
            labels = None
            if obj.get("labels") is not None:
                if not isinstance(obj["labels"], Mapping):
                    raise _Bad("labels", f"'labels' must be an object, got {obj['labels']!r}", "bad_label")
                labels = {str(d): _label(v, f"labels.{d}") for d, v in obj["labels"].items()}
            if obj.get("label") is not None:
                label = _label(obj["label"], "label")
            elif labels:
                label = _mix(labels, weights)
            else:
                label = 1.0
            refs = []
            for group in (JSONL_A_KEYS, JSONL_B_KEYS):
                key = next((k for k in group if obj.get(k) is not None), None)
                if key is None:
                    raise _Bad("|".join(group), "missing media path", "missing_media")
                value = obj[key]
                if not isinstance(value, str) or not value.strip():
                    raise _Bad(key, f"media must be a non-empty path string, got {value!r}", "missing_media")
                refs.append(_Ref(key, path=_resolve(value.strip(), base)))
        except _Bad as e:
            b.bad(e, file=path, row=row, line=line)
            continue
        meta = {
            k: v
            for k, v in obj.items()
            if k not in ("prompt", "label", "labels", *JSONL_A_KEYS, *JSONL_B_KEYS)
        }
        b.add(
            file=path,
            row=row,
            line=line,
            prompt=prompt,
            a=refs[0],
            b=refs[1],
            label=label,
            labels=labels,
            meta=meta,
        )


# ------------------------------------------------------------------------------------------- folders
def _media_entries(folder: Path) -> list[Path]:
    exts = IMAGE_EXTS | VIDEO_EXTS
    out = [p for p in folder.iterdir() if (p.is_file() and p.suffix.lower() in exts) or p.is_dir()]
    return sorted(out, key=lambda p: p.name)


def _read_folders(b: _Builder, root: Path) -> None:
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise DataError("no prompt subfolders (expected <root>/<prompt>/chosen/ and rejected/)", file=root)
    row = 0
    for sub in subs:
        try:
            prompt_file = sub / "prompt.txt"
            if prompt_file.is_file():
                prompt = _prompt(prompt_file.read_text(encoding="utf-8"), "prompt.txt")
            else:
                prompt = _prompt(sub.name.replace("_", " "), "prompt")
            entries = {}
            for side in ("chosen", "rejected"):
                d = sub / side
                if not d.is_dir():
                    raise _Bad(side, f"no {side}/ folder in {str(sub)!r}", "missing_media")
                entries[side] = _media_entries(d)
                if not entries[side]:
                    raise _Bad(side, f"{str(d)!r} holds no media", "missing_media")
        except _Bad as e:
            b.bad(e, file=sub, row=row)
            row += 1
            continue
        chosen, rejected = entries["chosen"], entries["rejected"]
        if sorted(p.stem for p in chosen) == sorted(p.stem for p in rejected):
            by_stem = {p.stem: p for p in rejected}
            pairs = [(c, by_stem[c.stem]) for c in chosen]
        else:
            pairs = [(c, r) for c in chosen for r in rejected]
        for c, r in pairs:
            b.add(
                file=sub,
                row=row,
                line=None,
                prompt=prompt,
                a=_Ref("chosen", path=c),
                b=_Ref("rejected", path=r),
                label=1.0,
                meta={"chosen": c.name, "rejected": r.name},
            )
            row += 1


# ------------------------------------------------------------------------------------------- entry point
FORMATS = ("pickapic", "hf", "videoalign", "jsonl", "folders")


def _detect(p: Path) -> str:
    if p.is_dir():
        if _is_saved_hf_folder(p):
            return "hf"
        if any(p.glob("*.parquet")):
            return "pickapic"
        return "folders"
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return "pickapic"
    if suffix in (".csv", ".tsv"):
        return "videoalign"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise DataError(
        "unknown preference data format (expected .parquet, .csv, .jsonl, a folder of parquet "
        "files, a saved HF dataset or a prompt-per-subfolder folder)",
        file=p,
    )


def load_preference_pairs(
    source,
    *,
    tie_policy: str = "drop",
    dims: Mapping[str, float] | Sequence[str] | str | None = None,
    on_error: str = "skip",
    verify: str = "header",
    split: str | None = None,
    format: str | None = None,
) -> PreferenceDataset:
    """Read preference pairs from `source` (see the module docstring for formats and policies).

    source: a path (.parquet, folder of .parquet, saved HF dataset folder, .csv, .jsonl, folder layout), an HF
    `datasets` Dataset / DatasetDict, or a list of these (read in order into one dataset).
    dims: weights of the per-dimension votes that make the overall label (VideoAlign CSV, jsonl `labels`).
    format: force one of "pickapic", "hf", "videoalign", "jsonl", "folders" instead of detecting it.
    """
    b = _Builder(tie_policy, on_error, verify)
    weights = _dim_weights(dims)
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    if not sources:
        raise DataError("no data sources given")
    names = []
    for src in sources:
        if _is_hf_dataset(src):
            if dims is not None:
                raise DataError(
                    "dims weight per-dimension labels; Pick-a-Pic data have a single label",
                    file="<HF dataset>",
                )
            names.append(_read_pickapic_hf(b, src, name="<HF dataset>", base_dir=None, split=split))
            continue
        p = Path(src)
        if not p.exists():
            raise DataError("no such file or folder", file=p)
        fmt = format or _detect(p)
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if dims is not None and fmt in ("pickapic", "hf", "folders"):
            raise DataError(f"dims weight per-dimension labels, which {fmt} data do not have", file=p)
        names.append(str(p))
        if fmt == "pickapic":
            files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
            for f in files:
                _read_pickapic_parquet(b, f)
        elif fmt == "hf":
            _load_hf_folder(b, p, split)
        elif fmt == "videoalign":
            _read_videoalign_csv(b, p, weights)
        elif fmt == "jsonl":
            _read_jsonl(b, p, weights)
        else:
            _read_folders(b, p)
    return b.finish(", ".join(names))
