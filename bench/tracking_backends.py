"""What tracking costs each stage with the team stack's backend against the default local sqlite file: one
`tracking.stage_run` around an empty block in a fresh Python process (as DVC starts each stage), repeated and
interleaved, against (1) the workspace's sqlite store, (2) the team stack's `mlflow server` over PostgreSQL
(MLFLOW_TRACKING_URI=http://127.0.0.1:PORT) and (3) that PostgreSQL database opened by the stage itself.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import common
from bench.tracking_overhead import child
from pipeline import team_stack

KEYS = ("process_seconds", "import_mlflow_seconds", "enter_seconds", "exit_seconds", "stage_run_seconds")


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and fastest of each timing over the repeats (the first, which creates the store, apart)."""
    return {
        key: {"median": round(statistics.median(s[key] for s in samples), 3), "min": round(min(s[key] for s in samples), 3)}
        for key in KEYS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="timed stage runs per backend, after a first one")
    parser.add_argument("--stage", default="preprocess", help="whose dvc.yaml params the empty stage_run logs")
    args = parser.parse_args()
    if team_stack.postgres_bin() is None:
        raise SystemExit("no PostgreSQL here (pg_ctl not found): apt-get install postgresql")

    # As root, PostgreSQL runs as the postgres user: the stack's directory must be one that user can reach.
    home = Path(tempfile.mkdtemp(prefix="bench-team-stack-"))
    home.chmod(0o755)
    workspace = home / "workspace"
    workspace.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(common.ROOT / name, workspace / name)
    port, pg_port = common.free_port(), common.free_port()
    try:
        started, seconds = common.timed(team_stack.start, home / "stack", workspace, port, pg_port, 2)
        backends = {
            "sqlite_file": None,
            "postgresql_server": started["mlflow"]["tracking_uri"],
            "postgresql_direct": started["postgres"]["backend_store_uri"],
        }
        os.environ["PGPASSFILE"] = str(home / "stack" / "pgpass")  # for the direct arm; the others ignore it
        first = {name: child(workspace, args.stage, uri) for name, uri in backends.items()}
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
        for _ in range(args.repeats):
            for name, uri in backends.items():
                samples[name].append(child(workspace, args.stage, uri))
    finally:
        team_stack.stop(home / "stack")
        shutil.rmtree(home, ignore_errors=True)
    medians = {name: summary(runs) for name, runs in samples.items()}
    sqlite_cost = medians["sqlite_file"]["stage_run_seconds"]["median"]
    common.write_result("tracking_backends", {
        "stage": args.stage,
        "repeats": args.repeats,
        "stack_start_seconds": round(seconds, 3),
        "first_run": first,
        "per_stage": medians,
        "stage_run_vs_sqlite": {
            name: round(m["stage_run_seconds"]["median"] / sqlite_cost, 3) for name, m in medians.items()
        },
        "runs": samples,
    })


if __name__ == "__main__":
    main()
