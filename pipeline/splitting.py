"""Train/val/test assignment: stratified by class, whole groups (shots) at a time, seeded."""
from __future__ import annotations

import re

import numpy as np

from pipeline.errors import UserError
from pipeline.params import SPLITS


def group_of(path: str, pattern: re.Pattern[str] | None) -> str:
    """The shot a file belongs to; a file the pattern does not match is a shot of its own."""
    name = path.rsplit("/", 1)[-1]
    match = pattern.match(name) if pattern else None
    return path if match is None else f"{path.rsplit('/', 1)[0]}/{match.group(1)}"


def merge_duplicates(groups: list[str], digests: list[str]) -> list[str]:
    """Each file's group, where files with the same bytes share one (the smallest of their groups'), so
    that a copy under another name can never sit in another split."""
    parent: dict[str, str] = {}

    def root(group: str) -> str:
        while parent.get(group, group) != group:
            group = parent[group]
        return group

    first: dict[str, str] = {}
    for group, digest in zip(groups, digests):
        a, b = root(first.setdefault(digest, group)), root(group)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(group) for group in groups]


# A split whose share of the images is further than this from its target is warned about: a file-name
# pattern that groups far too much (one shot per class) must not pass as a split.
SHARE_TOLERANCE = 0.10


def share_warnings(counts: dict[str, int], fractions: dict[str, float]) -> list[str]:
    """One line per split whose share of the images misses its target by more than SHARE_TOLERANCE."""
    total = sum(counts.values())
    return [
        f"split {name!r} holds {counts[name]} of {total} images ({counts[name] / total:.0%}), "
        f"target {fractions[name]:.0%}: check the dataset's group_pattern (are whole classes one shot?)"
        for name in SPLITS
        if abs(counts[name] / total - fractions[name]) > SHARE_TOLERANCE
    ]


def assign_splits(
    labels: np.ndarray, groups: list[str], fractions: dict[str, float], seed: int, classes: list[str]
) -> np.ndarray:
    """Split index (into SPLITS) per item: per class, whole groups go to the split furthest below its share."""
    rng = np.random.default_rng(seed)
    wanted = [name for name in SPLITS if fractions[name] > 0]
    assigned = np.full(len(labels), -1, dtype=np.int8)
    for label, name in enumerate(classes):
        members: dict[str, list[int]] = {}
        for index in np.flatnonzero(labels == label):
            members.setdefault(groups[index], []).append(index)
        keys = sorted(members)
        keys = [keys[i] for i in rng.permutation(len(keys))]
        total = sum(len(v) for v in members.values())
        if len(keys) < len(wanted):
            raise UserError(
                f"class {name!r} has {total} images in {len(keys)} group(s) (shots), but the split into "
                f"{'/'.join(wanted)} needs at least {len(wanted)} groups: add images, drop the class with "
                f"preprocess.min_per_class={total + 1}, or set a fraction in preprocess.splits to 0"
            )
        filled = dict.fromkeys(wanted, 0)
        # One group for each split first (smallest share first), so no split lacks the class.
        seeding = sorted(wanted, key=lambda s: fractions[s])
        for position, key in enumerate(keys):
            split = seeding[position] if position < len(seeding) else max(
                wanted, key=lambda s: fractions[s] * total - filled[s]
            )
            filled[split] += len(members[key])
            assigned[members[key]] = SPLITS.index(split)
    return assigned
