"""The download stage's pure parts: materialise() for every source kind, inventory(), resolve_weights()."""
from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import fetch
from pipeline.errors import UserError
from pipeline.fetch import DownloadError
from pipeline.params import DatasetSpec, TransferParams, load_params
from pipeline.stages.download import KERAS_NOTOP_WEIGHTS, copy_classes, inventory, materialise, resolve_weights

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("paper", "rock", "scissors")
PER_CLASS = 4


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


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    path = tmp_path / "raw"
    path.mkdir()
    return path


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

    def do_GET(self) -> None:  # noqa: N802
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
    served = materialise(DatasetSpec(source=str(source)), dest, scratch, root)

    assert served == {"served_by": "origin", "location": str(source), "ignored": IGNORED}
    assert sorted(p.name for p in dest.iterdir()) == list(CLASSES)
    assert tree_of(dest) == images  # byte-identical copies, LICENSE and .cache left out
    assert not (dest / "LICENSE").exists()


def test_local_directory_relative_to_root(photos, dest, scratch, root):
    source, images = photos
    source.rename(root / "photos")
    served = materialise(DatasetSpec(source="photos"), dest, scratch, root)
    assert served["location"] == "photos"
    assert tree_of(dest) == images


def test_local_zip_with_subdir(photos, tmp_path, dest, scratch, root):
    source, images = photos
    archive = zip_tree(source, tmp_path / "rps.zip", prefix="rps-abc123/data/")
    spec = DatasetSpec(source=str(archive), subdir="rps-abc123/data")

    served = materialise(spec, dest, scratch, root)

    assert served == {
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
    served = materialise(DatasetSpec(source=str(archive)), dest, scratch, root)
    assert [p.name for p in dest.iterdir()] == ["wrapper"]
    assert served["ignored"] == []


def test_local_zip_with_missing_subdir(photos, tmp_path, dest, scratch, root):
    source, _ = photos
    archive = zip_tree(source, tmp_path / "rps.zip", prefix="top/")
    with pytest.raises(UserError, match="has no folder 'nope/data'"):
        materialise(DatasetSpec(source=str(archive), subdir="nope/data"), dest, scratch, root)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("form", ["plain", "sha256:", "md5:"])
def test_local_tar_gz_with_correct_checksum(photos, tmp_path, dest, scratch, root, form):
    source, images = photos
    archive = tar_tree(source, tmp_path / "rps.tar.gz")
    checksum = {
        "plain": sha256_of(archive),
        "sha256:": "sha256:" + sha256_of(archive),
        "md5:": "md5:" + hashlib.md5(archive.read_bytes()).hexdigest(),
    }[form]

    served = materialise(DatasetSpec(source=str(archive), checksum=checksum), dest, scratch, root)

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
        materialise(DatasetSpec(source=str(archive), checksum=wrong), dest, scratch, root)

    message = str(caught.value)
    assert str(archive) in message
    assert f"sha256 is {sha256_of(archive)}, expected {wrong}" in message
    assert list(dest.iterdir()) == []  # nothing copied from an archive that failed its check
    assert archive.exists()  # a local source is never deleted


def test_local_file_that_is_not_an_archive(tmp_path, dest, scratch, root):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UserError, match="neither a class-per-folder directory nor"):
        materialise(DatasetSpec(source=str(notes)), dest, scratch, root)


def test_missing_local_source_names_the_path(dest, scratch, root):
    with pytest.raises(UserError) as caught:
        materialise(DatasetSpec(source="datasets/absent"), dest, scratch, root)
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
        materialise(DatasetSpec(source=str(flat)), dest, scratch, root)
    assert list(dest.iterdir()) == []


def test_copy_classes_reports_what_it_left_out(photos, dest):
    source, images = photos
    assert copy_classes(source, dest) == IGNORED
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

    served = materialise(spec, dest, scratch, root)

    assert served == {
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
    served = materialise(spec, dest, scratch, root)
    assert served["archive_sha256"] == sha256_of(archive)
    assert tree_of(dest) == images


def test_remote_archive_with_wrong_checksum(photos, http_dir, dest, scratch, root):
    source, _ = photos
    served_dir, base, _ = http_dir
    archive = zip_tree(source, served_dir / "rps.zip")
    wrong = "md5:" + "0" * 32
    with pytest.raises(DownloadError, match=f"md5 is {hashlib.md5(archive.read_bytes()).hexdigest()}"):
        materialise(DatasetSpec(source=f"{base}/rps.zip", checksum=wrong), dest, scratch, root)
    assert list(scratch.iterdir()) == []  # neither the archive nor its .part is kept
    assert list(dest.iterdir()) == []


def test_remote_404_is_a_download_error(http_dir, dest, scratch, root, no_sleep):
    _, base, requests = http_dir
    with pytest.raises(DownloadError, match="404"):
        materialise(DatasetSpec(source=f"{base}/gone.zip"), dest, scratch, root)
    assert requests == ["/gone.zip"]
    assert no_sleep == []


def test_existing_mirror_wins_over_unreachable_origin(photos, dest, scratch, root, no_sleep):
    source, images = photos
    url = f"http://127.0.0.1:{closed_port()}/x.zip"
    spec = DatasetSpec(source=url, mirrors=[str(source)])

    served = materialise(spec, dest, scratch, root)

    assert served == {"served_by": "mirror", "location": str(source), "ignored": IGNORED}
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

    served = materialise(spec, dest, scratch, root)

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

    served = materialise(spec, dest, scratch, root)

    assert served["served_by"] == "mirror"
    assert served["location"] == str(root / "../shared/datasets/rps")
    assert Path(served["location"]).resolve() == (shared / "rps").resolve()
    assert tree_of(dest) == images


def test_relative_mirror_missing_under_root_falls_through(photos, dest, scratch, root):
    """A mirror present relative to the cwd but not to root is not used: the origin is."""
    source, images = photos
    (Path.cwd() / "mirror").symlink_to(source)
    spec = DatasetSpec(source=str(source), mirrors=["mirror"])
    served = materialise(spec, dest, scratch, root)
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
    served = materialise(spec, dest, scratch, root)
    assert served == {
        "served_by": "mirror",
        "location": str(archive),
        "archive_sha256": sha256_of(archive),
        "ignored": IGNORED,
    }
    assert tree_of(dest) == images


# --------------------------------------------------------------------------------------------
# materialise(): built-in sources
# --------------------------------------------------------------------------------------------


def test_sklearn_digits(dest, scratch, root):
    served = materialise(DatasetSpec(source="sklearn:digits"), dest, scratch, root)

    assert served == {"served_by": "origin", "location": "sklearn:digits", "ignored": []}
    assert sorted(p.name for p in dest.iterdir()) == [str(d) for d in range(10)]
    files = sorted(dest.rglob("*.png"))
    assert len(files) == 1797
    assert len([p for p in dest.rglob("*") if p.is_file()]) == 1797
    counts = {p.name: len(list(p.iterdir())) for p in dest.iterdir()}
    assert all(170 <= n <= 185 for n in counts.values()), counts
    for path in files[::150]:
        with Image.open(path) as image:
            assert image.size == (8, 8)
            assert image.mode == "L"
            assert image.format == "PNG"
    # the ink (0..16) is scaled to the full 0..255 range
    from sklearn.datasets import load_digits

    digits = load_digits()
    first = np.asarray(Image.open(dest / str(digits.target[0]) / "0000.png"))
    assert np.array_equal(first, np.rint(digits.images[0] * 255 / 16).astype(np.uint8))
    assert first.max() > 200


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None, reason="tensorflow_datasets is installed"
)
def test_tfds_without_tensorflow_datasets(dest, scratch, root):
    with pytest.raises(UserError) as caught:
        materialise(DatasetSpec(source="tfds:cats_vs_dogs"), dest, scratch, root)
    message = str(caught.value)
    assert ".[tfds]" in message
    assert "tfds:cats_vs_dogs" in message
    assert list(dest.iterdir()) == []


# --------------------------------------------------------------------------------------------
# inventory()
# --------------------------------------------------------------------------------------------


def test_inventory(photos, dest, scratch, root):
    source, images = photos
    materialise(DatasetSpec(source=str(source)), dest, scratch, root)

    listing = inventory(dest)

    assert listing["classes"] == {label: PER_CLASS for label in CLASSES}
    assert list(listing["classes"]) == sorted(CLASSES)
    assert [f["path"] for f in listing["files"]] == sorted(images)
    for entry in listing["files"]:
        data = images[entry["path"]]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)


def test_inventory_nested_and_uneven(tmp_path):
    raw = tmp_path / "raw"
    (raw / "a" / "sub").mkdir(parents=True)
    (raw / "b").mkdir()
    (raw / "a" / "1.bin").write_bytes(b"one")
    (raw / "a" / "sub" / "2.bin").write_bytes(b"two")
    (raw / "b" / "3.bin").write_bytes(b"")
    listing = inventory(raw)
    assert listing["classes"] == {"a": 2, "b": 1}
    assert listing["files"] == [
        {"path": "a/1.bin", "bytes": 3, "sha256": hashlib.sha256(b"one").hexdigest()},
        {"path": "a/sub/2.bin", "bytes": 3, "sha256": hashlib.sha256(b"two").hexdigest()},
        {"path": "b/3.bin", "bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()},
    ]


# --------------------------------------------------------------------------------------------
# resolve_weights()
# --------------------------------------------------------------------------------------------


def transfer(**update) -> TransferParams:
    return load_params(REPO / "params.yaml").transfer.model_copy(update=update)


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
    assert "xception" in KERAS_NOTOP_WEIGHTS
    assert "vgg16" not in KERAS_NOTOP_WEIGHTS


def test_weights_none(weights_dir, scratch, root):
    record = resolve_weights(transfer(weights="none"), weights_dir, scratch, root)
    assert record == {"backbone": "xception", "weights": "none", "file": None, "served_by": "none"}
    assert list(weights_dir.iterdir()) == []
    assert list(scratch.iterdir()) == []


def test_weights_path_is_copied_with_its_name(tmp_path, weights_dir, scratch, root):
    given = tmp_path / "mine" / "model.best.weights.h5"
    given.parent.mkdir()
    given.write_bytes(b"weights!" * 100)

    record = resolve_weights(transfer(weights=str(given)), weights_dir, scratch, root)

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
    record = resolve_weights(transfer(weights="w/backbone.h5"), weights_dir, scratch, root)
    assert record["served_by"] == "path"
    assert record["location"] == str(root / "w" / "backbone.h5")
    assert (weights_dir / "backbone.h5").read_bytes() == b"abc"


def test_imagenet_weights_from_mirror(fake_weights, tmp_path, weights_dir, scratch, root, no_sleep):
    params = transfer(weights="imagenet", weights_mirrors={"xception": [str(tmp_path / "absent.h5"), str(fake_weights)]})

    record = resolve_weights(params, weights_dir, scratch, root)

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


def test_imagenet_weights_relative_mirror(fake_weights, weights_dir, scratch, root):
    fake_weights.rename(root / fake_weights.name)
    params = transfer(weights="imagenet", weights_mirrors={"xception": [fake_weights.name]})
    record = resolve_weights(params, weights_dir, scratch, root)
    assert record["served_by"] == "mirror"
    assert record["location"] == str(root / fake_weights.name)


def test_imagenet_weights_mirror_that_is_a_directory_is_skipped(tmp_path, fake_weights, weights_dir, scratch, root):
    folder = tmp_path / "a-folder.h5"
    folder.mkdir()
    params = transfer(weights="imagenet", weights_mirrors={"xception": [str(folder), str(fake_weights)]})
    assert resolve_weights(params, weights_dir, scratch, root)["location"] == str(fake_weights)


def test_imagenet_weights_unknown_backbone(fake_weights, weights_dir, scratch, root):
    # a mirror for another backbone does not count
    params = transfer(backbone="vgg16", weights="imagenet", weights_mirrors={"xception": [str(fake_weights)]})
    with pytest.raises(UserError) as caught:
        resolve_weights(params, weights_dir, scratch, root)
    message = str(caught.value)
    assert "'vgg16'" in message
    assert "transfer.weights_mirrors.vgg16" in message
    assert list(weights_dir.iterdir()) == []


def test_missing_weights_path(tmp_path, weights_dir, scratch, root):
    missing = tmp_path / "nowhere.weights.h5"
    with pytest.raises(UserError) as caught:
        resolve_weights(transfer(weights=str(missing)), weights_dir, scratch, root)
    assert str(missing) in str(caught.value)
    assert "is not a file" in str(caught.value)
    assert list(weights_dir.iterdir()) == []


def test_weights_path_that_is_a_directory(tmp_path, weights_dir, scratch, root):
    with pytest.raises(UserError, match="is not a file"):
        resolve_weights(transfer(weights=str(tmp_path)), weights_dir, scratch, root)
