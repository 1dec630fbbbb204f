"""The random forest's memory is flat in the number of training images (issue 27).

Grown to purity, a tree has about one leaf per distinct training image, so the forest, its .skops dump and
above all its ONNX conversion (Python lists of every node's attributes) grew with the dataset: 3 GB at 8,000
photos. Each size is measured in a fresh child process (its peak RSS is its own, not this test process's):
a forest with params.yaml's bound fitted on N noise images, saved and exported as the stage does, then loaded
from its ONNX export and run as evaluate does. Noise is the worst case: only repeats of one image share a
leaf, so an unbounded forest at 2N holds twice the nodes. Measured here (50 trees, 4,096 -> 8,192 images):
peak 566 -> 883 MB with forest_max_leaf_nodes null, 432 -> 432 MB with 1024.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from pipeline.models import classic

# Memory is per tree: a quarter of params.yaml's 200 trees shows the same slope per tree in CI's time.
TREES = 50
# What may grow from N to 2N images: the pixel matrix (8,192 x 4 x 4 x 3 float32: 1.6 MB) and the fit's
# per-image buffers, nothing proportional to the forest's nodes.
SLOPE_MB = 40

CHILD = textwrap.dedent("""
    import json, resource, sys, tempfile
    from pathlib import Path

    import numpy as np

    from pipeline.models import classic

    images, trees, leaves = (int(arg) for arg in sys.argv[1:])
    rng = np.random.default_rng(0)
    x = classic.pixels(rng.integers(0, 256, (images, 16, 16, 3), dtype=np.uint8), 4)
    y = rng.integers(0, 10, images)
    forest = classic.estimator("random_forest", 0, trees, leaves or None).fit(x, y)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "random_forest.skops"
        classic.save(forest, path)
        classic.export_onnx(forest, path.with_suffix(".onnx"))
        del forest
        classic.load_for_inference(path).predict_proba(x)
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def peak_mb(images: int, trees: int, leaves: int | None) -> float:
    """Peak RSS of a child process fitting, saving, exporting and running the forest on `images` images."""
    command = [sys.executable, "-c", CHILD, str(images), str(trees), str(leaves or 0)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])["peak_kb"] / 1024


def test_the_default_forest_is_bounded(params):
    assert params.baselines.forest_max_leaf_nodes is not None, "baselines.forest_max_leaf_nodes: null grows with N"


def test_a_bounded_forest_grows_no_tree_past_its_leaves():
    rng = np.random.default_rng(0)
    x, y = rng.random((300, 12), np.float32), rng.integers(0, 3, 300)
    grown = classic.estimator("random_forest", 0, 3).fit(x, y)
    bounded = classic.estimator("random_forest", 0, 3, max_leaf_nodes=8).fit(x, y)
    assert max(tree.get_n_leaves() for tree in bounded.estimators_) == 8
    assert min(tree.get_n_leaves() for tree in grown.estimators_) > 8


def test_forest_peak_memory_is_flat_in_the_number_of_images(params):
    leaves = params.baselines.forest_max_leaf_nodes
    # Bootstrap repeats share leaves: from N = 4 x leaves noise images every tree reaches its bound (2 x leaves
    # is not enough), at N as at 2N, where an unbounded tree would double.
    images = 4 * leaves
    small, large = peak_mb(images, TREES, leaves), peak_mb(2 * images, TREES, leaves)
    assert large - small <= SLOPE_MB, f"peak {small:.0f} MB at {images} images, {large:.0f} MB at {2 * images}"
