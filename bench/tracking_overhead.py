"""What the DVC + MLflow machinery costs: a no-op `dvc repro`, MLflow's share of each stage's wall time
(from metrics/<stage>.json), and one `tracking.stage_run` around an empty block, `import mlflow` split out,
against the default in-process sqlite store and against a local `mlflow server` over the same kind of store.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bench import common


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dvc", *args], cwd=project, env=common.venv_env(), capture_output=True, text=True, check=True)


def noop_repro(project: Path, repeats: int) -> dict[str, Any]:
    # Skipped rather than time a real reproduction (minutes, and it rewrites the project's outputs).
    status = json.loads(dvc(project, "status", "--json").stdout or "{}")
    # The source stage runs on every repro (always_changed): it is part of the no-op, not a pending change.
    pending = {stage: why for stage, why in status.items() if why != ["always changed"]}
    if pending:
        print(f"skipping the no-op dvc repro: {project} has changed stages {list(pending)}", file=sys.stderr)
        return {"skipped": "dvc status is not clean: run dvc repro there first", "changed_stages": list(pending)}
    timings = common.spread([common.timed(dvc, project, "repro")[1] for _ in range(repeats)])
    return {**timings, "target_at_most_2s": timings["median_seconds"] <= 2}


def stage_shares(project: Path) -> dict[str, Any]:
    """tracking_seconds / stage_seconds for every stage of dvc.yaml that has a metrics file."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    shares: dict[str, Any] = {}
    for stage in stages:
        path = project / "metrics" / f"{stage}.json"
        if path.exists():
            metrics = json.loads(path.read_text())
            share = metrics["tracking_seconds"] / metrics["stage_seconds"]
            shares[stage] = {
                "stage_seconds": metrics["stage_seconds"],
                "tracking_seconds": metrics["tracking_seconds"],
                "share": round(share, 4),
                "target_at_most_2_percent": share <= 0.02,
            }
    return shares


def empty_stage_run(stage: str) -> dict[str, float]:
    """In the child, from the workspace: `import mlflow`, then stage_run around nothing, each timed.

    pipeline's modules (pydantic, numpy) are loaded before the clock starts: every stage has them anyway.
    """
    from pipeline import device, tracking
    from pipeline.params import load_params

    params = load_params()
    info = device.cpu_only()
    _, import_seconds = common.timed(importlib.import_module, "mlflow")
    start = time.perf_counter()
    with tracking.stage_run(stage, params, info) as run:
        entered = time.perf_counter()
    end = time.perf_counter()
    return {
        "import_mlflow_seconds": round(import_seconds, 3),
        "enter_seconds": round(entered - start, 3),  # store, experiment, tags, params, start_run
        "exit_seconds": round(end - entered, 3),  # final metrics, end_run, metrics file
        "stage_run_seconds": round(end - start, 3),
        # What metrics/<stage>.json would report, less the import (done above, outside stage_run).
        "reported_tracking_seconds": round(run.tracking_seconds, 3),
    }


def child(workspace: Path, stage: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """One fresh Python process running empty_stage_run in `workspace`, as DVC starts each stage.

    Without `tracking_uri` the stage opens the workspace's sqlite store itself, as by default.
    """
    env = common.venv_env()
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    command = [sys.executable, "-m", "bench.tracking_overhead", "--child", str(workspace), "--stage", stage]
    done, seconds = common.timed(subprocess.run, command, cwd=common.ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the timed stage run failed ({tracking_uri or 'sqlite'}):\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.splitlines()[-1]), "process_seconds": round(seconds, 3)}


@contextmanager
def tracking_server(store: Path, timeout: float = 120) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port over a sqlite store in `store`; yields its URI.

    A client of a server loads only MLflow's REST store: SQLAlchemy, alembic and the schema check
    stay in the server, started once instead of once per stage.
    """
    port = common.free_port()
    command = [
        "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store / 'server.db'}", "--default-artifact-root", str(store / "artifacts"),
    ]
    server = subprocess.Popen(command, env=common.venv_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mlflow server did not come up on {uri}") from None
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", type=Path, default=common.ROOT, help="an already reproduced DVC project")
    parser.add_argument("--repeats", type=int, default=3, help="no-op dvc repro runs")
    parser.add_argument("--stage", default="preprocess", help="whose dvc.yaml params the empty stage_run logs")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run one empty stage_run there
    args = parser.parse_args()
    if args.child:
        os.chdir(args.child)
        print(json.dumps(empty_stage_run(args.stage)))
        return

    project = args.project.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        workspace = Path(tmp)
        for name in ("params.yaml", "dvc.yaml"):
            shutil.copy(project / name, workspace / name)
        runs = {"fresh_store": child(workspace, args.stage), "existing_store": child(workspace, args.stage)}
        with tracking_server(workspace / "server") as uri:
            runs["server_first_run"] = child(workspace, args.stage, uri)
            runs["server_next_run"] = child(workspace, args.stage, uri)
    common.write_result("tracking_overhead", {
        "project": str(project),
        "noop_dvc_repro": noop_repro(project, args.repeats),
        "stage_shares": stage_shares(project),
        "empty_stage_run": {"stage": args.stage, **runs},
    })


if __name__ == "__main__":
    main()
