"""Peak memory of each stage as the dataset grows: generated photo sets of N images through download,
preprocess, augment and baselines (and features on the smallest set), each stage a fresh process.

Each N gets its own scratch project: a snapshot of the repo's working tree (tracked and untracked,
not ignored: uncommitted pipeline code included), taken once per scratch directory, with params.yaml
pointed at the generated photos. Every stage runs as `python -m pipeline.stages.<name>` under
`/usr/bin/time -f %M`, whose figure is the largest single process of the stage (the stage itself or
one of its decoding workers), not their sum; the sum over the process tree is sampled beside it.
MLflow writes to a sqlite store inside the scratch project, never to the repo's mlruns/.

Resumable: a stage already measured (the row is in <scratch>/state.json and the project is there)
is not run again; `--fresh` starts over (the generated photos are kept). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench import common
from pipeline import fsio

STAGES = ("source", "download", "preprocess", "augment", "features", "baselines")  # in dvc.yaml's order
TARGET_PEAK_GB = 2.5
TARGET_GROWTH_GB = 0.3
# Issue 9's numbers before the streamed image sets, and issue 27's before the forest was bounded
# (baselines.models [random_forest, cnn3_small]; peak RSS, GB), for comparison.
BEFORE = {
    "4000": {"preprocess": 1.28, "augment": 2.16, "baselines": 3.80},
    "8000": {"preprocess": 2.31, "augment": 2.96, "baselines": 6.41},
}
BEFORE_FOREST_BOUND = {"4000": {"baselines": 2.063}, "8000": {"baselines": 3.012}}
# The recipe; everything else (baselines.models included: all the default models) is params.yaml's.
RECIPE = {"preprocess.image_size": 224, "augment.copies": 1, "baselines.epochs": 1}


def say(message: str) -> None:
    print(f"[memory_scaling {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gb(kilobytes: float) -> float:
    """/usr/bin/time's KB (KiB) as decimal GB."""
    return round(kilobytes * 1024 / 1e9, 3)


def snapshot(scratch: Path) -> tuple[Path, str]:
    """<scratch>/source: the repo's working tree (tracked + untracked, not ignored), once; and its digest."""
    source = scratch / "source"
    if not source.is_dir():
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=common.ROOT, capture_output=True, text=True, check=True,
        ).stdout.split("\0")
        partial = scratch / "source.partial"
        shutil.rmtree(partial, ignore_errors=True)
        for name in sorted(n for n in listed if n and (common.ROOT / n).is_file()):
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(common.ROOT / name, partial / name)
        shutil.rmtree(partial / "metrics", ignore_errors=True)  # the repo's own results: never read as ours
        partial.rename(source)
        say(f"snapshot of the working tree in {source}")
    digest = hashlib.sha256()
    for path in sorted(source.joinpath("pipeline").rglob("*.py")):
        digest.update(path.relative_to(source).as_posix().encode() + b"\0" + path.read_bytes())
    return source, digest.hexdigest()[:16]


def scale_params(base: dict[str, Any], data: Path, features: bool) -> dict[str, Any]:
    """params.yaml for one N: the generated photos as the dataset, and the issue's settings. The backbone's
    weights only where the features stage is measured: no other stage here reads them."""
    params = json.loads(json.dumps(base))
    params["data"]["dataset"] = "scale"
    params["data"]["datasets"]["scale"] = {"source": str(data), "mirrors": []}
    for dotted, value in RECIPE.items():
        section, key = dotted.split(".")
        params[section][key] = value
    # Absolute, so the scratch project needs no ../shared beside it.
    pinned = params["transfer"]["weights_mirrors"]["xception"][0]  # params.yaml's checksum, an absolute path
    params["transfer"]["weights_mirrors"] = {"xception": [{**pinned, "path": str(common.XCEPTION_WEIGHTS)}]}
    if not features:
        params["transfer"]["weights"] = "none"
    return params


def project(scratch: Path, source: Path, count: int, data: Path, features: bool) -> Path:
    """<scratch>/project-<count>: a copy of the snapshot with its own params.yaml."""
    folder = scratch / f"project-{count}"
    if not folder.is_dir():
        shutil.copytree(source, folder.with_name(folder.name + ".partial"))
        partial = folder.with_name(folder.name + ".partial")
        base = yaml.safe_load((partial / "params.yaml").read_text())
        (partial / "params.yaml").write_text(yaml.safe_dump(scale_params(base, data, features), sort_keys=False))
        partial.rename(folder)
    found = subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=folder, env=common.venv_env(), capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(found).is_relative_to(folder):
        raise SystemExit(f"{folder} imports {found}, not its own pipeline package")
    return folder


def tree_rss(pid: int) -> int:
    """Bytes resident in a process and all its descendants now (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(folder: Path, stage: str, logs: Path) -> dict[str, Any]:
    """One stage in a fresh process under /usr/bin/time; its peak RSS, wall time and metrics file."""
    env = common.venv_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    (folder / "mlruns").mkdir(exist_ok=True)
    metrics_path = folder / "metrics" / f"{stage}.json"
    metrics_path.unlink(missing_ok=True)
    time_file = logs / f"{folder.name}-{stage}.time"
    log_file = logs / f"{folder.name}-{stage}.log"
    command = ["/usr/bin/time", "-f", "%M %e", "-o", str(time_file), sys.executable, "-m", f"pipeline.stages.{stage}"]
    peak_tree = 0
    start = time.perf_counter()
    with log_file.open("w") as log:
        child = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_tree
            while not done.wait(0.25):
                peak_tree = max(peak_tree, tree_rss(child.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log_file.read_text().splitlines()[-15:]
        raise SystemExit(f"{stage} in {folder} failed ({code}); see {log_file}:\n" + "\n".join(tail))
    max_rss_kb, _ = time_file.read_text().split()[-2:]
    # The source stage (a fingerprint of the dataset's files) writes no metrics.
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return {
        "peak_rss_gb": gb(int(max_rss_kb)),
        "peak_rss_kb": int(max_rss_kb),
        # /usr/bin/time's time includes the time binary; the tree's sum is sampled every 0.25 s (a lower bound).
        "process_tree_peak_rss_gb": round(peak_tree / 1e9, 3),
        "wall_seconds": round(seconds, 2),
        "stage_seconds": metrics.get("stage_seconds"),
        "images_per_second": metrics.get("images_per_second"),
        "tracking_seconds": metrics.get("tracking_seconds"),
    }


def stages_of(folder: Path) -> list[str]:
    """The STAGES the project's dvc.yaml has, in its order (the code measured may predate a stage)."""
    declared = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    return [stage for stage in STAGES if stage in declared]


def sizes(text: str) -> list[int]:
    return sorted(int(s) for s in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes, default=[4000, 8000, 20000], help="comma-separated image counts")
    parser.add_argument("--features-size", type=int, default=None,
                        help="the N whose project also runs the features stage (default: the smallest; 0: none)")
    parser.add_argument("--side", type=int, default=400, help="side of the generated photos, px")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench-memory-scaling"),
                        help="photos, snapshot, projects, logs and state; reused by the next run")
    parser.add_argument("--fresh", action="store_true", help="drop the snapshot, projects and measurements first")
    args = parser.parse_args()
    features_size = min(args.sizes) if args.features_size is None else args.features_size

    scratch = args.scratch.resolve()
    logs = scratch / "logs"
    state_path = scratch / "state.json"
    if args.fresh:
        for path in [scratch / "source", logs, state_path, *scratch.glob("project-*")]:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    source, code_digest = snapshot(scratch)
    if state.get("pipeline_digest", code_digest) != code_digest:
        raise SystemExit(f"{state_path} was measured on other code: run with --fresh")
    state["pipeline_digest"] = code_digest

    for count in args.sizes:
        data = common.scale_photos(scratch, count, args.side, args.classes)
        with_features = count == features_size
        folder = project(scratch, source, count, data, with_features)
        rows = state.setdefault("rows", {}).setdefault(str(count), {})
        for stage in stages_of(folder):
            if stage == "features" and not with_features:
                continue
            if stage in rows:
                say(f"N={count} {stage}: measured before ({rows[stage]['peak_rss_gb']} GB), skipped")
                continue
            say(f"N={count} {stage}: running (log: {logs / f'{folder.name}-{stage}.log'})")
            rows[stage] = run_stage(folder, stage, logs)
            say(f"N={count} {stage}: peak {rows[stage]['peak_rss_gb']} GB, {rows[stage]['wall_seconds']} s")
            fsio.write_json(state_path, state)

    baselines = yaml.safe_load((source / "params.yaml").read_text())["baselines"]
    rows = state["rows"]
    measured = [str(n) for n in args.sizes if str(n) in rows]
    smallest, largest = measured[0], measured[-1]
    per_stage: dict[str, Any] = {}
    for stage in STAGES:
        peaks = {n: rows[n][stage]["peak_rss_gb"] for n in measured if stage in rows[n]}
        if not peaks:
            continue
        entry: dict[str, Any] = {"peak_rss_gb": peaks, "max_gb": max(peaks.values())}
        entry["at_most_2_5_gb"] = entry["max_gb"] <= TARGET_PEAK_GB
        if smallest in peaks and largest in peaks and smallest != largest:
            growth = round(peaks[largest] - peaks[smallest], 3)
            entry[f"growth_{smallest}_to_{largest}_gb"] = growth
            entry["growth_at_most_0_3_gb"] = growth <= TARGET_GROWTH_GB
        per_stage[stage] = entry
    common.write_result("memory_scaling", {
        "setup": {
            "sizes": [int(n) for n in measured], "side": args.side, "classes": args.classes,
            "features_on": features_size, "scratch": str(scratch), "pipeline_digest": code_digest,
            "params": {
                **RECIPE, "baselines.models": baselines["models"],
                "baselines.forest_max_leaf_nodes": baselines["forest_max_leaf_nodes"],
                "transfer.image_size": "params.yaml's",
            },
            "peak_rss": "/usr/bin/time %M (largest single process of the stage), KiB * 1024 / 1e9",
        },
        "rows": {n: rows[n] for n in measured},
        "per_stage": per_stage,
        "before": BEFORE,
        "before_forest_bound": BEFORE_FOREST_BOUND,
        "targets": {
            "every_stage_at_most_2_5_gb": all(e["at_most_2_5_gb"] for e in per_stage.values()),
            f"growth_{smallest}_to_{largest}_at_most_0_3_gb": all(
                e.get("growth_at_most_0_3_gb", True) for e in per_stage.values()
            ),
        },
    })


if __name__ == "__main__":
    main()
