"""MLflow tracking: one run per stage execution, the same numbers in metrics/<stage>.json for DVC.

Runs are tagged so that `mlflow ui` can compare runs from `dvc repro`, `dvc exp run` and other
machines: stage, git commit, DVC experiment name, a hash of the stage's params, the device used
and the host. The stage's params are the keys dvc.yaml lists for it: one list, read by both tools.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from pipeline import fsio, paths, trace
from pipeline.device import DeviceInfo, host_tags
from pipeline.errors import UserError
from pipeline.params import Params

# A stage waits this long for an HTTP tracking server before saying it is unreachable (MLflow's own
# client retries for minutes, then fails with a traceback).
SERVER_PROBE_SECONDS = 10
SYSTEM_METRICS_SECONDS = 2
# Experiment tags: the UI opens the experiment on its training runs (not MLflow 3's GenAI overview), and a
# shared view of the runs page grouped by DVC experiment, opened by URL:
# <ui>/#/experiments/<id>/runs?viewStateShareKey=by-experiment
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.sharedViewState.by-experiment": json.dumps(
        {"groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "dvc.exp_name"}]}}
    ),
}


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI, else mlflow.tracking_uri, else a sqlite store in the user's workspace.

    The path is absolute and points at the workspace even from a `dvc exp run --temp` copy,
    whose directory (and anything relative to it) is deleted when the experiment ends.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    if uri:
        return uri
    store = paths.workspace_root() / paths.MLRUNS
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def declared_params(spec: Mapping[str, Any], tree: Mapping[str, Any]) -> list[str]:
    """The params.yaml keys a dvc.yaml stage lists, its `${key}` interpolations resolved as DVC does."""
    keys: list[str] = []
    for entry in spec.get("params", []):  # a key of params.yaml, or {other_file: [keys]}
        keys.extend([entry] if isinstance(entry, str) else entry.get(str(paths.PARAMS), []))
    return [re.sub(r"\$\{([^}]+)\}", lambda ref: str(_lookup(tree, ref[1].strip())), key) for key in keys]


def stage_params(stage: str, params: Params, dvc_yaml: Path = paths.DVC_YAML) -> dict[str, Any]:
    """The params `stage` depends on, as dvc.yaml lists them; all params where dvc.yaml has no such stage."""
    tree = params.model_dump(mode="json")
    stages = dvc_stages(dvc_yaml)
    if stage not in stages:
        return tree
    return {key: _lookup(tree, key) for key in declared_params(stages[stage], tree)}


def dvc_stages(dvc_yaml: Path = paths.DVC_YAML) -> dict[str, Any]:
    """dvc.yaml's stages; none where there is no dvc.yaml (a stage run outside a project)."""
    try:
        return yaml.safe_load(dvc_yaml.read_text())["stages"]
    except (FileNotFoundError, KeyError, TypeError):
        return {}


# What a stage's dataset version is: the dataset as decoded and split (every stage from augment on reads it,
# directly or through its augmented copies and features), or as downloaded (preprocess).
DATASET_VERSIONS = (paths.PREPARED.as_posix(), paths.RAW.as_posix())


def data_digest(stage: str, dvc_yaml: Path = paths.DVC_YAML, dvc_lock: Path = paths.DVC_LOCK) -> str | None:
    """DVC's hash of the dataset version `stage` read: the md5 dvc.lock records for data/prepared (or
    data/raw.tar), written by dvc repro as the upstream stage ended; for download, the md5 of the tar it
    wrote. None where there is none to say."""
    spec = dvc_stages(dvc_yaml).get(stage)
    if spec is None:
        return None
    read = next((path for path in DATASET_VERSIONS if path in spec.get("deps", [])), None)
    if read is None:
        wrote_raw = paths.RAW.as_posix() in spec.get("outs", []) and paths.RAW.is_file()
        return fsio.file_digest(paths.RAW, "md5") if wrote_raw else None
    if not dvc_lock.is_file():
        return None
    locked = yaml.safe_load(dvc_lock.read_text()).get("stages", {})
    return next((out.get("md5") for entry in locked.values() for out in entry.get("outs", []) if out["path"] == read), None)


def dataset_source(origin: str) -> Any:
    """The MLflow dataset source of a dataset's origin: an HTTP one for a URL, else the origin as written
    (a local path, tfds:NAME, sklearn:digits)."""
    if origin.startswith(("http://", "https://")):
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        return HTTPDatasetSource(origin)
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource({"origin": origin})


def log_dataset(stage: str, params: Params) -> None:
    """The data this stage read as an MLflow input: the Dataset column then says which data (the dataset's
    name and origin) and which version (DVC's hash): the same digest is the same data."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    digest = data_digest(stage)
    if digest is not None:
        dataset = MetaDataset(dataset_source(params.data.spec.source), name=params.data.dataset, digest=digest)
        mlflow.log_input(dataset, context=stage)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _loggable(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in flat.items()}


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_tags(stage: str, values: Mapping[str, Any], device: DeviceInfo) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    return {
        "stage": stage,
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "params.hash": hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16],
        # Which process wrote the run: a run still RUNNING whose process is gone was killed (see close_orphans).
        "process.host": socket.gethostname(),
        "process.pid": str(os.getpid()),
        **device.tags(),
        **host_tags(),
    }


class StageRun:
    """The handle a stage logs through; it also counts the time spent in MLflow."""

    def __init__(self, stage: str, parent_run_id: str | None = None) -> None:
        self.stage = stage
        # Nested runs go under the active run, or under this run of another process (a tune worker's trials
        # under the chief's stage run, which the worker must not end).
        self.parent_run_id = parent_run_id
        self.tags: dict[str, str] = {}  # copied onto nested runs, so they filter the same way
        self.metrics: dict[str, Any] = {}
        self.images = 0  # images the stage processed, for images_per_second
        self.tracking_seconds = 0.0

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Tracking work: timed apart from the stage's own, and outside the read trace (it feeds MLflow only)."""
        start = time.perf_counter()
        try:
            with trace.paused():
                yield
        finally:
            self.tracking_seconds += time.perf_counter() - start

    def record(self, metrics: Mapping[str, Any]) -> None:
        """The stage's own results: kept for metrics/<stage>.json and logged to MLflow at the end."""
        self.metrics.update(metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        with self.timed():
            mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        with self.timed():
            mlflow.set_tags(dict(tags))

    def log_now(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Straight to whichever run is active (a nested one): per-epoch curves, a model's scores."""
        import mlflow

        with self.timed():
            mlflow.log_metrics(dict(metrics), step=step)

    def log_experiment(self, params: Params) -> None:
        """Make this run the experiment's row: every param of params.yaml (flattened keys) and each earlier
        stage's seconds (from its metrics file), beside the stage's own scores. evaluate calls it, so that
        the evaluate runs alone are the table of experiments."""
        import mlflow

        with self.timed():
            mlflow.log_params(_loggable(flatten(params.model_dump(mode="json"))))
            seconds = {}
            for stage in dvc_stages():
                written = paths.metrics_file(stage)
                if stage != self.stage and written.is_file():
                    seconds[stage] = fsio.read_json(written).get("stage_seconds")
        self.record({"seconds_by_stage": {k: v for k, v in seconds.items() if v is not None}})

    @contextmanager
    def nested(self, name: str, params: Mapping[str, Any], kind: str = "model") -> Iterator[str]:
        """A child run of the stage's run (a model, a trial); yields its run id."""
        import mlflow

        with self.timed():
            parent = mlflow.get_run(self.parent_run_id) if self.parent_run_id else mlflow.active_run()
            experiment_id = parent.info.experiment_id  # else MLflow files it under "Default"
            child = mlflow.start_run(
                experiment_id=experiment_id, run_name=name, nested=True, parent_run_id=self.parent_run_id,
                tags={**self.tags, kind: name},
            )
            mlflow.log_params(_loggable(flatten(params)))
        with child:
            yield child.info.run_id


def check_reachable(uri: str) -> None:
    """The tracking store answers within seconds, else one clear line naming it. MLflow itself would retry
    for minutes (an HTTP server) or most of an hour (a PostgreSQL store that is down) before a traceback."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri.rstrip("/"))
    elif uri.startswith("postgresql"):
        _check_database(uri)


def _check_server(uri: str) -> None:
    """Its health check, then one request that reads its backend store: a server whose database is down still
    passes the first, then holds each request while it retries the database."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=SERVER_PROBE_SECONDS):
            pass
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({reason}): start it, or set mlflow.tracking_uri "
            "(or MLFLOW_TRACKING_URI) to a server that runs"
        ) from None
    try:
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        with urllib.request.urlopen(search, timeout=SERVER_PROBE_SECONDS):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:  # below, the store answered (an auth proxy's 401 included)
            raise UserError(
                f"MLflow tracking server {uri} fails to read its backend store (HTTP {exc.code}): "
                "is its database (PostgreSQL) running?"
            ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(
            f"MLflow tracking server {uri} answers but cannot read its backend store within {SERVER_PROBE_SECONDS} s "
            f"({getattr(exc, 'reason', exc)}): is its database (PostgreSQL) running?"
        ) from None


def _check_database(uri: str) -> None:
    """A PostgreSQL backend store accepts a connection (a password in the URI is hidden in the message)."""
    import sqlalchemy

    shown = sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)
    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": SERVER_PROBE_SECONDS})
    except ModuleNotFoundError as exc:
        raise UserError(
            f"MLflow tracking store {shown} needs the {exc.name} driver: pip install -c constraints.txt -e '.[team]'"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(
            f"MLflow tracking store {shown} is unreachable ({reason}): start PostgreSQL (scripts/team-stack start), "
            "or set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to a store that runs"
        ) from None
    finally:
        engine.dispose()


def close_orphans(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the runs this machine started whose process is gone but which still say RUNNING (a stage
    killed by kill -9 or a power cut cannot end its own run); return their ids."""
    host = socket.gethostname().replace("'", "")
    running = client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'", max_results=1000
    )
    orphans = [run for run in running if not fsio.process_alive(int(run.data.tags["process.pid"]))]
    for run in orphans:
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"marked run {run.info.run_id} ({run.info.run_name}) KILLED: its process is gone", file=sys.stderr)
    return [run.info.run_id for run in orphans]


def run_name(stage: str, params: Params, params_hash: str) -> str:
    """`evaluate · cats` under `dvc exp run -n cats`; `evaluate · rps-1a2b3c` (dataset, params hash) outside it,
    so runs of different experiments are told apart in the runs list."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{stage} · {experiment}" if experiment else f"{stage} · {params.data.dataset}-{params_hash[:6]}"


def peak_rss_mb() -> float:
    """The stage's peak resident memory: this process's high-water mark (VmHWM, not ru_maxrss, which a forked
    child inherits from its parent) or its largest finished child (preprocess's decoding pool), in MB."""
    own = 0.0
    try:
        with open("/proc/self/status") as status:
            own = next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0) / 1024
    except OSError:
        pass
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(max(own, children), 1)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: the workspace's mlruns/ (not the cwd's); with a tracking
    server, the server's own (None): under --serve-artifacts every client uploads through it."""
    if uri.startswith(("http://", "https://")):
        return None
    return (paths.workspace_root() / paths.MLRUNS / "artifacts").as_uri()


def _experiment_id(client: Any, name: str, location: str | None) -> str:
    """The experiment's id, creating it with its artifacts at `location`."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore --experiment-id "
            f"{found.experiment_id}) or set mlflow.experiment to another name"
        )
    if found is not None:
        for key, value in EXPERIMENT_TAGS.items():  # experiments made before these tags existed get them too
            if found.tags.get(key) != value:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except MlflowException:  # created meanwhile by a parallel `dvc queue` worker
        return client.get_experiment_by_name(name).experiment_id


@contextmanager
def stage_run(stage: str, params: Params, device: DeviceInfo) -> Iterator[StageRun]:
    """One MLflow run for one execution of `stage`; on success also writes metrics/<stage>.json.

    A failing stage leaves its run marked FAILED and writes no metrics file.
    """
    start = time.perf_counter()
    run = StageRun(stage)
    with run.timed():
        import mlflow

        uri = tracking_uri(params)
        check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        experiment_id = _experiment_id(client, params.mlflow.experiment, artifact_location(uri))
        close_orphans(client, experiment_id)
        values = stage_params(stage, params)
        run.tags = run_tags(stage, values, device)
        # System metrics (CPU, memory, GPU) sampled every 2 s, so that short stages get some too.
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_SECONDS)
        mlflow.set_system_metrics_samples_before_logging(1)
        active = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name(stage, params, run.tags["params.hash"]), tags=run.tags,
            log_system_metrics=True,
        )
        mlflow.log_params(_loggable(flatten(values)))
    print(f"[{stage}] MLflow run {active.info.run_id} in {mlflow.get_tracking_uri()}", file=sys.stderr)
    with active:
        yield run
        with run.timed():
            mlflow.log_metrics(flatten(run.metrics))
            log_dataset(stage, params)
        seconds = time.perf_counter() - start
        work_seconds = seconds - run.tracking_seconds
        timings = {
            "stage_seconds": round(seconds, 3),
            # Throughput of the stage's own work; the tracking overhead is reported beside it.
            "images_per_second": round(run.images / work_seconds, 2) if run.images else 0.0,
            "tracking_seconds": round(run.tracking_seconds, 3),
            "peak_rss_mb": peak_rss_mb(),
        }
        mlflow.log_metrics(timings)
        fsio.write_json(paths.metrics_file(stage), {**run.metrics, **timings})
