"""source stage: a fingerprint of the dataset's local files -> data/source.json, so that a change to them re-runs
download (and, through the tar, only then the stages below it).

dvc.yaml runs it on every `dvc repro` (always_changed): it stats the files (hashing only new or touched ones)
and writes the same bytes to data/source.json while nothing changed, so DVC then skips download. It opens no
MLflow run: it is a check of a few tenths of a second, not a piece of the experiment.
"""
from __future__ import annotations

import logging

from pipeline import cli, fsio, paths, sources
from pipeline.params import Params

log = logging.getLogger("source")

STATE = paths.DOWNLOADS / "source-state.json"  # md5 per file with its stat: not an output, never in git or DVC


@cli.stage("source", trains=False, tracked=False)
def main(params: Params) -> None:
    root = paths.workspace_root()  # an experiment's temporary copy shares the workspace's state
    where = sources.locate(params.data.spec, root)
    record = {"dataset": params.data.dataset, **sources.fingerprint(where, root / STATE)}
    fsio.write_json(paths.SOURCE, record)
    log.info("%s served by the %s at %s", record["dataset"], record["served_by"], record["location"])


if __name__ == "__main__":
    main()
