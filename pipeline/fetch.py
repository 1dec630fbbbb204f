"""Getting bytes from elsewhere: resumable, verified HTTP downloads and archives read in place.

Neither the server nor the archive is trusted: `DownloadParams` bounds a body's size, a transfer's
pace and a download's total time, and an archive's entries, extracted size and compression ratio;
archive members may not escape their folder or be links or devices.
"""
from __future__ import annotations

import http.client
import logging
import os
import posixpath
import re
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from tqdm import tqdm

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.params import DownloadParams, parse_checksum

log = logging.getLogger(__name__)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_CHUNK = 1 << 20
_RATIO_CHECKED_FROM = 100_000_000  # below this, text and the like may well compress past the ratio
_CONTENT_RANGE = re.compile(r"bytes (?P<start>\d+)-\d+/(?P<total>\d+|\*)")
_Entry = TypeVar("_Entry", tarfile.TarInfo, zipfile.ZipInfo)  # one line of an archive's listing


# What a damaged archive raises, from the container or the compression under it.
_BROKEN = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError)


class DownloadError(UserError):
    """A download failed for good (HTTP 4xx, checksum mismatch, too large, retries or deadline exhausted)."""


def verify(path: Path, checksum: str | None, what: str) -> str:
    """sha256 of `path`; a DownloadError if it does not match `checksum` (sha256 or md5 form)."""
    sha256 = fsio.file_digest(path)
    if checksum:
        algorithm, expected = parse_checksum(checksum)
        actual = sha256 if algorithm == "sha256" else fsio.file_digest(path, algorithm)
        if actual != expected:
            raise DownloadError(f"{what}: {algorithm} is {actual}, expected {expected} (corrupt or changed upstream)")
    return sha256


def _content_range(header: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None for '*') of `Content-Range: bytes START-END/TOTAL`; None when unparsable."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        return None
    return int(match["start"]), None if match["total"] == "*" else int(match["total"])


def _body_range(response: http.client.HTTPResponse) -> tuple[int | None, int | None]:
    """(byte of the file the body starts at, size of the whole file) as announced.

    The start is None for a 206 without a parsable Content-Range; the size is None when no header says.
    """
    length = response.length  # Content-Length as http.client parsed it: None when absent or invalid
    if response.status != 206:
        return 0, length
    parsed = _content_range(response.headers.get("Content-Range"))
    if parsed is None:
        return None, None
    start, total = parsed
    return start, total if total is not None or length is None else start + length


class _TooLarge(DownloadError):
    """A body over download.max_download_bytes: not retried, and its partial file is deleted."""


def _max_download(limits: DownloadParams) -> str:
    return f"download.max_download_bytes ({limits.max_download_bytes:,})"


class _Stalled(ConnectionError):
    """A transfer too slow to wait on: retried, with resume, like a dropped connection."""


def _stalled(limits: DownloadParams) -> _Stalled:
    return _Stalled(
        f"stalled: under {limits.min_bytes_per_second} bytes/s over {limits.stall_seconds:g} s "
        "(download.min_bytes_per_second, download.stall_seconds)"
    )


def _blocks(response: http.client.HTTPResponse, limits: DownloadParams) -> Iterator[bytes]:
    """The body as it arrives; _Stalled once a stall_seconds window averages under min_bytes_per_second.

    read1() returns what has arrived, where read() would wait for a whole block; the socket timeout
    (stall_seconds) catches a server gone silent, but every byte of a slow drip resets it.
    """
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:
            block = response.read1(_CHUNK)
        except TimeoutError:
            raise _stalled(limits) from None
        if not block:
            return
        yield block
        window_bytes += len(block)
        elapsed = time.monotonic() - window_start
        if elapsed >= limits.stall_seconds:
            if window_bytes < limits.min_bytes_per_second * elapsed:
                raise _stalled(limits)
            window_start, window_bytes = time.monotonic(), 0


def _check_deadline(url: str, deadline: float, limits: DownloadParams, wait: float = 0) -> None:
    """A DownloadError if `wait` more seconds would end past `deadline` (a time.monotonic() value)."""
    if time.monotonic() + wait > deadline:
        raise DownloadError(
            f"{url}: not done within download.deadline_seconds ({limits.deadline_seconds:g} s, all attempts "
            "and waits included)"
        )


def _validator_file(part: Path) -> Path:
    """Where the validator of the body in `part` is kept, for If-Range on a resume (a later run's included)."""
    return part.with_name(part.name + ".validator")


def _validator(response: http.client.HTTPResponse) -> str | None:
    """What If-Range can send back for this body: a strong ETag, else Last-Modified, else None.

    A weak ETag (W/"...") never matches in If-Range (RFC 9110 13.1.5), so it is no validator here.
    """
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _remember(part: Path, validator: str | None) -> None:
    if validator is None:
        _validator_file(part).unlink(missing_ok=True)
    else:
        _validator_file(part).write_text(validator)


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)


def _resume_point(url: str, part: Path, pinned: bool) -> tuple[int, str | None]:
    """(byte to continue `part` from, validator to send in If-Range); (0, None) starts it over.

    If-Range makes the server send the rest only while the file is still the one `part` holds, and the
    whole new file otherwise (200): two versions are never spliced. A part without a validator is
    continued only where a pinned checksum would catch a splice.
    """
    offset = part.stat().st_size if part.exists() else 0
    stored = _validator_file(part)
    if offset and stored.exists():
        return offset, stored.read_text()
    if offset and not pinned:
        log.warning("%s: no ETag or Last-Modified was given for %s and no checksum is pinned: starting over "
                    "(resuming could splice two versions of the file)", url, part.name)
        return 0, None
    return offset, None


def _transfer(url: str, part: Path, limits: DownloadParams, deadline: float, pinned: bool) -> None:
    """Append the rest of `url` to `part`; raise on any short, failed, stalled or oversized transfer."""
    offset, validator = _resume_point(url, part, pinned)
    headers = {"User-Agent": "image-pipeline/0.1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    if validator:
        headers["If-Range"] = validator
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=limits.stall_seconds
        )
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the partial file is complete
            return
        raise
    with response:
        start, total = _body_range(response)
        if start not in (0, offset):  # a body from elsewhere in the file (or who knows where): never splice it
            _discard(part)
            content_range = response.headers.get("Content-Range")
            raise ConnectionError(
                f"asked for bytes from {offset}, got a 206 with Content-Range {content_range!r}: "
                "partial file discarded, starting over"
            )
        if start != offset:  # If-Range saw another file upstream, or the server ignores ranges
            log.warning("%s: asked for bytes from %d, got the whole file: starting over", url, offset)
        if total is not None and total > limits.max_download_bytes:
            raise _TooLarge(f"{url}: announces {total:,} bytes, over {_max_download(limits)}")
        with open(part, "ab" if start else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-5], leave=False
        ) as bar:
            if not start:  # after the truncation: a crash in between leaves an empty part, not old bytes
                _remember(part, _validator(response))
            for block in _blocks(response, limits):
                if out.tell() + len(block) > limits.max_download_bytes:
                    raise _TooLarge(f"{url}: sends more than {_max_download(limits)}")
                out.write(block)
                bar.update(len(block))
                _check_deadline(url, deadline, limits)
    received = part.stat().st_size
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")


def download(url: str, dest: Path, checksum: str | None, limits: DownloadParams) -> str:
    """Download `url` to `dest`, resuming `<dest>.part` across retries and runs; return its sha256.

    A resume asks for the rest only if the file is unchanged upstream (If-Range, with the ETag or
    Last-Modified kept in `<dest>.part.validator`); a changed file comes again from its first byte.
    `dest` appears only complete and verified. Drops, stalls and server errors are retried with
    back-off, within `limits`; a body too large or a checksum mismatch deletes the partial file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    deadline = time.monotonic() + limits.deadline_seconds
    for attempt in range(limits.retries + 1):
        try:
            _transfer(url, part, limits, deadline, pinned=bool(checksum))
            break
        except _TooLarge:
            _discard(part)
            raise
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):  # timeouts and rate limits pass
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            problem: Exception = exc
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as exc:
            problem = exc
        if attempt == limits.retries:
            raise DownloadError(f"{url}: failed after {attempt + 1} attempts: {problem}")
        wait = min(2**attempt, 30)
        _check_deadline(url, deadline, limits, wait)  # no point waiting for a retry that cannot finish
        log.warning("download of %s interrupted (%s); retrying in %ss", url, problem, wait)
        time.sleep(wait)
    try:
        sha256 = verify(part, checksum, url)
    except DownloadError:
        _discard(part)
        raise
    os.replace(part, dest)
    _validator_file(part).unlink(missing_ok=True)
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


def _bounded(
    archive: Path, entries: Iterable[_Entry], size: Callable[[_Entry], int], limits: DownloadParams | None
) -> Iterator[_Entry]:
    """`entries`, each checked before its data is read: count, running total of sizes, expansion ratio.

    Every entry counts, inside `only` or not (a tar stream decompresses those it skips). Declared sizes
    are what comes out: zipfile stops at file_size and checks the CRC; a tar header's size is exact.
    """
    if limits is None:
        yield from entries
        return
    archive_bytes = archive.stat().st_size
    total = 0
    for count, entry in enumerate(entries, 1):
        total += size(entry)
        if count > limits.max_members:
            raise _bomb(archive, f"over {limits.max_members:,} entries", "max_members")
        if total > limits.max_extracted_bytes:
            raise _bomb(archive, f"members over {limits.max_extracted_bytes:,} bytes", "max_extracted_bytes")
        if total > _RATIO_CHECKED_FROM and total > limits.max_compression_ratio * archive_bytes:
            ratio = f"members over {limits.max_compression_ratio:g} times its {archive_bytes:,} bytes"
            raise _bomb(archive, ratio, "max_compression_ratio")
        yield entry


def _bomb(archive: Path, what: str, key: str) -> UserError:
    return UserError(f"{archive}: {what} (download.{key}): refused as a possible archive bomb")


def _tar_members(archive: Path, only: str | None, limits: DownloadParams | None) -> Iterator[Member]:
    with tarfile.open(archive, "r|*") as bundle:  # a stream: read once, front to back, nothing unpacked
        for info in _bounded(archive, bundle, lambda info: info.size, limits):
            name = _relative(archive, info.name, only)
            if name is None:
                continue
            if info.isdir():
                yield Member(name)
            elif info.isreg():
                yield Member(name, info.size, _Guarded(bundle.extractfile(info), archive, info.name))
            else:
                raise _refuse(archive, info.name, "link" if info.issym() or info.islnk() else "device or pipe")


def _zip_members(archive: Path, only: str | None, limits: DownloadParams | None) -> Iterator[Member]:
    with zipfile.ZipFile(archive) as bundle:
        # The whole listing is known up front: check it all before the first member is read.
        for info in list(_bounded(archive, bundle.infolist(), lambda info: info.file_size, limits)):
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


def members(archive: Path, only: str | None = None, limits: DownloadParams | None = None) -> Iterator[Member]:
    """The folders and files of a zip or tar archive (only those under folder `only`), read in place.

    Nothing is unpacked to disk: each file is read from the archive as it is reached. Refused: absolute
    names, '..' out of the root, links, devices and pipes, and, given `limits`, an archive over its
    member count, total size or compression ratio (None: no bounds, for archives we made ourselves).
    """
    only = only.strip("/") if only else None
    try:
        # tar first: is_zipfile() also accepts a plain tar whose last member happens to be a zip.
        if tarfile.is_tarfile(archive):
            yield from _tar_members(archive, only, limits)
        elif zipfile.is_zipfile(archive):
            yield from _zip_members(archive, only, limits)
        else:
            raise UserError(f"{archive}: not a zip or tar archive")
    except _BROKEN as exc:
        raise UserError(f"{archive}: broken archive ({exc})") from None
