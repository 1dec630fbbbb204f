"""pipeline.fetch against a real HTTP server on 127.0.0.1: resume, retry, checksums, hostile servers and archives."""
from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.server
import io
import itertools
import os
import re
import struct
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import fetch, fsio
from pipeline.errors import UserError
from pipeline.fetch import DownloadError
from pipeline.params import DownloadParams

# 300 kB of incompressible, deterministic bytes: big enough that a half-written response is
# clearly partial, small enough to be instant.
PAYLOAD = hashlib.shake_256(b"image-pipeline test payload").digest(300_000)
HALF = len(PAYLOAD) // 2
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


# --------------------------------------------------------------------------------------------
# A small, controllable file server
# --------------------------------------------------------------------------------------------


TICK = 0.05  # seconds between the pieces of a slow response


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)  # path -> error status answered instead
    endless: set[str] = field(default_factory=set)  # paths answered with zeros, no Content-Length, never ending
    cut_short: int = 0  # how many of the next full-body responses are cut in half
    slow: int = 0  # how many of the next responses send `drip` bytes per TICK
    drip: int = 16  # bytes per TICK of a slow response; 0: headers, then silence
    honour_range: bool = True
    bad_range: str | None = None  # a Range answered with a 206 "from_zero", from "elsewhere", or "unlabelled"
    etag: str | None = "strong"  # each file's ETag (from its bytes): "strong", "weak" (W/"..."), or None: not sent
    last_modified: bool = True  # send each file's Last-Modified (a new date each time serve() changes it)
    modified: dict[str, str] = field(default_factory=dict)
    versions: Iterator[int] = field(default_factory=itertools.count)  # serve() calls so far: each a new date
    requests: list[dict[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)  # set at teardown: slow senders stop


def _strong(validators: dict[str, str]) -> set[str]:
    """The validators an If-Range may match: a weak ETag never does."""
    return {value for value in validators.values() if not value.startswith("W/")}


class _Handler(http.server.BaseHTTPRequestHandler):
    state: ServerState  # set per server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state = self.server.state  # type: ignore[attr-defined]
        with state.lock:
            state.requests.append(
                {"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range")}
            )
            cut, slow = state.cut_short > 0, state.slow > 0
            state.cut_short -= cut
            state.slow -= slow
        if self.path in state.status:
            self.send_error(state.status[self.path])
            return
        if self.path in state.endless:
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(ConnectionError):  # until the client hangs up
                while not state.closing.is_set():
                    self.wfile.write(bytes(1 << 16))
            return
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        total = len(data)
        start = 0
        validators = self._validators(data, state)
        requested = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range not in _strong(validators):
            requested = None  # RFC 9110 13.1.5: the file changed since the client's copy, send all of it
        if requested and state.honour_range:
            assert requested.startswith("bytes=") and requested.endswith("-"), requested
            start = int(requested[len("bytes="):-1])
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = {None: start, "from_zero": 0, "elsewhere": start // 2, "unlabelled": start}[state.bad_range]
            self.send_response(206)
            if state.bad_range != "unlabelled":
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            self.send_response(200)
        body = data[start:]
        for name, value in validators.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))  # always the full length promised
        self.end_headers()
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif slow:
            self._trickle(body, state)
        else:
            self.wfile.write(body)

    def _validators(self, data: bytes, state: ServerState) -> dict[str, str]:
        found = {}
        if state.etag is not None:
            found["ETag"] = ("W/" if state.etag == "weak" else "") + f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        if state.last_modified:
            found["Last-Modified"] = state.modified[self.path]
        return found

    def _trickle(self, body: bytes, state: ServerState) -> None:
        """`body`, state.drip bytes per TICK, until it is sent, the client hangs up or the test ends."""
        with contextlib.suppress(ConnectionError):
            for at in itertools.count(0, state.drip):
                if at >= len(body) or state.closing.wait(TICK):
                    return
                self.wfile.write(body[at : at + state.drip])


@dataclass
class Server:
    state: ServerState
    base: str

    def url(self, path: str) -> str:
        return self.base + path

    def serve(self, path: str, data: bytes) -> str:
        """Serve `data` at `path` from now on (a new version: a new ETag and Last-Modified)."""
        self.state.files[path] = data
        self.state.modified[path] = email.utils.formatdate(1_700_000_000 + 60 * next(self.state.versions), usegmt=True)
        return self.url(path)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}")  # type: ignore[attr-defined]
    finally:
        httpd.state.closing.set()  # type: ignore[attr-defined]
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record the retry back-off instead of waiting it out."""
    waited: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waited.append)
    return waited


# Roomy bounds: the tests of one bound tighten it with limits(...).
LIMITS = DownloadParams(
    max_download_bytes=10**9,
    max_extracted_bytes=10**9,
    max_members=1000,
    max_compression_ratio=200,
    stall_seconds=5,
    min_bytes_per_second=1024,
    deadline_seconds=60,
    retries=4,
)
# A drip of 16 bytes per TICK (320 B/s) is under this floor, and found out within half a second.
IMPATIENT = {"stall_seconds": 0.5, "min_bytes_per_second": 10_000}
# What the slow servers send: 12 s at that drip, so a guard that stops working fails its test, not hangs it.
SLOW = PAYLOAD[:4000]


OTHER_PAYLOAD = hashlib.shake_256(b"the same file, changed upstream").digest(len(PAYLOAD))


def limits(**changes) -> DownloadParams:
    return LIMITS.model_copy(update=changes)


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------------------------
# download()
# --------------------------------------------------------------------------------------------


def test_full_download(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "sub" / "data.bin"  # parent is created

    sha = fetch.download(url, dest, None, LIMITS)

    assert dest.read_bytes() == PAYLOAD
    assert sha == SHA256
    assert not part_of(dest).exists()
    assert [r["range"] for r in server.state.requests] == [None]
    assert sleeps == []


def test_download_with_pinned_sha256_forms(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    assert fetch.download(url, tmp_path / "a.bin", SHA256.upper(), LIMITS) == SHA256
    assert fetch.download(url, tmp_path / "b.bin", f"sha256:{SHA256}", LIMITS) == SHA256
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == PAYLOAD


def test_cut_short_response_is_resumed_with_range(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.cut_short = 1
    dest = tmp_path / "data.bin"

    sha = fetch.download(url, dest, SHA256, limits(retries=2))

    ranges = [r["range"] for r in server.state.requests]
    assert ranges == [None, f"bytes={HALF}-"]  # the retry continues from the bytes on disk
    assert dest.read_bytes() == PAYLOAD
    assert sha == SHA256
    assert not part_of(dest).exists()
    assert sleeps == [1]  # one back-off, 2**0 seconds


def test_every_retry_continues_where_the_last_one_stopped(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.cut_short = 2  # the full response and the first resumed one are both cut in half
    dest = tmp_path / "data.bin"

    assert fetch.download(url, dest, SHA256, limits(retries=2)) == SHA256

    quarter = HALF + (len(PAYLOAD) - HALF) // 2
    assert [r["range"] for r in server.state.requests] == [None, f"bytes={HALF}-", f"bytes={quarter}-"]
    assert dest.read_bytes() == PAYLOAD
    assert sleeps == [1, 2]


def test_failed_run_leaves_the_part_file_for_the_next_run(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.cut_short = 1
    dest = tmp_path / "data.bin"

    with pytest.raises(DownloadError, match="failed after 1 attempts"):
        fetch.download(url, dest, SHA256, limits(retries=0))
    assert not dest.exists()
    assert part_of(dest).read_bytes() == PAYLOAD[:HALF]

    assert fetch.download(url, dest, SHA256, limits(retries=0)) == SHA256  # a later run picks it up
    assert [r["range"] for r in server.state.requests] == [None, f"bytes={HALF}-"]
    assert dest.read_bytes() == PAYLOAD
    assert not part_of(dest).exists()


def test_partial_file_from_an_earlier_run_is_continued(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD[:HALF])

    sha = fetch.download(url, dest, SHA256, LIMITS)

    assert [r["range"] for r in server.state.requests] == [f"bytes={HALF}-"]
    assert dest.read_bytes() == PAYLOAD
    assert sha == SHA256
    assert not part_of(dest).exists()
    assert sleeps == []


def test_complete_partial_file_answered_416_is_accepted(server, tmp_path):
    """A .part that already holds everything: the server says 416, the file is verified and kept."""
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD)

    assert fetch.download(url, dest, SHA256, LIMITS) == SHA256

    assert [r["range"] for r in server.state.requests] == [f"bytes={len(PAYLOAD)}-"]
    assert dest.read_bytes() == PAYLOAD
    assert not part_of(dest).exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.honour_range = False
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(b"stale bytes that must not stay in front")

    assert fetch.download(url, dest, SHA256, LIMITS) == SHA256
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_everything(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    wrong = "0" * 64

    with pytest.raises(DownloadError) as caught:
        fetch.download(url, dest, wrong, LIMITS)

    message = str(caught.value)
    assert "sha256" in message and f"expected {wrong}" in message and SHA256 in message
    assert url in message
    assert not dest.exists()
    assert not part_of(dest).exists()
    assert isinstance(caught.value, UserError)


def test_md5_checksum_accepted_and_verified(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)

    sha = fetch.download(url, tmp_path / "ok.bin", f"md5:{MD5}", LIMITS)
    assert sha == SHA256  # the return value is always the sha256
    assert (tmp_path / "ok.bin").read_bytes() == PAYLOAD

    wrong_md5 = "f" * 32
    with pytest.raises(DownloadError, match=f"md5 is {MD5}, expected {wrong_md5}"):
        fetch.download(url, tmp_path / "bad.bin", f"md5:{wrong_md5}", LIMITS)
    assert not (tmp_path / "bad.bin").exists()
    assert not part_of(tmp_path / "bad.bin").exists()


def test_http_404_fails_at_once(server, tmp_path, sleeps):
    dest = tmp_path / "missing.bin"

    with pytest.raises(DownloadError, match="404"):
        fetch.download(server.url("/missing.bin"), dest, None, limits(retries=3))

    assert len(server.state.requests) == 1
    assert sleeps == []
    assert not dest.exists()


def test_server_errors_are_retried_then_reported(server, tmp_path, sleeps):
    url = server.serve("/flaky.bin", PAYLOAD)
    server.state.status["/flaky.bin"] = 503

    with pytest.raises(DownloadError, match="failed after 3 attempts"):
        fetch.download(url, tmp_path / "flaky.bin", None, limits(retries=2))

    assert len(server.state.requests) == 3
    assert sleeps == [1, 2]  # exponential back-off between attempts
    assert not (tmp_path / "flaky.bin").exists()


def test_unreachable_server_is_a_download_error(tmp_path, sleeps):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        fetch.download(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", None, limits(retries=1))
    assert sleeps == [1]


# --------------------------------------------------------------------------------------------
# download() from hostile or unlucky servers: bounded in size, pace and time; no spliced files
# --------------------------------------------------------------------------------------------


def test_endless_body_is_cut_at_the_limit_and_not_retried(server, tmp_path, sleeps):
    server.state.endless.add("/endless.bin")
    url = server.url("/endless.bin")
    dest = tmp_path / "endless.bin"

    with pytest.raises(DownloadError, match="sends more than download.max_download_bytes") as caught:
        fetch.download(url, dest, None, limits(max_download_bytes=1_000_000))

    assert url in str(caught.value)
    assert len(server.state.requests) == 1 and sleeps == []
    assert not dest.exists() and not part_of(dest).exists()


@pytest.mark.parametrize("resumed", [False, True], ids=["Content-Length", "Content-Range"])
def test_announced_oversize_body_is_refused_before_reading(server, tmp_path, sleeps, resumed):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    if resumed:  # the 206 announces the remaining half, and the whole file's size
        server.state.cut_short = 1
        with pytest.raises(DownloadError):
            fetch.download(url, dest, None, limits(retries=0))  # leaves half the file and its ETag
        server.state.requests.clear()

    with pytest.raises(DownloadError, match=f"announces {len(PAYLOAD):,} bytes, over download.max_download_bytes"):
        fetch.download(url, dest, None, limits(max_download_bytes=200_000))

    assert len(server.state.requests) == 1 and sleeps == []
    assert not dest.exists() and not part_of(dest).exists()


def test_slow_drip_is_retried_from_where_it_stopped(server, tmp_path, sleeps):
    url = server.serve("/data.bin", SLOW)
    server.state.slow = 1
    dest = tmp_path / "data.bin"

    fetch.download(url, dest, None, limits(**IMPATIENT))

    first, second = [r["range"] for r in server.state.requests]
    assert first is None and 0 < int(re.fullmatch(r"bytes=(\d+)-", second)[1]) < len(SLOW)  # cut off, then resumed
    assert sleeps == [1]
    assert dest.read_bytes() == SLOW


@pytest.mark.parametrize("drip", [16, 0], ids=["slow drip", "silence"])
def test_stalling_every_time_fails_saying_so(server, tmp_path, sleeps, drip):
    url = server.serve("/data.bin", SLOW)
    server.state.slow, server.state.drip = 99, drip
    dest = tmp_path / "data.bin"

    with pytest.raises(DownloadError) as caught:
        fetch.download(url, dest, None, limits(**IMPATIENT, retries=1))

    assert str(caught.value) == (
        f"{url}: failed after 2 attempts: stalled: under 10000 bytes/s over 0.5 s "
        "(download.min_bytes_per_second, download.stall_seconds)"
    )
    assert sleeps == [1]
    assert not dest.exists()


def test_deadline_counts_every_attempt_and_wait(server, tmp_path, sleeps):
    url = server.serve("/data.bin", SLOW)
    server.state.slow = 99
    dest = tmp_path / "data.bin"

    with pytest.raises(DownloadError, match=r"not done within download.deadline_seconds \(3 s"):
        fetch.download(url, dest, None, limits(**IMPATIENT, retries=20, deadline_seconds=3))

    # Two stalls of ~0.5 s: the first back-off (1 s) fits in 3 s, the second (2 s) would not.
    assert len(server.state.requests) == 2 and sleeps == [1]
    assert part_of(dest).exists()  # kept: a later run resumes it


def test_deadline_ends_a_steady_transfer_that_never_finishes(server, tmp_path, sleeps):
    url = server.serve("/data.bin", SLOW)
    server.state.slow = 1  # 320 B/s: over this floor, never a stall, but 12 s in all
    steady = limits(stall_seconds=0.2, min_bytes_per_second=1, deadline_seconds=0.5)
    started = time.monotonic()

    with pytest.raises(DownloadError, match=r"not done within download.deadline_seconds \(0.5 s"):
        fetch.download(url, tmp_path / "data.bin", None, steady)

    assert time.monotonic() - started < 5
    assert len(server.state.requests) == 1 and sleeps == []


def test_206_from_byte_zero_rewrites_the_file_from_the_start(server, tmp_path, sleeps, caplog):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.bad_range = "from_zero"
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD[:HALF])

    assert fetch.download(url, dest, SHA256, LIMITS) == SHA256  # appended, it would be 1.5 payloads

    assert [r["range"] for r in server.state.requests] == [f"bytes={HALF}-"] and sleeps == []
    assert f"asked for bytes from {HALF}, got the whole file: starting over" in caplog.text


@pytest.mark.parametrize("bad_range", ["elsewhere", "unlabelled"])
def test_206_from_another_byte_discards_the_partial_file_and_starts_over(server, tmp_path, sleeps, caplog, bad_range):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.bad_range = bad_range
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD[:HALF])

    assert fetch.download(url, dest, SHA256, LIMITS) == SHA256

    assert [r["range"] for r in server.state.requests] == [f"bytes={HALF}-", None] and sleeps == [1]
    assert "partial file discarded, starting over" in caplog.text


def test_a_later_run_resumes_only_the_same_file_with_if_range(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.cut_short = 1
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError):
        fetch.download(url, dest, None, limits(retries=0))
    etag = f'"{SHA256[:16]}"'
    assert fetch._validator_file(part_of(dest)).read_text() == etag  # kept beside the .part

    assert fetch.download(url, dest, None, LIMITS) == SHA256

    assert [(r["range"], r["if_range"]) for r in server.state.requests] == [(None, None), (f"bytes={HALF}-", etag)]
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]  # neither .part nor its validator stays


@pytest.mark.parametrize(("etag", "last_modified", "sent"), [
    ("strong", True, "etag"), ("weak", True, "last_modified"), (None, True, "last_modified"),
], ids=["ETag", "weak ETag: Last-Modified", "Last-Modified"])
def test_a_file_changed_upstream_is_fetched_again_never_spliced(server, tmp_path, sleeps, caplog, etag, last_modified, sent):
    """No checksum pinned (rps, cifar10): only If-Range stands between an old half and a new half."""
    server.state.etag, server.state.last_modified = etag, last_modified
    url = server.serve("/data.bin", PAYLOAD)
    first_date = server.state.modified["/data.bin"]
    server.state.cut_short = 1
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError):
        fetch.download(url, dest, None, limits(retries=0))
    server.serve("/data.bin", OTHER_PAYLOAD)  # a new release under the same URL

    assert fetch.download(url, dest, None, LIMITS) == hashlib.sha256(OTHER_PAYLOAD).hexdigest()

    resumed = server.state.requests[-1]
    assert resumed["range"] == f"bytes={HALF}-"
    assert resumed["if_range"] == {"etag": f'"{SHA256[:16]}"', "last_modified": first_date}[sent]
    assert dest.read_bytes() == OTHER_PAYLOAD  # the server answered 200: the new file from its first byte
    assert f"asked for bytes from {HALF}, got the whole file: starting over" in caplog.text


@pytest.mark.parametrize("pinned", [False, True], ids=["no checksum: start over", "checksum: resume"])
def test_a_part_without_validator_is_resumed_only_under_a_pinned_checksum(server, tmp_path, sleeps, caplog, pinned):
    server.state.etag, server.state.last_modified = None, False
    url = server.serve("/data.bin", PAYLOAD)
    server.state.cut_short = 1
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError):
        fetch.download(url, dest, SHA256 if pinned else None, limits(retries=0))
    assert not fetch._validator_file(part_of(dest)).exists()

    assert fetch.download(url, dest, SHA256 if pinned else None, LIMITS) == SHA256

    assert server.state.requests[-1] == {"path": "/data.bin", "range": f"bytes={HALF}-" if pinned else None, "if_range": None}
    assert dest.read_bytes() == PAYLOAD
    assert ("no ETag or Last-Modified was given for data.bin.part and no checksum is pinned" in caplog.text) != pinned


# --------------------------------------------------------------------------------------------
# verify(), is_archive()
# --------------------------------------------------------------------------------------------


def test_verify_returns_sha256_and_checks_both_forms(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)
    assert fetch.verify(path, None, "blob") == SHA256
    assert fetch.verify(path, f"md5:{MD5.upper()}", "blob") == SHA256
    with pytest.raises(DownloadError, match="^blob: sha256 is"):
        fetch.verify(path, "1" * 64, "blob")
    assert path.exists()  # verify never deletes


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.zip", True),
        ("A.ZIP", True),
        ("a.tar", True),
        ("a.tar.gz", True),
        ("a.tgz", True),
        ("dir/a.TGZ", True),
        ("a.gz", False),
        ("a.tar.bz2", False),
        ("zip", False),
        ("folder", False),
        ("a.zip.part", False),
    ],
)
def test_is_archive(name, expected):
    assert fetch.is_archive(name) is expected
    assert fetch.is_archive(Path(name)) is expected


# --------------------------------------------------------------------------------------------
# archives: helpers for members()
# --------------------------------------------------------------------------------------------

TREE = {
    "bundle/cats/a.txt": b"cat a",
    "bundle/cats/b.txt": b"cat b",
    "bundle/dogs/c.txt": b"dog c" * 100,
    "bundle/README": b"readme",
}


# A GitHub-style archive: one top folder, the wanted data in one sub-folder beside others.
ORIGIN_LIKE = {
    "repo-abc/train/cats/a.txt": b"train cat",
    "repo-abc/train/dogs/b.txt": b"train dog",
    "repo-abc/test/cats/c.txt": b"test cat",
    "repo-abc/README.md": b"readme",
}


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)  # taken as given: no '..' or '/' clean-up on writing
            info.compress_type = zipfile.ZIP_DEFLATED
            bundle.writestr(info, data)
    return path


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return path


def test_file_digest_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD * 5)  # > 1 MiB: several read blocks
    assert fsio.file_digest(path) == hashlib.sha256(PAYLOAD * 5).hexdigest()
    assert fsio.file_digest(path, "md5") == hashlib.md5(PAYLOAD * 5).hexdigest()
    assert os.path.getsize(path) > 1 << 20


# --------------------------------------------------------------------------------------------
# members(): the archive read in place, refusing escapes, links and devices
# --------------------------------------------------------------------------------------------


def read_members(
    archive: Path, only: str | None = None, bounds: DownloadParams | None = None
) -> dict[str, bytes | None]:
    """name -> bytes (None for a folder), each file read while it is the current member."""
    return {m.name: (m.stream.read() if m.stream else None) for m in fetch.members(archive, only, bounds)}


@pytest.mark.parametrize("maker,name", [(make_zip, "bundle.zip"), (make_tar, "bundle.tar.gz"), (make_tar, "bundle.tar")])
def test_members_round_trip(tmp_path, maker, name):
    archive = maker(tmp_path / name, TREE) if name != "bundle.tar" else make_tar(tmp_path / name, TREE, "w")
    assert read_members(archive) == TREE
    assert {m.name: m.size for m in fetch.members(archive)} == {k: len(v) for k, v in TREE.items()}
    assert list((tmp_path).iterdir()) == [archive]  # nothing unpacked


@pytest.mark.parametrize("maker,name", [(make_zip, "repo.zip"), (make_tar, "repo.tar.gz")])
@pytest.mark.parametrize("only", ["repo-abc/train", "repo-abc/train/", "/repo-abc/train"])
def test_members_of_one_folder_are_relative_to_it(tmp_path, maker, name, only):
    archive = maker(tmp_path / name, ORIGIN_LIKE)
    assert read_members(archive, only) == {"cats/a.txt": b"train cat", "dogs/b.txt": b"train dog"}


def test_members_name_folders_and_normalise_names(tmp_path):
    archive = tmp_path / "dirs.tar"
    with tarfile.open(archive, "w") as bundle:
        for name in ("./top", "./top/empty", "./top/cls"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            bundle.addfile(info)
        info = tarfile.TarInfo("./top/cls/x/../a.bin")
        info.size = 1
        bundle.addfile(info, io.BytesIO(b"a"))
    assert read_members(archive, "top") == {"": None, "empty": None, "cls": None, "cls/a.bin": b"a"}


@pytest.mark.parametrize("evil", ["../evil.txt", "inner/../../evil.txt", "/abs/evil.txt"])
@pytest.mark.parametrize("maker,name", [(make_zip, "evil.zip"), (make_tar, "evil.tar.gz")])
def test_members_escaping_the_root_are_refused(tmp_path, maker, name, evil):
    archive = maker(tmp_path / name, {"good/ok.txt": b"fine", evil: b"pwned"})
    with pytest.raises(UserError, match="would be written outside the target") as caught:
        read_members(archive)
    assert repr(evil) in str(caught.value) and str(archive) in str(caught.value)


def test_members_escaping_the_folder_are_refused_with_only(tmp_path):
    archive = make_tar(tmp_path / "evil.tar.gz", {"top/../../escaped.txt": b"x", "top/ok.txt": b"ok"})
    with pytest.raises(UserError, match="'top/../../escaped.txt' would be written outside the target"):
        read_members(archive, "top")


@pytest.mark.parametrize("kind,what", [(tarfile.SYMTYPE, "link"), (tarfile.LNKTYPE, "link"), (tarfile.CHRTYPE, "device or pipe"), (tarfile.FIFOTYPE, "device or pipe")])
def test_tar_links_and_devices_are_refused(tmp_path, kind, what):
    archive = tmp_path / "special.tar"
    with tarfile.open(archive, "w") as bundle:
        info = tarfile.TarInfo("cls/ok.txt")
        info.size = 2
        bundle.addfile(info, io.BytesIO(b"ok"))
        special = tarfile.TarInfo("cls/special")
        special.type, special.linkname = kind, "cls/ok.txt"
        bundle.addfile(special)
    with pytest.raises(UserError, match=f"member 'cls/special' is a {what}: refused"):
        read_members(archive)


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("cls/ok.txt", b"ok")
        info = zipfile.ZipInfo("cls/link")
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        bundle.writestr(info, b"/etc/passwd")
    with pytest.raises(UserError, match="member 'cls/link' is a link: refused"):
        read_members(archive)


def test_members_of_a_truncated_tar_gz_fail_naming_the_archive(tmp_path):
    big = {"bundle/cls/big.bin": PAYLOAD}  # incompressible: the cut lands inside member data
    data = make_tar(tmp_path / "whole.tar.gz", big).read_bytes()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{broken}: broken archive"):
        read_members(broken)


def test_members_of_a_zip_with_corrupt_data_fail_naming_the_member(tmp_path):
    archive = make_zip(tmp_path / "bad.zip", {"cls/a.txt": b"hello " * 1000})
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as bundle:
        offset = bundle.infolist()[0].header_offset
    name_len, extra_len = struct.unpack("<HH", raw[offset + 26 : offset + 30])
    raw[offset + 30 + name_len + extra_len] = 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"{archive}: broken archive, member 'cls/a.txt'"):
        read_members(archive)


def test_members_of_a_non_archive(tmp_path):
    plain = tmp_path / "notes.zip"
    plain.write_text("just some text, not an archive\n" * 20)
    with pytest.raises(UserError, match="not a zip or tar archive"):
        read_members(plain)


# --------------------------------------------------------------------------------------------
# members() with limits: archive bombs are refused before their data is read
# --------------------------------------------------------------------------------------------

BOMB_BYTES = 150 << 20  # past the 100 MB from which the ratio counts; deflates to ~150 kB in ~0.5 s


def make_bomb(path: Path) -> Path:
    """An archive of one member of BOMB_BYTES zeros, from a sparse file (nothing that size is written)."""
    zeros = path.with_name("zeros.bin")
    with open(zeros, "wb") as stream:
        stream.truncate(BOMB_BYTES)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
            bundle.write(zeros, "bomb/zeros.bin")
    else:
        with tarfile.open(path, "w:gz") as bundle:
            bundle.add(zeros, "bomb/zeros.bin")
    zeros.unlink()
    return path



@pytest.mark.parametrize("name", ["bomb.zip", "bomb.tar.gz"])
def test_archive_bomb_is_refused_by_its_compression_ratio(tmp_path, params, name):
    bomb = make_bomb(tmp_path / name)
    handed_out = []

    with pytest.raises(UserError, match="download.max_compression_ratio") as caught:
        for member in fetch.members(bomb, "bomb", params.download):  # the defaults in params.yaml
            handed_out.append(member.name)

    assert handed_out == []  # refused on its header, before a byte of it was inflated
    assert str(caught.value).startswith(f"{bomb}: members over 200 times its ")


@pytest.mark.parametrize("maker,name", [(make_zip, "big.zip"), (make_tar, "big.tar.gz")])
def test_archive_over_max_extracted_bytes_is_refused(tmp_path, maker, name):
    archive = maker(tmp_path / name, {"cls/a.bin": bytes(600), "cls/b.bin": bytes(600)})

    with pytest.raises(UserError) as caught:
        read_members(archive, bounds=limits(max_extracted_bytes=1000))

    assert str(caught.value) == (
        f"{archive}: members over 1,000 bytes (download.max_extracted_bytes): refused as a possible archive bomb"
    )


@pytest.mark.parametrize("maker,name", [(make_zip, "many.zip"), (make_tar, "many.tar.gz")])
def test_archive_over_max_members_is_refused_counting_those_outside_only(tmp_path, maker, name):
    archive = maker(tmp_path / name, ORIGIN_LIKE)  # 4 entries, 2 of them under repo-abc/train

    with pytest.raises(UserError, match=f"^{re.escape(str(archive))}: over 3 entries \\(download.max_members\\)"):
        read_members(archive, "repo-abc/train", limits(max_members=3))
    assert len(read_members(archive, "repo-abc/train", limits(max_members=4))) == 2


@pytest.mark.parametrize("maker,name", [(make_zip, "fine.zip"), (make_tar, "fine.tar.gz")])
def test_ordinary_archive_passes_the_default_limits(tmp_path, params, maker, name):
    tree = {**TREE, "bundle/blank.bin": bytes(1 << 20)}  # ~1000x: the ratio only counts past 100 MB
    archive = maker(tmp_path / name, tree)
    assert read_members(archive, bounds=params.download) == tree
