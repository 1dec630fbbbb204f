"""preprocess on real files, read from the download stage's tar: nothing lost, nothing crashes, shots never
straddle splits, a damaged tar never passes as a shorter dataset."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import fsio, imageset
from pipeline.errors import UserError
from pipeline.images import load_array
from pipeline.params import DatasetSpec, load_params
from pipeline.splitting import assign_splits, group_of, merge_duplicates, share_warnings
from pipeline.stages import preprocess
from pipeline.stages.download import materialise
from pipeline.stages.preprocess import (
    POOL_MIN_FILES,
    auto_workers,
    list_members,
    prepare,
)

from .conftest import DOWNLOAD_LIMITS, REPO, make_dataset, write_image


def settings(params, **changes):
    return params.preprocess.model_copy(update={"image_size": 32, "workers": 1, **changes})


RPS_PATTERN = load_params(REPO / "params.yaml").data.datasets["rps"].group_pattern  # make_dataset names like rps


def packed(folder: Path, where: Path | None = None, group_pattern: str | None = RPS_PATTERN) -> Path:
    """`folder` as the download stage leaves it: <where>/raw.tar and its listing raw.json beside it."""
    where = where or folder.parent
    tar = where / "raw.tar"
    listing = materialise(DatasetSpec(source=str(folder)), tar, where / "downloads", where, DOWNLOAD_LIMITS)
    fsio.write_json(tar.with_suffix(".json"), {"group_pattern": group_pattern, **listing})
    return tar


def by_path(out):
    return {e["path"]: e for e in imageset.load_manifest(out)["files"]}


def test_every_file_ends_in_a_split_or_quarantine(tmp_path, params):
    raw = make_dataset(tmp_path / "raw", classes=3, shots=4, frames=2)
    bad = {
        "class0/empty.jpg": b"",
        "class1/notes.txt": b"not a picture",
        "class2/.DS_Store": b"\0\0\0\1Bud1",
        "class1/cut.jpg": (raw / "class1" / "shot0.jpg").read_bytes()[:400],
    }
    for name, content in bad.items():
        (raw / name).write_bytes(content)
    write_image(raw / "class0" / "tiny.png", size=(8, 8))
    write_image(raw / "class2" / "gray.png", mode="L")  # odd but good
    out = tmp_path / "prepared"
    out.mkdir()
    metrics, quarantined = prepare(packed(raw), out, settings(params), seed=0)

    assert metrics["images_in"] == 3 * 4 * 2 + len(bad) + 2
    assert metrics["images_in"] == metrics["images_out"] + metrics["quarantined"] + metrics["dropped_images"]
    reasons = {q["path"]: q["reason"] for q in quarantined}
    assert set(reasons) == set(bad) | {"class0/tiny.png"}
    assert reasons["class0/empty.jpg"].startswith("empty file")
    assert reasons["class1/notes.txt"].startswith("not an image")
    assert reasons["class1/cut.jpg"].startswith("truncated")
    assert reasons["class0/tiny.png"].startswith("too small")

    entries = by_path(out)
    good = [p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file() and p.relative_to(raw).as_posix() not in reasons]
    assert all(entries[p]["split"] in ("train", "val", "test") for p in good)
    assert imageset.load_classes(out) == ["class0", "class1", "class2"]
    total = 0
    for name in ("train", "val", "test"):
        split = imageset.load_split(out, name)
        assert split.shape == (32, 32, 3) and split.dtype == np.uint8
        assert metrics["split"][name]["images"] == split.count
        total += split.count
    assert total == metrics["images_out"] == len(good)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("train", "val", "test"))) == [
        "classes.json", "manifest.json"
    ]  # no scratch file left behind


def test_rows_hold_the_right_pixels(tmp_path, params):
    raw = make_dataset(tmp_path / "raw", classes=2, shots=8, frames=1)
    out = tmp_path / "prepared"
    out.mkdir()
    prepare(packed(raw), out, settings(params, resize="stretch"), seed=0)
    entries = [e for e in imageset.load_manifest(out)["files"] if e["split"] == "train"]
    train = imageset.load_split(out, "train")
    assert sorted(e["row"] for e in entries) == list(range(train.count))
    assert [e["row"] for e in entries] != sorted(e["row"] for e in entries)  # written shuffled, not in file order
    stored = np.concatenate([batch["x"] for batch in train.batches(4)])
    for entry in entries:  # decoded from the tar as from the original file
        expected = load_array(raw / entry["path"], size=32, resize="stretch", max_pixels=10**8)
        np.testing.assert_array_equal(stored[entry["row"]], expected)
        assert imageset.load_classes(out)[train.labels[entry["row"]]] == entry["class"]


def test_two_workers_give_the_same_bytes(tmp_path, params):
    raw = packed(make_dataset(tmp_path / "raw", classes=2, shots=4, frames=3))
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        out.mkdir()
        prepare(raw, out, settings(params, workers=workers), seed=3)
        outputs.append(out)
    for name in ("train-00000.rec", "train_rows.npy", "val-00000.rec", "test_rows.npy", "manifest.json"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes()


def test_group_pattern_on_rps_names():
    pattern = re.compile(r"^(.+?)(?:_\d+)?\.\w+$")
    assert group_of("rock/2019-04-03_13-17-39.jpg", pattern) == "rock/2019-04-03_13-17-39"
    assert group_of("rock/2019-04-03_13-17-39_12.jpg", pattern) == "rock/2019-04-03_13-17-39"
    assert group_of("rock/odd name", pattern) == "rock/odd name"
    assert group_of("rock/a_1.jpg", None) == "rock/a_1.jpg"


def shots_in_splits(out):
    seen = {}
    for entry in imageset.load_manifest(out)["files"]:
        shot = re.sub(r"(_\d+)?\.jpg$", "", entry["path"])
        seen.setdefault(shot, set()).add(entry["split"])
    return seen


def test_shared_rps_split_keeps_every_shot_in_one_split(tmp_path, params, shared_rps):
    out = tmp_path / "prepared"
    out.mkdir()
    raw = packed(shared_rps, tmp_path)
    metrics, quarantined = prepare(raw, out, settings(params, workers=2), seed=42)
    assert quarantined == [] and metrics["images_in"] == 1307
    seen = shots_in_splits(out)
    assert all(len(splits) == 1 for splits in seen.values())
    counts = {k: v["images"] for k, v in metrics["split"].items()}
    assert 0.6 < counts["train"] / 1307 < 0.8 and counts["val"] > 100 and counts["test"] > 100
    assert sum(v["groups"] for v in metrics["split"].values()) == len(seen)
    # Every class is in every split.
    for name in ("train", "val", "test"):
        assert set(imageset.load_split(out, name).labels.tolist()) == {0, 1, 2}

    # The random frame split (no grouping) scatters the frames of most shots over several splits.
    random_out = tmp_path / "random"
    random_out.mkdir()
    prepare(packed(shared_rps, random_out, group_pattern=None), random_out, settings(params, workers=2), seed=42)
    leaked = sum(len(splits) > 1 for splits in shots_in_splits(random_out).values())
    assert leaked > len(seen) / 2


def test_stratified_group_assignment_matches_fractions():
    labels = np.repeat([0, 1], 100)
    groups = [f"{label}/g{i // 5}" for i, label in enumerate(labels)]
    split = assign_splits(labels, groups, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0, classes=["a", "b"])
    for label in (0, 1):
        counts = np.bincount(split[labels == label], minlength=3)
        assert counts.tolist() == [60, 20, 20]
    for g in set(groups):
        assert len({split[i] for i, name in enumerate(groups) if name == g}) == 1


def test_class_with_too_few_shots_is_a_clear_error(tmp_path, params):
    raw = make_dataset(tmp_path / "raw", classes=2, shots=4, frames=2)
    shutil.rmtree(raw / "class1")
    make_dataset(tmp_path / "few", classes=1, shots=2, frames=3, size=(60, 40))  # not copies of class0
    shutil.copytree(tmp_path / "few" / "class0", raw / "class1")
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(UserError, match=r"class 'class1' has 6 images in 2 group\(s\).*min_per_class=7"):
        prepare(packed(raw), out, settings(params), seed=0)
    make_dataset(raw.parent / "more", classes=1, shots=3, frames=3, size=(70, 50))
    shutil.copytree(raw.parent / "more" / "class0", raw / "class2")
    metrics, _ = prepare(packed(raw), out, settings(params, min_per_class=7), seed=0)  # class1 dropped
    assert metrics["dropped_classes"] == 1 and metrics["dropped_images"] == 6
    assert imageset.load_classes(out) == ["class0", "class2"]
    assert metrics["images_in"] == metrics["images_out"] + metrics["dropped_images"]


def test_auto_workers_use_a_pool_only_where_it_pays():
    assert auto_workers(POOL_MIN_FILES - 1) == 1
    assert auto_workers(POOL_MIN_FILES) == (os.cpu_count() or 1)


@pytest.mark.parametrize("twin", ["Class0", "class0 "])
def test_class_names_differing_only_by_case_or_whitespace_are_an_error(tmp_path, params, twin):
    raw = make_dataset(tmp_path / "raw", classes=2, shots=3, frames=1)
    shutil.copytree(raw / "class0", raw / twin)
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(UserError, match="differ only by case or whitespace") as error:
        prepare(packed(raw), out, settings(params), seed=0)
    assert "'class0'" in str(error.value) and repr(twin) in str(error.value)


# --------------------------------------------------------------------------------------------
# Reading the tar: members decoded in place, damage named, never a silently shorter dataset
# --------------------------------------------------------------------------------------------


def test_a_member_decodes_as_its_original_file(tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=2, shots=2, frames=2, size=(300, 200))
    write_image(raw / "class0" / "gray.png", mode="L")
    tar = packed(raw)
    members, pattern = list_members(tar)
    assert pattern.pattern == RPS_PATTERN
    assert [m.path for m in members] == sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    fd = os.open(tar, os.O_RDONLY)
    try:
        for path, label, offset, size, sha256 in members:
            data = preprocess.read_member(fd, offset, size)
            assert data == (raw / path).read_bytes() and label == path.split("/")[0]
            assert sha256 == hashlib.sha256(data).hexdigest()
            np.testing.assert_array_equal(
                load_array(data, size=64, resize="center_crop", max_pixels=10**8),
                load_array(raw / path, size=64, resize="center_crop", max_pixels=10**8),
            )
    finally:
        os.close(fd)


@pytest.mark.parametrize("cut", ["inside the last member", "before the last member's header", "end marker only"])
def test_a_truncated_tar_is_an_error_naming_the_member(tmp_path, params, cut):
    raw = make_dataset(tmp_path / "raw", classes=2, shots=4, frames=1)
    tar = packed(raw)
    last = fsio.read_json(tar.with_suffix(".json"))["files"][-1]
    keep = {
        "inside the last member": last["offset"] + last["bytes"] // 2,
        "before the last member's header": last["offset"] - 512,  # tarfile itself would list one member less
        "end marker only": last["offset"] + last["bytes"],
    }[cut]
    with open(tar, "r+b") as stream:
        stream.truncate(keep)
    out = tmp_path / "prepared"
    out.mkdir()
    if cut == "end marker only":  # every member whole: nothing is lost, so nothing to refuse
        metrics, _ = prepare(tar, out, settings(params), seed=0)
        assert metrics["images_in"] == 8
        return
    with pytest.raises(UserError) as error:
        prepare(tar, out, settings(params), seed=0)
    message = str(error.value)
    assert f"{tar} is cut short" in message and repr(last["path"]) in message and "dvc checkout" in message


def test_a_member_read_short_is_quarantined_not_lost(tmp_path, params):
    """Should the tar shrink under a running decode, the member is quarantined by name, not skipped."""
    raw = make_dataset(tmp_path / "raw", classes=1, shots=2, frames=1)
    tar = packed(raw)
    [first, second] = fsio.read_json(tar.with_suffix(".json"))["files"]
    with tempfile.TemporaryFile() as into:
        reasons = preprocess.decode_all(
            tar, [(first["offset"], first["bytes"]), (second["offset"], tar.stat().st_size)], settings(params), into, 1
        )
    assert reasons[0] is None
    assert reasons[1].startswith("truncated: the tar holds") and f"of this member's {tar.stat().st_size} bytes" in reasons[1]


def test_a_cut_image_inside_the_tar_is_quarantined_by_name(tmp_path, params):
    raw = make_dataset(tmp_path / "raw", classes=2, shots=4, frames=1)
    (raw / "class1" / "cut.jpg").write_bytes((raw / "class1" / "shot0.jpg").read_bytes()[:300])
    out = tmp_path / "prepared"
    out.mkdir()
    metrics, quarantined = prepare(packed(raw), out, settings(params), seed=0)
    assert [q["path"] for q in quarantined] == ["class1/cut.jpg"]
    assert quarantined[0]["reason"].startswith("truncated")
    assert metrics["images_in"] == 9 and metrics["images_out"] == 8


def test_a_listing_without_offsets_asks_for_a_new_download(tmp_path, params):
    tar = packed(make_dataset(tmp_path / "raw", classes=2, shots=3, frames=1))
    listing = fsio.read_json(tar.with_suffix(".json"))
    for entry in listing["files"]:
        del entry["offset"]
    fsio.write_json(tar.with_suffix(".json"), listing)
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(UserError, match="does not list the tar's members with offsets.*run the download stage again"):
        prepare(tar, out, settings(params), seed=0)
    tar.with_suffix(".json").unlink()
    with pytest.raises(UserError, match="missing: run the download stage first"):
        prepare(tar, out, settings(params), seed=0)


def test_peak_memory_stays_below_the_decoded_set(tmp_path, params):
    """400 images at 512 px are 315 MB decoded. The design that held a split (or all decoded images) in memory
    peaks above base + 315 MB; streaming through the scratch file keeps the peak near the interpreter's own."""
    raw = make_dataset(tmp_path / "raw", classes=2, shots=50, frames=4)
    tar = packed(raw)
    out = tmp_path / "prepared"
    out.mkdir()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forked (pytest-sized) image.
    child = f"""
from pathlib import Path
from pipeline.params import load_params
from pipeline.stages.preprocess import prepare
settings = load_params({str(REPO / "params.yaml")!r}).preprocess.model_copy(update={{"image_size": 512, "workers": 1}})
metrics, _ = prepare(Path({str(tar)!r}), Path({str(out)!r}), settings, seed=0)
assert metrics["images_out"] == 400, metrics
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = int(done.stdout.split()[-1]) / 1024
    decoded_mb = 400 * 512 * 512 * 3 / 2**20
    assert peak_mb < 250 < decoded_mb, f"peak {peak_mb:.0f} MB"


# --------------------------------------------------------------------------------------------
# Splits a user's dataset cannot silently ruin: copies, label conflicts, shares far from target
# --------------------------------------------------------------------------------------------


def test_copies_under_other_names_share_a_split_and_are_counted(tmp_path, params):
    raw = make_dataset(tmp_path / "raw", classes=2, shots=10, frames=1)
    for shot in range(6):  # the same photo saved twice, under a name of no shot of its own
        shutil.copyfile(raw / "class0" / f"shot{shot}.jpg", raw / "class0" / f"copy of shot{shot}.jpg")
    out = tmp_path / "prepared"
    out.mkdir()
    metrics, quarantined = prepare(packed(raw), out, settings(params), seed=0)
    assert quarantined == [] and metrics["duplicates"] == 6
    entries = by_path(out)
    for shot in range(6):
        assert entries[f"class0/copy of shot{shot}.jpg"]["split"] == entries[f"class0/shot{shot}.jpg"]["split"]


def test_the_same_bytes_under_two_classes_are_quarantined_every_copy(tmp_path, params):
    raw = make_dataset(tmp_path / "raw", classes=2, shots=4, frames=1)
    shutil.copyfile(raw / "class0" / "shot0.jpg", raw / "class1" / "mislabelled.jpg")
    out = tmp_path / "prepared"
    out.mkdir()
    metrics, quarantined = prepare(packed(raw), out, settings(params), seed=0)
    assert quarantined == [
        {"path": "class0/shot0.jpg", "reason": "conflicting labels: the same bytes are class1/mislabelled.jpg"},
        {"path": "class1/mislabelled.jpg", "reason": "conflicting labels: the same bytes are class0/shot0.jpg"},
    ]
    assert metrics["images_out"] == 7


def test_camera_names_are_not_shots_without_the_rps_pattern(tmp_path, params):
    """IMG_0001..IMG_0040: the rps burst pattern would make each class one shot. It belongs to rps only."""
    raw = tmp_path / "raw"
    for c in range(2):
        for i in range(40):
            write_image(raw / f"class{c}" / f"IMG_{i + 1:04d}.jpg", seed=c * 100 + i)
    out = tmp_path / "prepared"
    out.mkdir()
    metrics, _ = prepare(packed(raw, group_pattern=None), out, settings(params), seed=0)
    assert [metrics["split"][name]["images"] for name in ("train", "val", "test")] == [56, 12, 12]
    assert metrics["split_warnings"] == []
    assert params.data.datasets["rps"].group_pattern and not params.data.datasets["cifar10"].group_pattern


def test_a_split_far_from_its_share_is_warned_about_in_log_metrics_and_mlflow(tmp_path, params):
    """The rps pattern on camera names: each class a handful of "shots" of 10 frames, so the shares miss."""
    raw = tmp_path / "raw"
    for c in range(2):
        for i in range(3):
            for f in range(10 if i == 0 else 1):
                write_image(raw / f"class{c}" / (f"IMG_{f}.jpg" if i == 0 else f"solo{i}.jpg"), seed=c * 100 + i * 10 + f)
    out = tmp_path / "prepared"
    out.mkdir()
    metrics, _ = prepare(packed(raw), out, settings(params), seed=0)
    warnings = metrics["split_warnings"]
    assert warnings and all("check the dataset's group_pattern" in line for line in warnings)
    assert "split 'train' holds" in warnings[0] or "split 'val' holds" in warnings[0]


def test_splitting_merges_groups_of_identical_files():
    assert merge_duplicates(["a/1", "a/2", "a/3", "a/4"], ["x", "y", "x", "y"]) == ["a/1", "a/2", "a/1", "a/2"]
    # a chain: 3 is a copy of 1's bytes and of 2's group, so all three are one group
    assert merge_duplicates(["g2", "g1", "g2"], ["p", "q", "q"]) == ["g1", "g1", "g1"]


def test_share_warnings_only_beyond_the_tolerance():
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    assert share_warnings({"train": 70, "val": 16, "test": 14}, fractions) == []
    [line] = share_warnings({"train": 55, "val": 22, "test": 23}, fractions)
    assert line.startswith("split 'train' holds 55 of 100 images (55%), target 70%")
