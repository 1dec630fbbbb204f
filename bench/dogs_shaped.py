"""Peak memory of every stage on a Stanford-Dogs-shaped run: 299 px, augmentation on the fly, nothing stored.

download, preprocess, augment and baselines run on 20,000 generated photos; every stage (features, tune,
transfer and evaluate too) runs on 1,000, since each streams its data and its peak does not grow with
the set (bench.memory_scaling shows that at 224 px). One epoch, and `train.on_the_fly_copies=1`: more
copies only stream the same records again. Reuses memory_scaling's snapshot, projects and stage runner.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from bench import common
from bench.memory_scaling import TARGET_PEAK_GB, project, run_stage, say, snapshot

DOGS_SHAPED = {
    "preprocess": {"image_size": 299},
    "augment": {"copies": 0},
    # Batch 16: at 299 px a batch of 32 holds ~1.2 GB of activations and gradients in cnn3_small alone.
    "train": {"use_augmented": False, "augment_on_the_fly": True, "on_the_fly_copies": 1, "batch_size": 16},
    "baselines": {"models": ["random_forest", "cnn3_small"], "epochs": 1},
    "tune": {"max_trials": 1, "epochs": 1, "final_epochs": 1},
    "transfer": {"image_size": 299, "epochs": 2},
}
STAGES = {
    "large": ("download", "preprocess", "augment", "baselines"),
    "small": ("download", "preprocess", "augment", "baselines", "tune", "features", "transfer", "evaluate"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench-dogs-shaped"))
    args = parser.parse_args()

    args.scratch.mkdir(parents=True, exist_ok=True)
    (args.scratch / "logs").mkdir(exist_ok=True)
    source, digest = snapshot(args.scratch)
    rows = {}
    for size, count in (("small", args.small), ("large", args.large)):
        photos = args.scratch / f"photos-{count}"
        if not photos.is_dir():
            subprocess.run([sys.executable, str(common.SHARED / "tools" / "make_scale_set.py"), str(photos),
                            "--images", str(count), "--side", "400", "--classes", "10"], check=True)
        folder = project(args.scratch, source, count, photos)
        params = yaml.safe_load((folder / "params.yaml").read_text())
        for section, values in DOGS_SHAPED.items():
            params[section].update(values)
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rows[str(count)] = {}
        for stage in STAGES[size]:
            rows[str(count)][stage] = run_stage(folder, stage, args.scratch / "logs")
            say(f"N={count} {stage}: peak {rows[str(count)][stage]['peak_rss_gb']} GB")
    peaks = [stage["peak_rss_gb"] for row in rows.values() for stage in row.values()]
    common.write_result("dogs_shaped", {
        "setup": {"pipeline_digest": digest, "params": DOGS_SHAPED, "stages": STAGES, "photo_side": 400},
        "rows": rows,
        "targets": {"every_stage_at_most_2_5_gb": max(peaks) <= TARGET_PEAK_GB},
    })


if __name__ == "__main__":
    main()
