"""The whole pipeline from a clean state: `dvc repro` in a fresh clone of HEAD, timed end to end.

The clone sits beside a `shared` symlink so that ../shared (dataset and weights mirrors) resolves, and
runs on this venv. Only committed code is measured: uncommitted changes are not in the clone.
`--baseline REV` first runs the same in a clone checked out at REV, so the two are compared in one run
on one machine (timings only compare that way).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench import common


def clone(parent: Path, shared: Path, rev: str = "HEAD") -> Path:
    """<parent>/main, a clone of the repo at `rev`, beside <parent>/shared -> `shared`."""
    parent.mkdir(parents=True, exist_ok=True)
    (parent / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    project = parent / "main"
    subprocess.run(["git", "clone", "--quiet", str(common.ROOT), str(project)], check=True)
    subprocess.run(["git", "checkout", "--quiet", rev], cwd=project, check=True)
    # The venv's editable install points at the repo: the stages must import the clone's pipeline.
    found = subprocess.run(
        ["python", "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=project, env=common.venv_env(), capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(found).is_relative_to(project):
        raise SystemExit(f"the clone imports {found}, not its own pipeline package")
    return project


def stage_metrics(project: Path) -> dict[str, Any]:
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    found = {}
    for stage in stages:
        path = project / "metrics" / f"{stage}.json"
        if path.exists():  # the source check writes none
            metrics = json.loads(path.read_text())
            found[stage] = {k: metrics[k] for k in ("stage_seconds", "tracking_seconds", "images_per_second")}
    return found


def reproduce(parent: Path, shared: Path, rev: str) -> dict[str, Any]:
    """`dvc repro` from nothing in a clone at `rev`: wall time, per-stage metrics, leaderboard."""
    project = clone(parent, shared, rev)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True)
    _, seconds = common.timed(subprocess.run, ["dvc", "repro"], cwd=project, env=common.venv_env(), check=True)
    stages = stage_metrics(project)
    return {
        "commit": commit.stdout.strip(),
        "total_seconds": round(seconds, 3),
        "sum_of_stage_seconds": round(sum(s["stage_seconds"] for s in stages.values()), 3),
        "stages": stages,
        "leaderboard": json.loads((project / "metrics" / "leaderboard.json").read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=common.SHARED, help="what ../shared is beside the clone")
    parser.add_argument("--baseline", help="a revision to reproduce first, for a side-by-side comparison")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed) instead of deleting it")
    args = parser.parse_args()

    parent = Path(tempfile.mkdtemp(prefix="bench-full-repro-"))
    try:
        result: dict[str, Any] = {}
        if args.baseline:
            result["baseline"] = reproduce(parent / "baseline", args.shared, args.baseline)
        result |= reproduce(parent / "head", args.shared, "HEAD")
        result["targets"] = {"total_at_most_10_minutes": result["total_seconds"] <= 600}
        if args.baseline:
            result["head_over_baseline_seconds"] = round(result["total_seconds"] / result["baseline"]["total_seconds"], 3)
        common.write_result("full_repro", result)
    finally:
        if args.keep:
            print(f"kept {parent}")
        else:
            shutil.rmtree(parent)


if __name__ == "__main__":
    main()
