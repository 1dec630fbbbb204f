"""What noticing a changed local dataset costs a `dvc repro` that has nothing to do.

For a copy of the rps mirror (1,307 photos) and the CIFAR-10 training set unpacked into a folder (50,000 photos): a
project of this repo's pipeline whose dataset is that folder runs `dvc repro download` once (the source stage
hashes every file, download packs the tar), then again with nothing changed, timed: the source stage stats each
file, writes the same fingerprint, and DVC skips download; the source stage's own process is timed apart. Then
one photo is added: download runs again.

    python -m bench.source_check [--repeats 3]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import common

CIFAR10 = common.SHARED / "datasets" / "cifar10_train.tar.gz"


def project(scratch: Path, photos: Path) -> Path:
    """A git+DVC project of this repo's pipeline, its dataset the folder `photos`."""
    root = scratch / "project"
    root.mkdir()
    shutil.copytree(common.ROOT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(common.ROOT / name, root / name)
    params = yaml.safe_load((common.ROOT / "params.yaml").read_text())
    params["data"] = {"dataset": "photos", "datasets": {"photos": {"source": str(photos)}}}
    params["transfer"]["weights"] = "none"  # download's weights step is not measured (and ../shared is not beside)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(command, cwd=root, env=common.venv_env(), check=True)
    return root


def repro_download(root: Path) -> tuple[float, bool]:
    """(wall seconds of `dvc repro download`, whether download ran)."""
    start = time.perf_counter()
    done = subprocess.run(
        ["dvc", "repro", "download"], cwd=root, env=common.venv_env(), capture_output=True, text=True, check=False
    )
    seconds, printed = time.perf_counter() - start, done.stdout + done.stderr
    if done.returncode:
        raise SystemExit(f"dvc repro download failed in {root}:\n{printed[-3000:]}")
    return seconds, "Running stage 'download'" in printed


def stage_alone(root: Path) -> float:
    """Wall seconds of the source stage's own process (the part of a no-op repro that is ours, not DVC's)."""
    start = time.perf_counter()
    subprocess.run(["python", "-m", "pipeline.stages.source"], cwd=root, env=common.venv_env(), capture_output=True,
                   check=True)
    return time.perf_counter() - start


def measure(photos: Path, repeats: int) -> dict[str, Any]:
    files = [p for p in photos.rglob("*") if p.is_file()]
    photo = next(p for p in files if p.parent != photos)  # one in a class folder, not a top-level LICENSE
    with tempfile.TemporaryDirectory(prefix="bench-source-") as scratch:
        root = project(Path(scratch), photos)
        first, ran = repro_download(root)
        assert ran
        noops = [repro_download(root) for _ in range(repeats)]
        assert not any(ran for _, ran in noops), "download ran with nothing changed"
        check = [stage_alone(root) for _ in range(repeats)]
        added = photo.with_name("added-by-bench.jpg")
        shutil.copy(photo, added)
        try:
            after_add, ran = repro_download(root)
        finally:
            added.unlink()
        assert ran, "download did not run after a photo was added"
    return {
        "files": len(files),
        "first_repro_seconds": round(first, 3),
        "noop_repro": common.spread([seconds for seconds, _ in noops]),
        "source_stage_alone": common.spread(check),
        "repro_after_adding_one_photo_seconds": round(after_add, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as scratch:  # ../shared is read-only: copies
        shutil.copytree(common.RPS, Path(scratch) / "rps")
        subprocess.run(["chmod", "-R", "u+w", Path(scratch) / "rps"], check=True)  # copied without write bits
        rows["rps"] = measure(Path(scratch) / "rps", args.repeats)
        with tarfile.open(CIFAR10) as archive:
            archive.extractall(scratch, filter="data")
        rows["cifar10_folder"] = measure(Path(scratch) / "cifar10_train", args.repeats)
    common.write_result("source_check", {
        "setup": {
            "command": "dvc repro download (source + download stages), in a project whose dataset is the folder",
            "repeats": args.repeats,
        },
        "rows": rows,
    })


if __name__ == "__main__":
    main()
