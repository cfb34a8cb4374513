"""Errors of `genalign.data`: one line that names the file, the row and the column, never only a traceback."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A data file, row or column that cannot be used as asked.

    `file`, `row` (0-based data row), `line` (1-based line of a text file, when there is one), `column` and
    `reason` are kept as attributes so callers (the CLI, tests) can show or check them.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | os.PathLike | None = None,
        row: int | None = None,
        line: int | None = None,
        column: str | None = None,
    ):
        self.reason = reason
        self.file = None if file is None else str(file)
        self.row = row
        self.line = line
        self.column = column
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        pos = []
        if self.row is not None:
            pos.append(f"row {self.row}")
        if self.line is not None:
            pos.append(f"line {self.line}")
        if self.column is not None:
            pos.append(f"column {self.column!r}")
        if pos:
            where.append(", ".join(pos))
        return (": ".join(where) + ": " if where else "") + self.reason


class CacheMismatchError(DataError):
    """A latent cache built for another model, resolution, dtype or frame count than the one asked for."""

    def __init__(self, cache_dir, field: str, cached, expected, hint: str = ""):
        self.cache_dir = str(cache_dir)
        self.field = field
        self.cached = cached
        self.expected = expected
        msg = (
            f"cache was built with {field}={cached!r} but {field}={expected!r} was asked for; "
            "it was not used. Rebuild it (`genalign cache --model ... --data ... --out ...`) or point to a "
            "cache built for this setting"
        )
        if hint:
            msg += f" ({hint})"
        super().__init__(msg, file=cache_dir)
