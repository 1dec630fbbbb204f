"""Getting bytes from elsewhere: resumable, verified HTTP downloads, safe archive reading and extraction."""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.params import parse_checksum

log = logging.getLogger(__name__)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_CHUNK = 1 << 20


# What a damaged archive raises, from the container or the compression under it.
_BROKEN = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError)


class DownloadError(UserError):
    """A download failed for good (HTTP 4xx, checksum mismatch, retries exhausted)."""


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, checksum: str | None, what: str) -> str:
    """sha256 of `path`; a DownloadError if it does not match `checksum` (sha256 or md5 form)."""
    sha256 = file_digest(path)
    if checksum:
        algorithm, expected = parse_checksum(checksum)
        actual = sha256 if algorithm == "sha256" else file_digest(path, algorithm)
        if actual != expected:
            raise DownloadError(f"{what}: {algorithm} is {actual}, expected {expected} (corrupt or changed upstream)")
    return sha256


def _expected_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Bytes the finished file must have, from Content-Range (resumed) or Content-Length."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _transfer(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part`; raise on any short or failed transfer."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "image-pipeline/0.1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the partial file is complete
            return
        raise
    with response:
        if offset and response.status != 206:  # server ignores Range: start over
            offset = 0
        total = _expected_total(response, offset)
        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5], leave=False
        ) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                bar.update(len(block))
    received = part.stat().st_size
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")


def download(url: str, dest: Path, checksum: str | None = None, retries: int = 4, timeout: float = 60) -> str:
    """Download `url` to `dest`, resuming `<dest>.part` across retries and runs; return its sha256.

    `dest` appears only complete and verified; a checksum mismatch deletes the partial file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout)
            break
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):  # timeouts and rate limits pass
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            problem: Exception = exc
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as exc:
            problem = exc
        if attempt == retries:
            raise DownloadError(f"{url}: failed after {retries + 1} attempts: {problem}")
        wait = min(2**attempt, 30)
        log.warning("download of %s interrupted (%s); resuming in %ss", url, problem, wait)
        time.sleep(wait)
    try:
        sha256 = verify(part, checksum, url)
    except DownloadError:
        part.unlink()
        raise
    os.replace(part, dest)
    return sha256


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _inside(name: str, folder: str | None) -> bool:
    """Whether archive member `name` is `folder` or lies under it (any member when folder is None)."""
    if not folder:
        return True
    name = name.removeprefix("./").rstrip("/")
    return name == folder or name.startswith(folder + "/")


@dataclass
class Member:
    """One entry of an archive's folder: `name` is relative to it, '/'-separated, normalised.

    A folder has `size` and `stream` None. A file's `stream` reads its bytes; it is valid only until
    the next member is taken, and a damaged archive makes its read() raise a UserError naming the archive.
    """

    name: str
    size: int | None = None
    stream: BinaryIO | None = None


class _Guarded:
    """A member's reader whose archive errors (bad CRC, truncation, bad deflate data) are UserErrors."""

    def __init__(self, raw: BinaryIO, archive: Path, name: str) -> None:
        self._raw, self._archive, self._name = raw, archive, name

    def read(self, size: int = -1) -> bytes:
        try:
            return self._raw.read(size)
        except _BROKEN as exc:
            raise UserError(f"{self._archive}: broken archive, member {self._name!r} ({exc})") from None


def _relative(archive: Path, raw_name: str, only: str | None) -> str | None:
    """`raw_name` relative to folder `only` ('' for the folder itself), None when outside it.

    Refuses an absolute name or one whose '..' parts climb out of the archive's root.
    """
    name = raw_name.removeprefix("./")
    if not _inside(name, only):
        return None
    normal = posixpath.normpath(name.rstrip("/") or ".")
    if name.startswith("/") or normal == ".." or normal.startswith("../"):
        raise UserError(f"{archive}: member {raw_name!r} would be written outside the target")
    normal = "" if normal == "." else normal
    if only and not (normal == only or normal.startswith(only + "/")):
        return None  # 'only/../elsewhere': lands outside the folder
    return normal[len(only) + 1 :] if only else normal


def _refuse(archive: Path, name: str, kind: str) -> UserError:
    return UserError(f"{archive}: member {name!r} is a {kind}: refused (only plain files and folders are read)")


def _tar_members(archive: Path, only: str | None) -> Iterator[Member]:
    with tarfile.open(archive, "r|*") as bundle:  # a stream: read once, front to back, nothing unpacked
        for info in bundle:
            name = _relative(archive, info.name, only)
            if name is None:
                continue
            if info.isdir():
                yield Member(name)
            elif info.isreg():
                yield Member(name, info.size, _Guarded(bundle.extractfile(info), archive, info.name))
            else:
                raise _refuse(archive, info.name, "link" if info.issym() or info.islnk() else "device or pipe")


def _zip_members(archive: Path, only: str | None) -> Iterator[Member]:
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            name = _relative(archive, info.filename, only)
            if name is None:
                continue
            kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type; 0 where the zip does not say
            if info.is_dir():
                yield Member(name)
            elif kind == stat.S_IFLNK:
                raise _refuse(archive, info.filename, "link")
            elif kind not in (0, stat.S_IFREG):
                raise _refuse(archive, info.filename, "device or pipe")
            else:
                with bundle.open(info) as stream:
                    yield Member(name, info.file_size, _Guarded(stream, archive, info.filename))


def members(archive: Path, only: str | None = None) -> Iterator[Member]:
    """The folders and files of a zip or tar archive (only those under folder `only`), read in place.

    Nothing is unpacked to disk: each file is read from the archive as it is reached. Refused: absolute
    names, '..' out of the root, links, devices and pipes.
    """
    only = only.strip("/") if only else None
    try:
        # tar first: is_zipfile() also accepts a plain tar whose last member happens to be a zip.
        if tarfile.is_tarfile(archive):
            yield from _tar_members(archive, only)
        elif zipfile.is_zipfile(archive):
            yield from _zip_members(archive, only)
        else:
            raise UserError(f"{archive}: not a zip or tar archive")
    except _BROKEN as exc:
        raise UserError(f"{archive}: broken archive ({exc})") from None
