"""download stage: the chosen dataset -> data/raw/<class>/<file>, the backbone weights -> data/weights/.

Mirrors (local paths) are tried before the origin, so the stage runs offline where they exist.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import cli, device, fetch, fsio, paths, tracking
from pipeline.errors import UserError
from pipeline.params import DatasetSpec, TransferParams, load_params

log = logging.getLogger("download")

# Keras' own download locations for ImageNet weights without the classifier top.
KERAS_NOTOP_WEIGHTS = {
    "xception": (
        "https://storage.googleapis.com/tensorflow/keras-applications/xception/"
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5:b0042744bf5b25fce3cb969f33bebb97",
    ),
}


def copy_classes(source: Path, dest: Path) -> list[dict[str, str]]:
    """Copy every class folder of `source` into `dest`; return the top-level entries left out, with why."""
    entries = sorted(source.iterdir())
    classes = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        raise UserError(f"{source} holds no class folders (expected {source}/<class>/<image files>)")
    for folder in tqdm(classes, desc="copy classes", unit="class", leave=False):
        shutil.copytree(folder, dest / folder.name)
    return [
        {"path": e.name, "reason": "not a class folder (top-level file or hidden folder)"}
        for e in entries
        if e not in classes
    ]


def _from_archive(archive: Path, spec: DatasetSpec, dest: Path, scratch: Path) -> list[dict[str, str]]:
    with tempfile.TemporaryDirectory(dir=scratch) as unpacked:
        fetch.extract(archive, Path(unpacked))
        root = Path(unpacked) / (spec.subdir or "")
        if not root.is_dir():
            raise UserError(f"{archive} has no folder {spec.subdir!r} (data.datasets.*.subdir)")
        return copy_classes(root, dest)


def _from_digits(dest: Path) -> None:
    """scikit-learn's 8x8 digits (0..16 ink) as grayscale PNGs, one folder per digit."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = dest / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.rint(pixels * 255 / 16).astype(np.uint8), "L").save(folder / f"{index:04d}.png")


def _from_tfds(name: str, dest: Path, scratch: Path) -> None:
    """A TensorFlow Datasets dataset, every split, written back as its original encoded files."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserError(
            f"source tfds:{name} needs tensorflow-datasets: pip install -e '.[tfds]', or give a local mirror"
        ) from None
    builder = tfds.builder(name, data_dir=str(scratch / "tfds"))
    builder.download_and_prepare()
    image_key, label_key = builder.info.supervised_keys
    names = builder.info.features[label_key].names
    suffix = "." + (builder.info.features[image_key].encoding_format or "jpeg")
    dataset = builder.as_dataset(
        split="+".join(builder.info.splits), decoders={image_key: tfds.decode.SkipDecoding()}
    )
    for index, example in enumerate(tqdm(tfds.as_numpy(dataset), desc=f"tfds:{name}", unit="img")):
        folder = dest / names[int(example[label_key])]
        folder.mkdir(exist_ok=True)
        (folder / f"{index:06d}{suffix}").write_bytes(example[image_key])


def _from_local(path: Path, spec: DatasetSpec, dest: Path, scratch: Path) -> dict[str, Any]:
    if path.is_dir():
        return {"ignored": copy_classes(path, dest)}
    if not fetch.is_archive(path):
        raise UserError(f"{path} is neither a class-per-folder directory nor a .zip/.tar/.tar.gz archive")
    archive_sha256 = fetch.verify(path, spec.checksum, str(path))
    return {"archive_sha256": archive_sha256, "ignored": _from_archive(path, spec, dest, scratch)}


def materialise(spec: DatasetSpec, dest: Path, scratch: Path, root: Path) -> dict[str, Any]:
    """Fill `dest` with class folders from the first mirror that exists, else from the source."""
    scratch.mkdir(parents=True, exist_ok=True)
    for mirror in spec.mirrors:
        local = paths.resolve_local(mirror, root)
        if local.exists():
            log.info("using mirror %s", local)
            served = {"served_by": "mirror", "location": str(local)}
            return served | _from_local(local, spec, dest, scratch)
        log.info("mirror %s not found", local)
    source = spec.source
    served = {"served_by": "origin", "location": source}
    if source == "sklearn:digits":
        _from_digits(dest)
        return served | {"ignored": []}
    if source.startswith("tfds:"):
        _from_tfds(source.removeprefix("tfds:"), dest, scratch)
        return served | {"ignored": []}
    if source.startswith(("http://", "https://")):
        archive = scratch / source.rstrip("/").rsplit("/", 1)[-1]
        archive_sha256 = fetch.download(source, archive, spec.checksum)
        if not spec.checksum:
            log.warning("no checksum pinned for %s; pin the one seen now: checksum: %s", source, archive_sha256)
        return served | {"archive_sha256": archive_sha256, "ignored": _from_archive(archive, spec, dest, scratch)}
    local = paths.resolve_local(source, root)
    if not local.exists():
        raise UserError(f"data source {source!r} not found (looked at {local}) and no mirror exists")
    return served | _from_local(local, spec, dest, scratch)


def inventory(raw: Path) -> dict[str, Any]:
    """Every file under `raw` with its size and sha256, and the count per class."""
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    listed = [
        {"path": p.relative_to(raw).as_posix(), "bytes": p.stat().st_size, "sha256": fetch.file_digest(p)}
        for p in tqdm(files, desc="checksums", unit="file", leave=False)
    ]
    classes: dict[str, int] = {}
    for entry in listed:
        label = entry["path"].split("/", 1)[0]
        classes[label] = classes.get(label, 0) + 1
    return {"classes": dict(sorted(classes.items())), "files": listed}


def resolve_weights(transfer: TransferParams, dest: Path, scratch: Path, root: Path) -> dict[str, Any]:
    """Put the backbone's weights file (if any) in `dest`; return what weights.json records."""
    record: dict[str, Any] = {"backbone": transfer.backbone, "weights": transfer.weights, "file": None}
    if transfer.weights == "none":
        return record | {"served_by": "none"}
    if transfer.weights == "imagenet":
        mirrors = [paths.resolve_local(m, root) for m in transfer.weights_mirrors.get(transfer.backbone, [])]
        found = [mirror for mirror in mirrors if mirror.is_file()]
        if found:
            source, served = found[0], "mirror"
        elif transfer.backbone in KERAS_NOTOP_WEIGHTS:
            url, checksum = KERAS_NOTOP_WEIGHTS[transfer.backbone]
            source, served = scratch / url.rsplit("/", 1)[-1], "origin"
            fetch.download(url, source, checksum)
        else:
            raise UserError(
                f"no ImageNet weights known for transfer.backbone={transfer.backbone!r}: add a file under "
                f"transfer.weights_mirrors.{transfer.backbone}, or set transfer.weights to a weights file path"
            )
    else:
        source, served = paths.resolve_local(transfer.weights, root), "path"
        if not source.is_file():
            raise UserError(f"transfer.weights: {source} is not a file (use imagenet, none or a weights file path)")
    shutil.copyfile(source, dest / source.name)  # keeps the suffix: Keras picks the h5 format by it
    return record | {
        "file": source.name,
        "sha256": fetch.file_digest(dest / source.name),
        "bytes": source.stat().st_size,
        "served_by": served,
        "location": str(source) if served != "origin" else KERAS_NOTOP_WEIGHTS[transfer.backbone][0],
    }


def main() -> None:
    params = load_params()
    root = paths.workspace_root()
    with tracking.stage_run("download", params, device.cpu_only()) as run:
        spec = params.data.spec
        with fsio.atomic_dir(paths.RAW) as raw:
            served = materialise(spec, raw, paths.DOWNLOADS, root)
            listing = inventory(raw)
        manifest = {"dataset": params.data.dataset, "source": spec.source, **served, **listing}
        fsio.write_json(paths.RAW_MANIFEST, manifest)
        with fsio.atomic_dir(paths.WEIGHTS) as weights_dir:
            weights = resolve_weights(params.transfer, weights_dir, paths.DOWNLOADS, root)
            fsio.write_json(weights_dir / "weights.json", weights)

        run.images = len(listing["files"])
        run.set_tags({"data.served_by": served["served_by"], "weights.served_by": weights["served_by"]})
        run.log_metrics({
            "files": len(listing["files"]),
            "classes": len(listing["classes"]),
            "bytes": sum(f["bytes"] for f in listing["files"]),
            "ignored": len(served["ignored"]),
        })
        run.log_artifact(paths.RAW_MANIFEST)
        log.info("%d files in %d classes from %s", len(listing["files"]), len(listing["classes"]), served["location"])


if __name__ == "__main__":
    cli.run(main)
