"""Write named DVC experiments' params and metrics (`dvc exp show --json`, and each experiment's leaderboard
from its commit) to one JSON file under results/.

    python -m bench.export_results results/rps.json rps-s1 rps-s2 --source "how and where they ran"

Run in the project that holds the experiments. Every figure RESULTS.md quotes is then in a committed file,
traceable to the experiment's name, its commit and the command in RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline import fsio


def leaderboard(rev: str) -> list[dict]:
    """The experiment's metrics/leaderboard.json from its commit: a list, which `dvc exp show` leaves out."""
    shown = subprocess.run(["git", "show", f"{rev}:metrics/leaderboard.json"], capture_output=True, text=True, check=True)
    return json.loads(shown.stdout)


def experiments(shown: list[dict], names: set[str]) -> dict[str, dict]:
    """name -> {name, rev, params, metrics} of each named experiment in `dvc exp show --json` output."""
    found = {}
    for baseline in shown:
        for experiment in [baseline, *(baseline.get("experiments") or [])]:
            for revision in experiment.get("revs", [experiment]):
                name = revision.get("name")
                if name in names and revision.get("data"):
                    data = revision["data"]
                    found[name] = {
                        "name": name,
                        "rev": revision.get("rev"),
                        "params": data.get("params", {}),
                        "metrics": data.get("metrics", {}),
                    }
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--source", required=True, help="where, on what code and how the experiments ran")
    args = parser.parse_args()
    shown = json.loads(subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "exp", "show", "--json"], capture_output=True, text=True, check=True
    ).stdout)
    found = experiments(shown, set(args.names))
    missing = [name for name in args.names if name not in found]
    if missing:
        print(f"not among the experiments: {', '.join(missing)}", file=sys.stderr)
        return 1
    for record in found.values():
        record["leaderboard"] = leaderboard(record["rev"])
    fsio.write_json(args.out, {"source": args.source, "experiments": [found[name] for name in args.names]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
