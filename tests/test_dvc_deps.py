"""dvc.yaml lists, for every stage, each project module that can change the stage's outputs.

A module a stage imports (at any depth, lazily too) but does not depend on would let `dvc repro`
keep stale outputs after an edit. Plumbing that cannot change what a stage writes is exempt, by name.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

# Logging and exit codes, MLflow, path constants, atomic writes, params parsing (the values are DVC
# params), device selection (train.device is a param), the registry (MLflow only, not a DVC output).
PLUMBING = {
    "pipeline/cli.py", "pipeline/errors.py", "pipeline/tracking.py", "pipeline/paths.py", "pipeline/fsio.py",
    "pipeline/params.py", "pipeline/device.py", "pipeline/registry.py",
}
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


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(stage):
    spec = STAGES[stage]
    entry = module_file(spec["cmd"].split("-m ", 1)[1].split()[0])
    deps = [REPO / d for d in spec["deps"]]
    uncovered = sorted(
        str(path.relative_to(REPO)) for path in closure(entry)
        if str(path.relative_to(REPO)) not in PLUMBING and not only_a_docstring(path) and not any(path == d or d in path.parents for d in deps)
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
