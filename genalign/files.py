"""Folders of weights: readable by whoever the umask says, put in place atomically.

Since safetensors 0.8 every `.safetensors` file is written through a temporary file the Rust `tempfile` crate
creates with mode 0600 and then renamed into place, whatever the process umask (safetensors issue #782; the same
holds for transformers', diffusers' and peft's `save_pretrained`, which call it). A reward model or LoRA trained by
one user of a shared machine, or saved into a container image as root, then cannot be read by another user, while
every other file of the folder can. Everything genalign writes goes through `publish_dir` / `publish_copy` (whole
folders, atomically), `shared_as_written` (around a save into a folder that may hold other files) or
`share_like_umask` (one file), which give each file the mode a plain `open()` would have given it: 0o666 minus
the umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

TRASH_PREFIX = ".trash-"


def current_umask() -> int:
    """The process umask. Read from /proc on Linux: setting it to read it back (the only portable way) would
    widen the mode of files other threads create meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def share_like_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or every file under a folder) the mode a plain `open()` would: 0o666 & ~umask.
    Folders keep theirs (mkdir already follows the umask)."""
    if os.name != "posix":
        return
    mode = 0o666 & ~current_umask()
    path = Path(path)
    files = [path] if path.is_file() else [Path(d) / f for d, _, names in os.walk(path) for f in names]
    for f in files:
        if not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


@contextlib.contextmanager
def shared_as_written(directory: str | os.PathLike) -> Iterator[None]:
    """Around a `save_pretrained` into `directory` (which may hold other files): afterwards the files the block
    created or replaced get the umask's mode (`share_like_umask`); the others are left as they were."""
    directory = Path(directory)

    def stamps() -> dict[Path, tuple[int, int]]:
        if not directory.is_dir():
            return {}
        return {f: (st.st_ino, st.st_mtime_ns) for f in directory.rglob("*")
                if not f.is_symlink() and f.is_file() and (st := f.stat())}

    before = stamps()
    yield
    for f, stamp in stamps().items():
        if before.get(f) != stamp:
            share_like_umask(f)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush a folder's files and the folder entries to disk before the rename that publishes it."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def remove_dir(path: Path) -> None:
    """Delete a folder so that a kill half-way never leaves a partial folder under its real name:
    rename it to a .trash- name first (atomic), then delete."""
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Atomically put the complete folder `tmp` in place as `final` (replacing an existing one), its files
    readable as the umask allows."""
    tmp, final = Path(tmp), Path(final)
    share_like_umask(tmp)
    fsync_tree(tmp)
    if final.exists():
        remove_dir(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def publish_copy(src: str | os.PathLike, final: str | os.PathLike) -> None:
    """Copy the finished folder `src` to `final` atomically (a copy beside it, then `publish_dir`)."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    publish_dir(tmp, final)
