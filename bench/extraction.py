"""Feature extraction as the features stage runs it vs a bare `base.predict` on ready float32 arrays.

The wrapped path streams uint8 images of the prepared size from a split's shards, does resize, cast,
preprocess_input and pooling inside the model and writes the features as a split; the bare path gets arrays already resized and preprocessed (done before the
clock starts). Throughput is also set against this CPU's FMA peak.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from bench import common

FLOPS_PER_CYCLE_PER_CORE = 32  # AVX2 + FMA: 2 FMA units x 8 float32 lanes x 2 FLOP
XCEPTION_GMAC_AT_299 = 8.4  # multiply-accumulates per image; convolutions scale with the pixel count


def cpu_mhz() -> float:
    """The highest "cpu MHz" /proc/cpuinfo reports (a VM may show the nominal clock, not the boost)."""
    with open("/proc/cpuinfo") as info:
        return max(float(line.split(":", 1)[1]) for line in info if line.startswith("cpu MHz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=common.RPS)
    parser.add_argument("--weights", type=Path, default=common.XCEPTION_WEIGHTS)
    parser.add_argument("--prepared-size", type=int, default=128, help="side of the uint8 images (preprocess.image_size)")
    parser.add_argument("--size", type=int, default=128, help="the backbone's input side (transfer.image_size), e.g. 299")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per path, interleaved; the fastest counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-extraction-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, scratch: Path) -> None:
    params = common.params()
    settings = params.preprocess.model_copy(update={"image_size": args.prepared_size})
    _, sample = common.rps_sample(args.data, settings, {"train": args.images}, params.seed, scratch)
    split = sample["train"]
    images = common.in_memory(split)[0]

    import keras

    from pipeline import imageset
    from pipeline.models import backbones

    batch = params.train.batch_size
    base = backbones.base_model("xception", args.size, args.weights)
    extractor = backbones.feature_extractor(base, "xception", args.size)
    feature_size = int(extractor.output.shape[-1])
    ready = keras.applications.xception.preprocess_input(
        np.array(keras.layers.Resizing(args.size, args.size)(images.astype(np.float32)))  # writable: preprocess_input works in place
    )
    with imageset.SplitWriter(scratch, "warmup", split.shape, split.dtype) as writer:
        first = images[: batch + 1]
        writer.write(first, split.labels[: len(first)], np.arange(len(first)))
    warmup = imageset.load_split(scratch, "warmup")

    def wrapped(source: imageset.Split) -> None:
        """As the features stage runs: the split streamed from its shards, features written as a split."""
        with imageset.SplitWriter(scratch, "features", (feature_size,), np.float32) as writer:
            backbones.extract_features(extractor, source, batch, writer)

    def bare(x: np.ndarray) -> np.ndarray:
        return base.predict(x, batch_size=batch, verbose=0)

    # Warm-up: traces a full and a partial batch, so no timed pass pays for tracing.
    wrapped(warmup)
    bare(ready[: batch + 1])
    wrapped_seconds, bare_seconds = [], []
    for _ in range(args.repeats):
        _, seconds = common.timed(wrapped, split)
        wrapped_seconds.append(seconds)
        maps, seconds = common.timed(bare, ready)
        bare_seconds.append(seconds)

    features = common.in_memory(imageset.load_split(scratch, "features"))[0]
    wrapped_spread, plain = common.spread(wrapped_seconds), common.spread(bare_seconds)
    overhead = wrapped_spread["min_seconds"] / plain["min_seconds"] - 1
    mhz = cpu_mhz()
    cores = os.cpu_count() or 1
    peak_gflops = cores * FLOPS_PER_CYCLE_PER_CORE * mhz / 1000
    gflop_per_image = 2 * XCEPTION_GMAC_AT_299 * (args.size / 299) ** 2

    def throughput(seconds: float) -> dict[str, float]:
        per_second = len(images) / seconds
        return {
            "images_per_second": round(per_second, 2),
            "gflops": round(per_second * gflop_per_image, 2),
            "fraction_of_peak": round(per_second * gflop_per_image / peak_gflops, 3),
        }

    common.write_result(f"extraction_{args.size}", {
        "setup": {
            "backbone": "xception", "prepared_size": args.prepared_size, "size": args.size,
            "images": len(images), "batch_size": batch, "repeats": args.repeats,
        },
        "wrapped": {**wrapped_spread, **throughput(wrapped_spread["min_seconds"])},
        "bare": {**plain, **throughput(plain["min_seconds"])},
        # Both paths compute the same features: pooling the bare maps must give the extractor's output.
        "max_abs_feature_difference": float(np.abs(maps.mean(axis=(1, 2)) - features).max()),
        "wrapping_overhead": round(overhead, 4),
        "ceiling": {
            "cpu_mhz_used": mhz,
            "cores": cores,
            "flops_per_cycle_per_core": FLOPS_PER_CYCLE_PER_CORE,
            "peak_gflops": round(peak_gflops, 1),
            "gflop_per_image": round(gflop_per_image, 3),
            "peak_images_per_second": round(peak_gflops / gflop_per_image, 1),
        },
        "targets": {"overhead_at_most_10_percent": overhead <= 0.10},
    })


if __name__ == "__main__":
    main()
