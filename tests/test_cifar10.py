"""The `cifar10` dataset entry end to end on a slice of the real mirror archive (../shared/datasets).

The slice keeps the mirror's layout (cifar10_train/<class>/NNNN.jpg) and is pointed at by a copy of
params.yaml's cifar10 spec, with the slice's own sha256: download's materialise() (the members read in
place into raw.tar) and preprocess's prepare() (decoding them from raw.tar) must give every class with every
image, and broken or hollow archives must fail loudly.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import fetch, fsio
from pipeline.errors import UserError
from pipeline.fetch import DownloadError
from pipeline.params import DatasetSpec
from pipeline.stages.download import EMPTY_CLASS, materialise

from .conftest import DOWNLOAD_LIMITS, SHARED

ARCHIVE = SHARED / "datasets" / "cifar10_train.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 30  # 300 images: enough for a stratified 70/15/15 split of every class, fast to decode

pytestmark = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} is not present")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def members() -> dict[str, bytes]:
    """The first PER_CLASS images of each class of the real archive: member name -> bytes."""
    taken: dict[str, bytes] = {}
    counts = dict.fromkeys(CLASSES, 0)
    with tarfile.open(ARCHIVE) as bundle:
        for member in bundle:  # streamed: the archive is read once, nothing unpacked
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and counts.get(parts[1], PER_CLASS) < PER_CLASS:
                counts[parts[1]] += 1
                taken[member.name] = bundle.extractfile(member).read()
    assert counts == dict.fromkeys(CLASSES, PER_CLASS), counts
    return taken


def write_tar_gz(path: Path, files: dict[str, bytes], folders: tuple[str, ...] = ()) -> Path:
    with tarfile.open(path, "w:gz") as bundle:
        for name in ("cifar10_train", *folders):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            bundle.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            bundle.addfile(info, io.BytesIO(data))
    return path


def spec_for(params, archive: Path, checksum: str | None = None) -> DatasetSpec:
    """params.yaml's cifar10 spec, its mirror pointed at `archive` (checksum: the archive's own by default)."""
    real = params.data.datasets["cifar10"]
    [mirror] = real.model_dump(mode="json")["mirrors"]
    mirror |= {"path": str(archive), "checksum": checksum or sha256_of(archive)}
    return DatasetSpec.model_validate(real.model_dump(mode="json") | {"mirrors": [mirror]})


@pytest.fixture
def dirs(tmp_path, monkeypatch) -> tuple[Path, Path, Path]:
    """(dest: the tar to write, scratch, root); the working directory is the root, as when DVC runs the stage."""
    dest, scratch, root = tmp_path / "raw.tar", tmp_path / "downloads", tmp_path / "project"
    for path in (scratch, root):
        path.mkdir()
    monkeypatch.chdir(root)
    return dest, scratch, root


def download(spec: DatasetSpec, dest: Path, scratch: Path, root: Path) -> dict:
    """materialise() and the listing beside the tar, as the download stage leaves them for preprocess."""
    listing = materialise(spec, dest, scratch, root, DOWNLOAD_LIMITS)
    fsio.write_json(dest.with_suffix(".json"), listing)
    return listing


def tree_of(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as bundle:
        return {member.name: bundle.extractfile(member).read() for member in bundle}


def test_params_cifar10_mirror_matches_the_shared_archive(params):
    """The pinned mirror checksum is the real file's: the stage would refuse it otherwise."""
    spec = params.data.datasets["cifar10"]
    checksum, subdir = spec.archive_settings(spec.mirrors[0])
    assert fetch.verify(ARCHIVE, checksum, str(ARCHIVE)) == checksum
    assert subdir == "cifar10_train"


def test_slice_downloads_every_class_and_image(params, members, tmp_path, dirs):
    dest, scratch, root = dirs
    archive = write_tar_gz(tmp_path / "slice.tar.gz", members)

    listing = materialise(spec_for(params, archive), dest, scratch, root, DOWNLOAD_LIMITS)

    assert {k: v for k, v in listing.items() if k not in ("classes", "files")} == {
        "served_by": "mirror",
        "location": str(archive),
        "archive_sha256": sha256_of(archive),
        "ignored": [],
        "renamed": [],
    }
    expected = {name.removeprefix("cifar10_train/"): data for name, data in members.items()}
    assert tree_of(dest) == expected
    assert listing["classes"] == dict.fromkeys(CLASSES, PER_CLASS)
    data = dest.read_bytes()
    for entry in listing["files"]:
        assert data[entry["offset"] : entry["offset"] + entry["bytes"]] == expected[entry["path"]]
        assert entry["sha256"] == hashlib.sha256(expected[entry["path"]]).hexdigest()
    assert list(scratch.iterdir()) == []  # nothing unpacked, nothing left behind


def test_slice_preprocesses_to_every_class(params, members, tmp_path, dirs):
    from pipeline.stages.preprocess import prepare

    dest, scratch, root = dirs
    download(spec_for(params, write_tar_gz(tmp_path / "slice.tar.gz", members)), dest, scratch, root)
    out = tmp_path / "prepared"
    out.mkdir()
    settings = params.preprocess.model_copy(update={"image_size": 32, "workers": 1})

    metrics, quarantined = prepare(dest, out, settings, params.seed)

    assert quarantined == []
    assert metrics["images_in"] == metrics["images_out"] == len(CLASSES) * PER_CLASS
    assert metrics["classes"] == len(CLASSES)
    assert metrics["dropped_classes"] == metrics["dropped_images"] == 0
    split = metrics["split"]
    assert sum(s["images"] for s in split.values()) == len(CLASSES) * PER_CLASS
    assert split["train"]["images"] == pytest.approx(0.7 * len(CLASSES) * PER_CLASS, abs=len(CLASSES))


def test_truncated_archive_is_a_user_error_naming_the_file(params, members, tmp_path, dirs):
    dest, scratch, root = dirs
    whole = write_tar_gz(tmp_path / "whole.tar.gz", members)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])

    # pinned to the complete archive's checksum: refused before unpacking
    with pytest.raises(DownloadError) as caught:
        materialise(spec_for(params, truncated, checksum=sha256_of(whole)), dest, scratch, root, DOWNLOAD_LIMITS)
    assert f"{truncated}: sha256 is {sha256_of(truncated)}, expected {sha256_of(whole)}" in str(caught.value)

    # pinned to the truncated bytes themselves (a bad pin): reading the members finds the damage
    with pytest.raises(UserError) as caught:
        materialise(spec_for(params, truncated), dest, scratch, root, DOWNLOAD_LIMITS)
    assert f"{truncated}: broken archive" in str(caught.value)

    assert not dest.exists()
    assert list(scratch.iterdir()) == []


def test_empty_class_folder_is_reported_not_silently_lost(params, members, tmp_path, dirs):
    dest, scratch, root = dirs
    without_frogs = {name: data for name, data in members.items() if "/frog/" not in name}
    archive = write_tar_gz(tmp_path / "hollow.tar.gz", without_frogs, folders=("cifar10_train/frog",))

    listing = materialise(spec_for(params, archive), dest, scratch, root, DOWNLOAD_LIMITS)

    assert listing["ignored"] == [{"path": "frog", "reason": EMPTY_CLASS}]
    assert listing["classes"] == {c: PER_CLASS for c in CLASSES if c != "frog"}


def test_class_folder_without_images_is_dropped_on_the_record(params, members, tmp_path, dirs):
    """A class holding only non-images reaches preprocess, which quarantines the files and drops the class."""
    from pipeline.stages.preprocess import prepare

    dest, scratch, root = dirs
    files = {name: data for name, data in members.items() if "/frog/" not in name}
    files["cifar10_train/frog/README.txt"] = b"the frogs are elsewhere\n"
    download(spec_for(params, write_tar_gz(tmp_path / "notes.tar.gz", files)), dest, scratch, root)
    out = tmp_path / "prepared"
    out.mkdir()

    metrics, quarantined = prepare(
        dest, out, params.preprocess.model_copy(update={"image_size": 32, "workers": 1}), params.seed
    )

    assert [q["path"] for q in quarantined] == ["frog/README.txt"]
    assert metrics["dropped_classes"] == 1
    assert metrics["classes"] == len(CLASSES) - 1
    assert metrics["images_out"] == (len(CLASSES) - 1) * PER_CLASS


def test_slice_images_decode_as_32px(members):
    from PIL import Image

    data = next(iter(members.values()))
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (32, 32)
        assert np.asarray(image.convert("RGB")).shape == (32, 32, 3)
