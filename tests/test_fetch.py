"""pipeline.fetch against a real HTTP server on 127.0.0.1: resume, retry, checksums, safe extraction."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import struct
import tarfile
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import fetch
from pipeline.errors import UserError
from pipeline.fetch import DownloadError

# 300 kB of incompressible, deterministic bytes: big enough that a half-written response is
# clearly partial, small enough to be instant.
PAYLOAD = hashlib.shake_256(b"image-pipeline test payload").digest(300_000)
HALF = len(PAYLOAD) // 2
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


# --------------------------------------------------------------------------------------------
# A small, controllable file server
# --------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)  # path -> error status answered instead
    cut_short: int = 0  # how many of the next full-body responses are cut in half
    honour_range: bool = True
    requests: list[dict[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: ServerState  # set per server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        state = self.server.state  # type: ignore[attr-defined]
        with state.lock:
            state.requests.append({"path": self.path, "range": self.headers.get("Range")})
            cut = state.cut_short > 0
            if cut:
                state.cut_short -= 1
        if self.path in state.status:
            self.send_error(state.status[self.path])
            return
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        total = len(data)
        start = 0
        requested = self.headers.get("Range")
        if requested and state.honour_range:
            assert requested.startswith("bytes=") and requested.endswith("-"), requested
            start = int(requested[len("bytes="):-1])
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))  # always the full length promised
        self.end_headers()
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@dataclass
class Server:
    state: ServerState
    base: str

    def url(self, path: str) -> str:
        return self.base + path

    def serve(self, path: str, data: bytes) -> str:
        self.state.files[path] = data
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
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record the retry back-off instead of waiting it out."""
    waited: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waited.append)
    return waited


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------------------------
# download()
# --------------------------------------------------------------------------------------------


def test_full_download(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "sub" / "data.bin"  # parent is created

    sha = fetch.download(url, dest)

    assert dest.read_bytes() == PAYLOAD
    assert sha == SHA256
    assert not part_of(dest).exists()
    assert [r["range"] for r in server.state.requests] == [None]
    assert sleeps == []


def test_download_with_pinned_sha256_forms(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    assert fetch.download(url, tmp_path / "a.bin", SHA256.upper()) == SHA256
    assert fetch.download(url, tmp_path / "b.bin", f"sha256:{SHA256}") == SHA256
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == PAYLOAD


def test_cut_short_response_is_resumed_with_range(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.cut_short = 1
    dest = tmp_path / "data.bin"

    sha = fetch.download(url, dest, SHA256, retries=2)

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

    assert fetch.download(url, dest, SHA256, retries=2) == SHA256

    quarter = HALF + (len(PAYLOAD) - HALF) // 2
    assert [r["range"] for r in server.state.requests] == [None, f"bytes={HALF}-", f"bytes={quarter}-"]
    assert dest.read_bytes() == PAYLOAD
    assert sleeps == [1, 2]


def test_failed_run_leaves_the_part_file_for_the_next_run(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.cut_short = 1
    dest = tmp_path / "data.bin"

    with pytest.raises(DownloadError, match="failed after 1 attempts"):
        fetch.download(url, dest, SHA256, retries=0)
    assert not dest.exists()
    assert part_of(dest).read_bytes() == PAYLOAD[:HALF]

    assert fetch.download(url, dest, SHA256, retries=0) == SHA256  # a later run picks it up
    assert [r["range"] for r in server.state.requests] == [None, f"bytes={HALF}-"]
    assert dest.read_bytes() == PAYLOAD
    assert not part_of(dest).exists()


def test_partial_file_from_an_earlier_run_is_continued(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD[:HALF])

    sha = fetch.download(url, dest, SHA256)

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

    assert fetch.download(url, dest, SHA256) == SHA256

    assert [r["range"] for r in server.state.requests] == [f"bytes={len(PAYLOAD)}-"]
    assert dest.read_bytes() == PAYLOAD
    assert not part_of(dest).exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    server.state.honour_range = False
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(b"stale bytes that must not stay in front")

    assert fetch.download(url, dest, SHA256) == SHA256
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_everything(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    wrong = "0" * 64

    with pytest.raises(DownloadError) as caught:
        fetch.download(url, dest, wrong)

    message = str(caught.value)
    assert "sha256" in message and f"expected {wrong}" in message and SHA256 in message
    assert url in message
    assert not dest.exists()
    assert not part_of(dest).exists()
    assert isinstance(caught.value, UserError)


def test_md5_checksum_accepted_and_verified(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)

    sha = fetch.download(url, tmp_path / "ok.bin", f"md5:{MD5}")
    assert sha == SHA256  # the return value is always the sha256
    assert (tmp_path / "ok.bin").read_bytes() == PAYLOAD

    wrong_md5 = "f" * 32
    with pytest.raises(DownloadError, match=f"md5 is {MD5}, expected {wrong_md5}"):
        fetch.download(url, tmp_path / "bad.bin", f"md5:{wrong_md5}")
    assert not (tmp_path / "bad.bin").exists()
    assert not part_of(tmp_path / "bad.bin").exists()


def test_http_404_fails_at_once(server, tmp_path, sleeps):
    dest = tmp_path / "missing.bin"

    with pytest.raises(DownloadError, match="404"):
        fetch.download(server.url("/missing.bin"), dest, retries=3)

    assert len(server.state.requests) == 1
    assert sleeps == []
    assert not dest.exists()


def test_server_errors_are_retried_then_reported(server, tmp_path, sleeps):
    url = server.serve("/flaky.bin", PAYLOAD)
    server.state.status["/flaky.bin"] = 503

    with pytest.raises(DownloadError, match="failed after 3 attempts"):
        fetch.download(url, tmp_path / "flaky.bin", retries=2)

    assert len(server.state.requests) == 3
    assert sleeps == [1, 2]  # exponential back-off between attempts
    assert not (tmp_path / "flaky.bin").exists()


def test_unreachable_server_is_a_download_error(tmp_path, sleeps):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        fetch.download(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", retries=1, timeout=5)
    assert sleeps == [1]


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
# extract()
# --------------------------------------------------------------------------------------------

TREE = {
    "bundle/cats/a.txt": b"cat a",
    "bundle/cats/b.txt": b"cat b",
    "bundle/dogs/c.txt": b"dog c" * 100,
    "bundle/README": b"readme",
}


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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


def test_extract_zip_round_trip(tmp_path):
    archive = make_zip(tmp_path / "bundle.zip", TREE)
    out = tmp_path / "out"
    fetch.extract(archive, out)
    assert tree_of(out) == TREE


@pytest.mark.parametrize("mode,suffix", [("w:gz", ".tar.gz"), ("w", ".tar")])
def test_extract_tar_round_trip(tmp_path, mode, suffix):
    archive = make_tar(tmp_path / f"bundle{suffix}", TREE, mode)
    out = tmp_path / "out"
    fetch.extract(archive, out)
    assert tree_of(out) == TREE


def test_extract_detects_the_format_by_content_not_name(tmp_path):
    archive = make_tar(tmp_path / "misnamed.zip", TREE, "w:gz")
    fetch.extract(archive, tmp_path / "out")
    assert tree_of(tmp_path / "out") == TREE


def test_uncompressed_tar_ending_in_a_zip_member_is_unpacked_as_a_tar(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as bundle:
        bundle.writestr("inner.txt", b"inside the zip")
    members = {"cls/a.txt": b"a", "cls/extras.zip": inner.getvalue()}
    archive = make_tar(tmp_path / "data.tar", members, mode="w")
    assert tarfile.is_tarfile(archive)

    fetch.extract(archive, tmp_path / "out")

    assert tree_of(tmp_path / "out") == members


@pytest.mark.parametrize("evil", ["../evil.txt", "inner/../../evil.txt"])
def test_zip_member_escaping_the_target_is_refused(tmp_path, evil):
    archive = make_zip(tmp_path / "evil.zip", {"good/ok.txt": b"fine", evil: b"pwned"})
    parent = tmp_path / "parent"
    out = parent / "out"
    out.mkdir(parents=True)

    with pytest.raises(UserError, match="outside the target") as caught:
        fetch.extract(archive, out)

    assert repr(evil) in str(caught.value)
    assert not (parent / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert list(out.iterdir()) == []  # refused before anything was written, good members included


def test_zip_member_with_absolute_path_is_refused(tmp_path):
    target = tmp_path / "abs_target.txt"
    archive = make_zip(tmp_path / "abs.zip", {str(target): b"pwned"})
    out = tmp_path / "out"
    with pytest.raises(UserError, match="outside the target"):
        fetch.extract(archive, out)
    assert not target.exists()


def test_tar_member_escaping_the_target_is_refused(tmp_path):
    archive = make_tar(tmp_path / "evil.tar.gz", {"../evil.txt": b"pwned"})
    parent = tmp_path / "parent"
    out = parent / "out"
    out.mkdir(parents=True)
    with pytest.raises(UserError):
        fetch.extract(archive, out)
    assert not (parent / "evil.txt").exists()


def test_non_archive_is_a_user_error(tmp_path):
    plain = tmp_path / "notes.zip"
    plain.write_text("just some text, not an archive\n" * 20)
    with pytest.raises(UserError, match="not a zip or tar archive"):
        fetch.extract(plain, tmp_path / "out")


def test_zip_with_corrupt_member_header_is_a_user_error(tmp_path):
    archive = make_zip(tmp_path / "whole.zip", TREE)
    data = archive.read_bytes()
    # the central directory is intact (still a zip), the first member's local header name is not
    broken = tmp_path / "broken.zip"
    broken.write_bytes(data[:40] + bytes(b ^ 0xFF for b in data[40:47]) + data[47:])
    with pytest.raises(UserError, match="broken archive"):
        fetch.extract(broken, tmp_path / "out")


def test_truncated_tar_gz_is_a_user_error(tmp_path):
    big = {"bundle/cls/big.bin": PAYLOAD}  # incompressible: the cut lands inside member data
    data = make_tar(tmp_path / "whole.tar.gz", big).read_bytes()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="broken archive"):
        fetch.extract(broken, tmp_path / "out")


def test_zip_with_corrupt_deflate_data_is_a_user_error(tmp_path):
    archive = make_zip(tmp_path / "bad.zip", {"cls/a.txt": b"hello " * 1000})
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as bundle:
        offset = bundle.infolist()[0].header_offset
    name_len, extra_len = struct.unpack("<HH", raw[offset + 26 : offset + 30])
    # first byte of the deflate stream -> BFINAL=1, BTYPE=11 (reserved): always invalid
    raw[offset + 30 + name_len + extra_len] = 0xFF
    archive.write_bytes(bytes(raw))
    assert zipfile.is_zipfile(archive)

    with pytest.raises(UserError, match="broken archive"):
        fetch.extract(archive, tmp_path / "out")


def test_tar_gz_with_corrupt_deflate_data_is_a_user_error(tmp_path):
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as bundle:
        for name, data in (("cls/a.txt", b"a" * 600), ("cls/b.txt", b"b" * 200_000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    # a gzip stream whose first 64 KiB inflate fine, followed by an invalid deflate block
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(plain.getvalue()[:65536]) + deflate.flush(zlib.Z_FULL_FLUSH) + b"\xff" * 64
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 4 + b"\x00\xff" + body)

    with pytest.raises(UserError, match="broken archive"):
        fetch.extract(archive, tmp_path / "out")


def test_file_digest_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD * 5)  # > 1 MiB: several read blocks
    assert fetch.file_digest(path) == hashlib.sha256(PAYLOAD * 5).hexdigest()
    assert fetch.file_digest(path, "md5") == hashlib.md5(PAYLOAD * 5).hexdigest()
    assert os.path.getsize(path) > 1 << 20
