"""dvc.yaml lists, for every stage, exactly what the stage reads: each project module and file that can change
its outputs (`deps`), and each params key (`params`).

A read that dvc.yaml does not list lets `dvc repro` keep stale outputs after an edit (the worst bug a cache can
have); a listed key the stage never reads re-runs it for nothing. Two kinds of evidence: the modules a stage
imports (statically, lazily imported ones too), and a trace of every stage of a small real run (pipeline/trace.py:
params keys read through the typed params, project files opened). Plumbing that cannot change what a stage
writes is exempt, by name and with its reason.
"""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import load_params
from pipeline.tracking import declared_params

from .conftest import REPO, make_dataset, output, sh, tiny_project

# Logging and exit codes, MLflow, path constants, atomic writes, params parsing (the values are DVC
# params), the registry (MLflow only, not a DVC output), the read recorder of these tests.
PLUMBING = {
    "pipeline/cli.py", "pipeline/errors.py", "pipeline/tracking.py", "pipeline/paths.py", "pipeline/fsio.py",
    "pipeline/params.py", "pipeline/registry.py", "pipeline/trace.py",
}
# device.py picks the device, distribution strategy and determinism of the stages that train or infer (a
# dependency of theirs); the others only call its cpu_only(), which hides accelerators.
CPU_ONLY = {"source", "download", "preprocess", "augment"}
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(path: Path) -> set[Path]:
    """Project modules `path` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == "pipeline":
                parts = name.split(".")
                found |= {f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i])))}
    return found


def only_a_docstring(path: Path) -> bool:
    """A package marker such as pipeline/models/__init__.py: nothing in it can change an output."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def closure(start: Path) -> set[Path]:
    """Modules `start` imports at any depth; not through plumbing, whose own imports serve it alone
    (params reads the backbone table to validate a name, not to shape an output)."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            if str(path.relative_to(REPO)) not in PLUMBING:
                todo += imported(path)
    return seen


def plumbing(stage: str, module: str) -> bool:
    return module in PLUMBING or (module == "pipeline/device.py" and stage in CPU_ONLY)


def under(path: str, places, sep: str = "/") -> bool:
    """`path` is one of `places` or inside one of them (a file in a folder; with sep=".", a key in a section)."""
    return any(path == place or path.startswith(place.rstrip(sep) + sep) for place in places)


def within(key: str, sections) -> bool:
    return under(key, sections, ".")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(stage):
    spec = STAGES[stage]
    entry = module_file(spec["cmd"].split("-m ", 1)[1].split()[0])
    uncovered = sorted(
        module for path in closure(entry)
        if not plumbing(stage, module := str(path.relative_to(REPO))) and not only_a_docstring(path)
        and not under(module, spec["deps"])
    )
    assert not uncovered, f"{stage}: add to its deps in dvc.yaml: {uncovered}"


def test_committed_lock_matches_the_code_and_params():
    """dvc.lock (and so metrics/) was regenerated after the last change to a stage's code or params.

    Only data may differ (a fresh clone has none): a stale code or params entry means the committed
    metrics were not produced by this code.
    """
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=REPO, capture_output=True, text=True,
        timeout=120, check=True,
    )
    stale = {
        stage: changed
        for stage, entries in json.loads(done.stdout or "{}").items()
        for entry in entries
        if isinstance(entry, dict)
        and (changed := {k: v for k, v in entry.get("changed deps", {}).items() if not k.startswith("data/")})
    }
    assert not stale, f"run `dvc repro` on the default data and commit dvc.lock + metrics/: {stale}"


# Keys a stage reads only on a branch the small run does not take: (stage, listed key) -> (the key that
# decides the branch, which the stage must read and list so that flipping it re-runs the stage; why).
BRANCHES = {
    ("source", "data.datasets"): (None, "it runs on every repro (always_changed): its params are what it may read"),
    ("download", "download"): ("data.datasets", "archive and HTTP bounds: read for an archive or URL source only"),
    ("download", "transfer.weights_mirrors"): ("transfer.weights", "read with transfer.weights=imagenet only"),
    ("baselines", "augment"): ("train.augment_on_the_fly", "read with on-the-fly augmentation only"),
    ("tune", "augment"): ("train.augment_on_the_fly", "read with on-the-fly augmentation only"),
    ("tune", "tune.oracle"): ("tune.workers", "where the oracle listens: read with tune.workers > 0 only"),
    ("transfer", "augment"): ("transfer.fine_tune_epochs", "fine-tuning augments on the fly"),
    ("transfer", "train.on_the_fly_copies"): ("transfer.fine_tune_epochs", "fine-tuning augments on the fly"),
}
DVC_FILES = {"params.yaml", "dvc.yaml"}  # DVC's own: a stage's definition and params are in its hash already
NOT_INPUTS = {
    # params.py validates transfer.backbone against the backbone table: read by every stage, shapes no output
    # but through the stages that list it.
    "pipeline/models/catalog.py",
    # Partial downloads (resumed by fetch.py) and the source stage's md5-by-stat memo (sources.py): they save
    # work, never change an output.
    "data/.downloads",
}


def leaves(tree, prefix=""):
    """Every dotted key of a params tree down to its values (a list is one value)."""
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{key}.")
        else:
            yield key


def outputs(spec) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for kind in ("outs", "metrics", "plots") for o in spec.get(kind, [])]


def params_findings(stage: str, spec, read: set[str], tree) -> list[str]:
    """What is wrong between the keys `stage` read and the params dvc.yaml lists for it, both ways."""
    listed = declared_params(spec, tree)
    findings = [f"reads {key} but dvc.yaml does not list it (stale cache)" for key in sorted(read) if not within(key, listed)]
    for key in listed:
        for leaf in leaves(tree):
            if not within(leaf, [key]) or any(within(leaf, [r]) for r in read):
                continue
            branch = next((v for (s, k), v in BRANCHES.items() if s == stage and within(leaf, [k])), None)
            if branch is None:
                findings.append(f"lists {key} but never reads {leaf} (needless re-runs)")
            elif branch[0] is not None and not any(within(r, [branch[0]]) for r in read):
                findings.append(f"{leaf} is exempt as read on {branch[0]}'s branch, but {branch[0]} is not read")
    return findings


def files_findings(stage: str, spec, read: list[str]) -> list[str]:
    """Project files `stage` opened that are neither its deps, params.yaml nor its own outputs (or their folders)."""
    allowed = [*spec["deps"], *outputs(spec)]
    return [
        f"reads {path}, not a dependency in dvc.yaml"
        for path in read
        if path not in DVC_FILES and not under(path, [*allowed, *NOT_INPUTS])
        # a folder above a dependency or an output: the import system's listings, temporaries swept beside outputs
        and not any(under(place, [path]) for place in [*allowed, *NOT_INPUTS]) and path != "."
        and not (plumbing(stage, path) or (path.endswith(".py") and only_a_docstring(REPO / path)))
    ]


@pytest.fixture(scope="module")
def traced(e2e_project):
    root, _, _ = e2e_project
    tree = load_params(root / "params.yaml").model_dump(mode="json")
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return tree, stages, {stage: json.loads((root / "trace" / f"{stage}.json").read_text()) for stage in stages}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_are_exactly_what_it_reads(traced, stage):
    tree, stages, reads = traced
    findings = params_findings(stage, stages[stage], set(reads[stage]["params"]), tree)
    assert not findings, f"{stage}: " + "; ".join(findings)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_reads_no_project_file_but_its_deps(traced, stage):
    _, stages, reads = traced
    assert reads[stage]["files"], "the trace saw no file at all"
    findings = files_findings(stage, stages[stage], reads[stage]["files"])
    assert not findings, f"{stage}: " + "; ".join(findings)


def test_the_checks_catch_a_planted_omission(traced):
    """The trace is evidence, not decoration: take one key and one file out of dvc.yaml, and the checks say so."""
    tree, stages, reads = traced
    features = dict(stages["features"], params=[k for k in stages["features"]["params"] if k != "transfer.features_block"])
    assert params_findings("features", features, set(reads["features"]["params"]), tree) == [
        "reads transfer.features_block but dvc.yaml does not list it (stale cache)"
    ]
    augment = dict(stages["augment"], params=[*stages["augment"]["params"], "train"])
    assert "lists train but never reads train.device (needless re-runs)" in params_findings(
        "augment", augment, set(reads["augment"]["params"]), tree
    )
    evaluate = dict(stages["evaluate"], deps=[d for d in stages["evaluate"]["deps"] if d != "data/models/tuned"])
    assert "reads data/models/tuned/tuned_cnn3v2.keras, not a dependency in dvc.yaml" in files_findings(
        "evaluate", evaluate, reads["evaluate"]["files"]
    )


def test_a_change_to_a_local_source_folder_reruns_download_and_only_then(tmp_path):
    """The photos of a local folder source are a dependency: added, replaced or renamed, download runs again;
    left alone, it does not (the source check runs, its output unchanged)."""
    root, env = tiny_project(tmp_path)
    photos = tmp_path / "photos" / "class0"

    def repro_download() -> tuple[bool, int]:
        printed = output(sh(root, "dvc", "repro", "download", env=env))
        return "Running stage 'download'" in printed, len(json.loads((root / "data" / "raw.json").read_text())["files"])

    assert repro_download() == (True, 36)
    assert repro_download() == (False, 36)
    make_dataset(tmp_path / "more", classes=1, shots=1, frames=1)
    shutil.copy(tmp_path / "more" / "class0" / "shot0.jpg", photos / "new.jpg")
    assert repro_download() == (True, 37)
    assert json.loads(sh(root, "dvc", "status", "--json", "preprocess", env=env).stdout)["preprocess"]
    (photos / "new.jpg").rename(photos / "renamed.jpg")
    assert repro_download() == (True, 37)
    shutil.copy(photos / "shot1.jpg", photos / "renamed.jpg")  # replaced by other bytes
    assert repro_download() == (True, 37)
    assert repro_download() == (False, 37)
