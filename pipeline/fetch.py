"""Getting bytes from elsewhere: resumable, verified HTTP downloads and safe archive extraction."""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.params import parse_checksum

log = logging.getLogger(__name__)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_CHUNK = 1 << 20


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


def extract(archive: Path, dest: Path) -> None:
    """Unpack a zip or tar archive into `dest`, refusing members that would land outside it."""
    dest = dest.resolve()
    try:
        # tar first: is_zipfile() also accepts a plain tar whose last member happens to be a zip.
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as bundle:
                bundle.extractall(dest, filter="data")  # rejects absolute paths, '..', device files
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                for member in bundle.namelist():
                    if not (dest / member).resolve().is_relative_to(dest):
                        raise UserError(f"{archive}: member {member!r} would be written outside the target")
                bundle.extractall(dest)
        else:
            raise UserError(f"{archive}: not a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UserError(f"{archive}: broken archive ({exc})") from None

