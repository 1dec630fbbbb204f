"""The preprocess stage's core (`prepare`) vs a naive single-process Pillow loop over the same files.

Also `prepare` on one worker, which separates what the second process buys from what the decoding
itself (JPEG draft mode) buys. `prepare` reads the files packed in a tar as the download stage packs
data/raw.tar (packed before timing); the naive loop reads the class folders. Files and tar are read once
before timing, so no arm pays for a cold page cache.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import common
from pipeline.stages.preprocess import prepare


def naive(files: list[Path], out: Path, size: int, fmt: str) -> dict[str, float]:
    """What a first script does: open, RGB, resize, save one file each; returns seconds per phase."""
    phases = dict.fromkeys(("decode", "resize", "save"), 0.0)
    for index, path in enumerate(files):
        t0 = time.perf_counter()
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        t1 = time.perf_counter()
        small = rgb.resize((size, size))
        t2 = time.perf_counter()
        if fmt == "png":
            small.save(out / f"{index}.png")
        else:
            np.save(out / f"{index}.npy", np.asarray(small))
        phases["decode"] += t1 - t0
        phases["resize"] += t2 - t1
        phases["save"] += time.perf_counter() - t2
    return {k: round(v, 3) for k, v in phases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=common.RPS, help="class-per-folder photos (the raw dir)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--naive-format", choices=("npy", "png"), default="npy", help="what the naive loop writes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per arm, interleaved; the fastest counts")
    args = parser.parse_args()

    params = common.params()
    settings = params.preprocess.model_copy(update={"image_size": args.image_size})
    files = [args.data / path for path, _ in common.class_files(args.data)]
    for path in files:
        path.read_bytes()
    seconds: dict[str, list[float]] = {}
    naive_phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        # prepare reads the tar the download stage writes (packed here, untimed, and read once); the naive
        # loop reads the class folders.
        raw = common.raw_tar(args.data, Path(tmp) / "raw.tar", params.data.datasets["rps"].group_pattern)
        raw.read_bytes()
        arms = {
            "prepare": lambda out: prepare(raw, out, settings, params.seed),
            "prepare_1_worker": lambda out: prepare(raw, out, settings.model_copy(update={"workers": 1}), params.seed),
            "naive": lambda out: naive(files, out, args.image_size, args.naive_format),
        }
        seconds = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, arm in arms.items():
                out = Path(tmp) / name
                out.mkdir()
                returned, elapsed = common.timed(arm, out)
                seconds[name].append(elapsed)
                shutil.rmtree(out)
                if name == "naive":
                    naive_phases = returned  # where the naive loop's time goes (last repeat)

    fastest = {name: min(values) for name, values in seconds.items()}
    speedup = fastest["naive"] / fastest["prepare"]
    common.write_result("preprocess_naive", {
        "setup": {
            "images": len(files), "image_size": args.image_size, "resize": settings.resize,
            "workers": settings.workers, "naive_format": args.naive_format, "repeats": args.repeats,
        },
        "seconds": {name: common.spread(values) for name, values in seconds.items()},
        "images_per_second": {name: round(len(files) / s, 1) for name, s in fastest.items()},
        "naive_phase_seconds": naive_phases,
        "speedup": round(speedup, 2),
        "speedup_one_worker": round(fastest["naive"] / fastest["prepare_1_worker"], 2),
        "targets": {"speedup_at_least_2x": speedup >= 2},
    })


if __name__ == "__main__":
    main()
