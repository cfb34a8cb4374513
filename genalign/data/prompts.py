"""Prompts for online methods (sampling, GRQO, Diff-Instruct*, evaluation).

- `.txt`: one prompt per line; surrounding whitespace is stripped; blank lines and lines starting with `#`
  are skipped.
- `.jsonl`: one JSON object per line with a non-empty string `"prompt"`; every other field is kept as the
  prompt's metadata. Blank lines are skipped; a line that is not a JSON object, lacks `"prompt"` or has an
  empty prompt raises `DataError` naming the file and the line.
- `.json`: a list of strings or of objects as in `.jsonl` (errors name the list index as the row).

A file without any prompt raises `DataError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DataError


@dataclass
class PromptRecord:
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "<file>:<line>"


def _from_object(obj, path: Path, *, row: int | None = None, line: int | None = None) -> PromptRecord:
    where = f"{path}:{line}" if line is not None else f"{path}#{row}"
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise DataError(
            f"expected a JSON object with a 'prompt', got {type(obj).__name__}", file=path, row=row, line=line
        )
    if "prompt" not in obj:
        raise DataError(
            f"no 'prompt' field (keys: {', '.join(sorted(obj)) or 'none'})",
            file=path,
            row=row,
            line=line,
            column="prompt",
        )
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise DataError(
            f"'prompt' must be a string, got {prompt!r}", file=path, row=row, line=line, column="prompt"
        )
    if not prompt.strip():
        raise DataError("empty prompt", file=path, row=row, line=line, column="prompt")
    meta = {k: v for k, v in obj.items() if k != "prompt"}
    return PromptRecord(prompt.strip(), meta, where)


def read_prompts(path: str | os.PathLike) -> list[PromptRecord]:
    """Prompts with their metadata and source line (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such prompt file", file=path)
    suffix = path.suffix.lower()
    records: list[PromptRecord] = []
    if suffix == ".txt":
        with open(path, encoding="utf-8-sig") as f:
            for line_no, text in enumerate(f, start=1):
                text = text.strip()
                if text and not text.startswith("#"):
                    records.append(PromptRecord(text, {}, f"{path}:{line_no}"))
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8-sig") as f:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    raise DataError(f"invalid JSON ({e})", file=path, line=line_no) from None
                records.append(_from_object(obj, path, line=line_no))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except ValueError as e:
            raise DataError(f"invalid JSON ({e})", file=path) from None
        if not isinstance(data, list):
            raise DataError("expected a JSON list of prompts (strings or objects with 'prompt')", file=path)
        records = [_from_object(obj, path, row=i) for i, obj in enumerate(data)]
    else:
        raise DataError("unknown prompt file type (expected .txt, .jsonl or .json)", file=path)
    if not records:
        raise DataError("no prompts in the file", file=path)
    return records


def load_prompts(path: str | os.PathLike, *, with_metadata: bool = False) -> list[str] | list[PromptRecord]:
    """The prompts of a .txt / .jsonl / .json file as strings (`PromptRecord`s with `with_metadata=True`)."""
    records = read_prompts(path)
    return records if with_metadata else [r.prompt for r in records]


class PromptDataset(torch.utils.data.Dataset):
    """Prompts as a torch Dataset; items are `{"prompt": str, "metadata": dict}`."""

    def __init__(self, path_or_records: str | os.PathLike | list[PromptRecord] | list[str]):
        if isinstance(path_or_records, (str, os.PathLike)):
            self.records = read_prompts(path_or_records)
        else:
            self.records = [
                r if isinstance(r, PromptRecord) else PromptRecord(str(r)) for r in path_or_records
            ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {"prompt": r.prompt, "metadata": r.metadata}

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]
