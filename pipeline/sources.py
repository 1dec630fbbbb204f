"""Where a dataset comes from on this machine, and a fingerprint of its local files.

The fingerprint is what makes a local folder or archive a real dependency: DVC hashes the files it knows,
and to DVC a dataset outside the project (a mirror in ../shared, the own-data recipe) is only a param value.
It is content-based (md5 of every file, as DVC hashes), so it is the same on every machine holding the same
photos; a file's md5 is reused while its size, mtime and inode are unchanged (DVC's own state check), so a
repeat costs one stat per file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import fsio, paths
from pipeline.errors import UserError
from pipeline.params import DatasetSpec, MirrorSpec

log = logging.getLogger("sources")

REMOTE_PREFIXES = ("http://", "https://", "sklearn:", "tfds:")


@dataclass(frozen=True)
class Location:
    """Who serves the dataset: the first mirror that exists here, else the origin."""

    served_by: str  # "mirror" | "origin"
    written: str  # as params.yaml gives it: the same on every machine
    local: Path | None  # the folder or archive here; None for a URL, tfds: or sklearn: origin
    mirror: MirrorSpec | None = None


def locate(spec: DatasetSpec, root: Path) -> Location:
    for mirror in spec.mirrors:
        local = paths.resolve_local(mirror.path, root)
        if local.exists():
            return Location("mirror", mirror.path, local, mirror)
        log.info("mirror %s not found", local)
    if spec.source.startswith(REMOTE_PREFIXES):
        return Location("origin", spec.source, None)
    local = paths.resolve_local(spec.source, root)
    if not local.exists():
        raise UserError(f"data source {spec.source!r} not found (looked at {local}) and no mirror exists")
    return Location("origin", spec.source, local)


def _entries(local: Path) -> list[tuple[str, Path | str]]:
    """(relative name, file to hash, or what the entry is instead) for a folder's every entry, sorted; for a
    file, itself. Links to folders are named with their target, not followed (download keeps links inside
    the dataset, whose files are listed where they are)."""
    if not local.is_dir():
        return [(local.name, local)]
    found: list[tuple[str, Path | str]] = []
    for folder, subfolders, files in os.walk(local):
        for name in subfolders:
            path = Path(folder, name)
            if path.is_symlink():
                found.append((path.relative_to(local).as_posix(), f"link to {os.readlink(path)}"))
        for name in files:
            path = Path(folder, name)
            try:
                mode = path.stat().st_mode
            except OSError as exc:  # a broken link, a file gone meanwhile
                found.append((path.relative_to(local).as_posix(), f"unreadable: {exc.strerror}"))
                continue
            kind = path if stat.S_ISREG(mode) else fsio.file_kind(mode)
            found.append((path.relative_to(local).as_posix(), kind))
    return sorted(found, key=lambda entry: entry[0])


def _md5(path: Path, known: dict[str, Any], seen: dict[str, Any]) -> str:
    """The file's md5, from `known` while its size, mtime and inode are as recorded there; noted in `seen`."""
    info = path.stat()
    key = str(path)
    stamp = [info.st_size, info.st_mtime_ns, info.st_ino]
    cached = known.get(key)
    digest = cached[3] if cached and cached[:3] == stamp else fsio.file_digest(path, "md5")
    seen[key] = [*stamp, digest]
    return digest


def fingerprint(where: Location, state: Path) -> dict[str, Any]:
    """What download would read, as a record that is byte-identical while nothing in it changed.

    `state` keeps each local file's md5 with its stat, so that only new or touched files are read again.
    """
    record: dict[str, Any] = {"served_by": where.served_by, "location": where.written}
    if where.local is None:
        return record
    known = fsio.read_json(state) if state.is_file() else {}
    seen: dict[str, Any] = {}
    digest = hashlib.sha256()
    entries = _entries(where.local)
    for name, what in entries:
        described = _md5(what, known, seen) if isinstance(what, Path) else what
        digest.update(f"{name}\0{described}\n".encode("utf-8", "surrogateescape"))
    if seen != known:
        fsio.write_json(state, seen)
    return record | {"entries": len(entries), "sha256": digest.hexdigest()}
