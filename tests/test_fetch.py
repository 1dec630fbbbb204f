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
    assert fetch.file_digest(path) == hashlib.sha256(PAYLOAD * 5).hexdigest()
    assert fetch.file_digest(path, "md5") == hashlib.md5(PAYLOAD * 5).hexdigest()
    assert os.path.getsize(path) > 1 << 20


# --------------------------------------------------------------------------------------------
# members(): the archive read in place, refusing escapes, links and devices
# --------------------------------------------------------------------------------------------


def read_members(archive: Path, only: str | None = None) -> dict[str, bytes | None]:
    """name -> bytes (None for a folder), each file read while it is the current member."""
    return {m.name: (m.stream.read() if m.stream else None) for m in fetch.members(archive, only)}


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
