"""`python -m pipeline.predict` wall time, end to end (process start, imports, model load, decoding, output),
for 1 and 100 photos with a scikit-learn (.skops) and a Keras (.keras) model.

Each case runs `--repeats` times in a fresh process; the fastest and the median are kept (other jobs on the
machine only add time), with the process's CPU seconds (user + system), which other jobs inflate far less: on
an idle machine a mostly single-threaded run's wall time is close to them. Also records whether the process
imported TensorFlow or scikit-learn (`-X importtime`).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench import common


def run(model: Path, files: list[str], repeats: int) -> dict:
    command = [sys.executable, "-m", "pipeline.predict", "--model", str(model), *files]
    seconds, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3))
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command[:5])} ... failed ({done.returncode}): {done.stderr[-500:]}")
    traced = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], cwd=common.ROOT,
                            capture_output=True, text=True, check=False)
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines() if line.startswith("import time:")}
    return {"images": len(files), "imports_tensorflow": "tensorflow" in imported, "imports_sklearn": "sklearn" in imported,
            **common.spread(seconds), "cpu_seconds": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skops", type=Path, default=Path("data/models/baselines/random_forest.skops"))
    parser.add_argument("--keras", type=Path, default=Path("data/models/champion.keras"))
    parser.add_argument("--photos", type=Path, default=common.RPS, help="a folder of .jpg photos")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cases = {}
    for kind, model in (("skops", args.skops), ("keras", args.keras)):
        model = model if model.is_absolute() else common.ROOT / model
        cases[kind] = {"model": str(model), "size_bytes": model.stat().st_size,
                       **{f"{n}_images": run(model, [str(p) for p in common.spread_photos(args.photos, n)], args.repeats) for n in (1, 100)}}
    common.write_result("predict_cli", {"repeats": args.repeats, "cases": cases})


if __name__ == "__main__":
    main()
