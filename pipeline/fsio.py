"""Atomic outputs: an interrupted stage leaves either the old complete output or none, never half."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _sibling_tmp(target: Path, kind: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    maker = tempfile.mkdtemp if kind == "dir" else tempfile.mkstemp
    made = maker(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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


def write_json(target: Path, data: Any) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
