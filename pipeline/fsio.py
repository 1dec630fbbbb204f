"""Atomic outputs: an interrupted stage leaves either the old complete output or none, never half.

A temporary is named `.<target>.<pid>.<random>.tmp` beside its target. A stage killed outright (kill -9,
power loss) cannot clean up, so the next write of the same target removes the temporaries of processes
that no longer run; those of a live process (a parallel `dvc exp run`) are left alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFLNK: "symlink",
}


def file_kind(mode: int) -> str:
    """'fifo', 'character device', ... for an st_mode that is not a regular file's."""
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(target: Path) -> list[Path]:
    """Remove the temporaries of `target` left by processes that are gone; return what was removed."""
    owned = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp(\..+)?")
    removed = []
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        match = owned.fullmatch(entry.name)
        if match and not process_alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _sibling_tmp(target: Path, kind: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    maker = tempfile.mkdtemp if kind == "dir" else tempfile.mkstemp
    made = maker(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    if kind == "file":
        os.close(made[0])
        made = made[1]
    os.chmod(made, 0o755 if kind == "dir" else 0o644)  # mkstemp/mkdtemp make them private
    return Path(made)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty directory beside `target`; it replaces `target` only if the block succeeds."""
    tmp = _sibling_tmp(target, "dir")
    try:
        yield tmp
        if target.exists():
            old = _sibling_tmp(target, "dir")
            os.replace(target, old / "old")
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it is renamed onto `target` if the block succeeds."""
    tmp = _sibling_tmp(target, "file")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """A file's hex digest, read 1 MB at a time (md5 is also how DVC hashes a file)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(target: Path, data: Any) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
