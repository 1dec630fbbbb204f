"""What a stage reads, recorded for the test that holds dvc.yaml to it (tests/test_dvc_deps.py).

With PIPELINE_TRACE_DIR set, a stage writes <dir>/<stage>.json on exit: the params keys it read (attribute
access on the typed params, see pipeline/params.py) and the project files it opened (Python's audit events).
What only feeds MLflow's metadata (run names, tags, the experiment row) is read inside `paused()`: it cannot
change a DVC output, so it is not evidence either way. Off (the default), the cost is one check per params
attribute read.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV = "PIPELINE_TRACE_DIR"

_params: set[str] | None = None  # None: not recording
_files: set[str] = set()
_paused = 0
_root = ""


def recording() -> bool:
    return _params is not None and not _paused


def param_read(key: str) -> None:
    if recording():
        _params.add(key)  # type: ignore[union-attr]


def params_read(prefix: str, tree: Mapping[str, Any]) -> None:
    """Every leaf key of a dumped section: a dump reads them all."""
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping) and value:
            params_read(key, value)
        else:
            param_read(key)


@contextmanager
def paused() -> Iterator[None]:
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def _source_of(path: str) -> str:
    """A module's compiled copy stands for its source: pipeline/__pycache__/x.cpython-311.pyc -> pipeline/x.py."""
    folder, name = os.path.split(path)
    if os.path.basename(folder) == "__pycache__" and name.endswith(".pyc"):
        return os.path.join(os.path.dirname(folder), name.split(".", 1)[0] + ".py")
    return path


def _reads(mode: Any, flags: Any) -> bool:
    if isinstance(mode, str):  # open(): "r", "rb", "r+", "w+" read; "w", "a", "x" do not
        return "r" in mode or "+" in mode
    return isinstance(flags, int) and flags & os.O_ACCMODE != os.O_WRONLY  # os.open()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Called for every audited operation of the process: stay cheap and never open a file here.
    if event not in ("open", "os.listdir", "os.scandir") or _paused or not args:
        return
    path = args[0]
    if isinstance(path, int) or path is None:  # a descriptor: its open() was seen
        return
    if event == "open" and not _reads(*args[1:3]):
        return
    path = os.path.abspath(os.fsdecode(path))
    if path == _root or path.startswith(_root + os.sep):
        _files.add(_source_of(os.path.relpath(path, _root)))


def start(root: Path) -> None:
    """Record from now on what this process reads under `root`."""
    global _params, _root
    _params, _root = set(), str(root.resolve())
    sys.addaudithook(_audit)


def write(stage: str, directory: Path) -> None:
    """<directory>/<stage>.json. A path gone by now (a temporary, a probe for a file that is not there) was
    no input."""
    with paused():
        directory.mkdir(parents=True, exist_ok=True)
        files = sorted(name for name in _files if os.path.lexists(os.path.join(_root, name)))
        record = {"params": sorted(_params or ()), "files": files}
        (directory / f"{stage}.json").write_text(json.dumps(record, indent=1))
