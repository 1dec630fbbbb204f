"""The thin shell around every stage: logging to stderr, params, device, one MLflow run, user errors in one line.

    @cli.stage("baselines")
    def main(params: Params, run: StageRun) -> None: ...

    if __name__ == "__main__":
        main()
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.errors import UserError


def run(main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def stage(name: str, *, trains: bool = True) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """Make `body(params, run)` a stage's entry point.

    Params are validated before anything else; then the device is set up (train.device for stages
    that train or infer, the CPU alone for the others, whose bytes must not depend on hardware) and
    the body runs inside the stage's MLflow run.
    """
    def wrap(body: Callable[..., None]) -> Callable[[], None]:
        def main() -> None:
            from pipeline import device, tracking
            from pipeline.params import load_params

            params = load_params()
            info = device.configure_training(params.train) if trains else device.cpu_only()
            with tracking.stage_run(name, params, info) as stage_run:
                body(params, stage_run)

        main.__doc__ = body.__doc__
        return lambda: run(main)

    return wrap
