"""The thin shell around every stage: logging to stderr, params, device, one MLflow run, user errors in one line.

    @cli.stage("baselines")
    def main(params: Params, run: StageRun) -> None: ...

    if __name__ == "__main__":
        main()
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import UserError


def run(main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Outputs are written through temporaries (fsio), removed on the way out: nothing half-written stays.
        where = exc.filename or f"under {Path.cwd()}"
        print(f"error: no space left on the device writing {where}: free some space and run again", file=sys.stderr)
        sys.exit(2)


def check_inputs(stage: str, dvc_yaml: Path) -> None:
    """Every output of another stage that dvc.yaml lists as this stage's dependency exists, else one line
    naming it and the stage that writes it: a stage run by hand before its inputs exist must not fail deep inside."""
    from pipeline.tracking import dvc_stages

    stages = dvc_stages(dvc_yaml)
    writer = {
        out if isinstance(out, str) else next(iter(out)): name
        for name, spec in stages.items()
        for out in spec.get("outs", [])
    }
    for dep in stages.get(stage, {}).get("deps", []):
        if dep in writer and not Path(dep).exists():
            raise UserError(f"{dep} is missing: run `dvc repro {writer[dep]}` first (it writes {dep})")


def stage(name: str, *, trains: bool = True, tracked: bool = True) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """Make `body(params, run)` a stage's entry point.

    Params are validated before anything else; then the device is set up (train.device for stages
    that train or infer, the CPU alone for the others, whose bytes must not depend on hardware) and
    the body runs inside the stage's MLflow run. An untracked stage (a check run on every repro) gets
    `body(params)`: no device, no MLflow run.
    """
    def wrap(body: Callable[..., None]) -> Callable[[], None]:
        def main() -> None:
            from pipeline import device, paths, trace, tracking
            from pipeline.params import load_params

            traced = os.environ.get(trace.ENV)  # on since pipeline/__init__.py
            try:
                params = load_params()
                check_inputs(name, paths.DVC_YAML)
                if not tracked:
                    body(params)
                    return
                info = device.configure_training(params.train) if trains else device.cpu_only()
                with tracking.stage_run(name, params, info) as stage_run:
                    body(params, stage_run)
            finally:
                if traced:
                    trace.write(name, Path(traced))

        main.__doc__ = body.__doc__
        return lambda: run(main)

    return wrap
