"""tune stage: Keras Tuner over the cnn3v2 family -> the best hyperparameters, retrained, in data/models/tuned.

Each trial is a nested MLflow run, opened and closed by the tuner's own trial hooks (callbacks
given to `search` are deep-copied per trial, so they cannot hold a tracking handle). The tuner's
directory is a persistent DVC output holding one search, named by a key over everything a trial's score
depends on (search_key): an interrupted search resumes where it stopped; a search on other images, code
or params starts afresh, and the old one is removed.

With tune.workers > 0 the search uses Keras Tuner's own distributed mode: this process serves the
oracle (Keras Tuner's gRPC OracleServicer) and starts the workers, `python -m pipeline.stages.tune
--worker NAME --oracle HOST:PORT` (KERASTUNER_TUNER_ID / _ORACLE_IP / _ORACLE_PORT set from those),
which ask it for trials, run them and log them under this stage's MLflow run. Workers on other machines
join with the same command. The chief watches its own workers: one that dies gives its trial back.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np

from pipeline import cli, fsio, imageset, paths, tracking, training
from pipeline.errors import UserError
from pipeline.imageset import Split
from pipeline.models import cnn, layers, saved
from pipeline.params import Params, TuneParams, load_params
from pipeline.scores import scores
from pipeline.tracking import StageRun

log = logging.getLogger("tune")
MODEL_NAME = "tuned_cnn3v2"
_TUNERS = {"random": kt.RandomSearch, "hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization}
# A worker waits this long for the oracle to answer at start; then each call to it may take RPC_SECONDS
# (Keras Tuner's own default is an hour, which would leave a worker hanging long after its chief died).
CONNECT_SECONDS = 120
RPC_SECONDS = 60
POLL_SECONDS = 0.5
# The code a trial runs, part of the search's key: this module (the hypermodel, the trial's seeding), the
# model (cnn; layers: input resizing, augmentation), its training (training) and its input stream (imageset).
# Each is a dep of the stage in dvc.yaml.
TRIAL_CODE = (Path(__file__), *(Path(module.__file__) for module in (cnn, layers, training, imageset)))
# Augment keys only the augment stage reads (how many copies it stores, its batch, its preview): on-the-fly
# augmentation reads every other one, so a key added to the section is in the search's key by default.
AUGMENT_STAGE_ONLY = {"copies", "batch_size", "preview_images"}


def build_hypermodel(params: Params, num_classes: int) -> Any:
    """hp -> a compiled cnn3v2-family model, each hyperparameter drawn from tune.space."""
    space = params.tune.space

    def build(hp: kt.HyperParameters) -> keras.Model:
        family = cnn.Cnn3v2(
            filters=hp.Choice("filters", space.filters),
            kernel_size=hp.Choice("kernel_size", space.kernel_size),
            dropout=bool(hp.Choice("dropout", space.dropout)),
            dense_units=hp.Choice("dense_units", space.dense_units),
        )
        learning_rate = hp.Float("learning_rate", *space.learning_rate, sampling="log")
        model = cnn.classifier(MODEL_NAME, family.body, params.tune.image_size, num_classes)
        return training.compile_classifier(model, learning_rate, params.train)

    return build


class MlflowTrials:
    """Mixin for a keras-tuner Tuner: one nested MLflow run per trial, with its epochs and score."""

    def __init__(self, *args: Any, stage_run: StageRun, trial_seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage_run = stage_run
        self.trial_seed = trial_seed
        self._trial_run: ExitStack | None = None
        self.trials_run = 0  # trials this process ran (not those reloaded from an earlier search)
        self.epochs_run = 0
        self._epochs_before = 0

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_begin(trial)
        # Every trial's weights start from the same seeds, whichever worker runs it and after what.
        keras.utils.set_random_seed(self.trial_seed)
        self._epochs_before = self.epochs_run
        self._trial_run = ExitStack()
        self._trial_run.enter_context(
            self.stage_run.nested(f"trial_{trial.trial_id}", trial.hyperparameters.values, kind="trial")
        )

    def on_epoch_end(self, trial: Any, model: Any, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(trial, model, epoch, logs)
        self.epochs_run += 1
        self.stage_run.log_now({f"epoch_{k}": float(v) for k, v in (logs or {}).items()}, step=epoch + 1)

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_end(trial)  # the oracle records the score and saves its state
        # The oracle's copy: a worker's own trial object never receives the metrics it reported over gRPC.
        metrics = self.oracle.get_trial(trial.trial_id).metrics
        best = metrics.get_best_value("val_accuracy") if metrics.exists("val_accuracy") else None
        self.stage_run.set_tags({"trial.status": str(trial.status)})
        if best is not None:
            self.stage_run.log_now({"val_accuracy": float(best)})
        self.stage_run.log_now({"epochs": float(self.epochs_run - self._epochs_before)})
        self._close_trial_run(None, None, None)
        self.trials_run += 1

    def search(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().search(*args, **kwargs)
        except BaseException:  # an interrupted trial's run ends FAILED; the tuner's state resumes it
            self._close_trial_run(*sys.exc_info())
            raise

    def _close_trial_run(self, *exc_info: Any) -> None:
        if self._trial_run is not None:
            self._trial_run.__exit__(*exc_info)
            self._trial_run = None


def search_key(params: Params, data: str, code: str) -> str:
    """Names the tuner's project: a trial's score depends on exactly these, so the same key resumes and any
    change starts anew. `data` and `code` are data_fingerprint() and code_fingerprint()."""
    scope = {
        "seed": params.seed,
        "tune": params.tune.model_dump(exclude={"final_epochs", "workers", "oracle"}),  # who searches: not what
        "train": params.train.model_dump(exclude={"device"}),
        "augment": params.augment.model_dump(exclude=AUGMENT_STAGE_ONLY) if params.train.augment_on_the_fly else None,
        "data": data,
        "code": code,
    }
    return hashlib.sha256(json.dumps(scope, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(classes: list[str], train: Split, val: Split) -> str:
    """The examples the trials train and validate on, record by record: train as streamed (the augment
    stage's copies included when train.use_augmented), val, their shapes and the class names."""
    found = [(imageset.fingerprint(split, classes), list(split.shape)) for split in (train, val)]
    return hashlib.sha256(json.dumps(found).encode()).hexdigest()


def code_fingerprint() -> str:
    """The trial code's files and the versions of the libraries that run it."""
    import tensorflow as tf

    files = {path.name: fsio.file_digest(path) for path in TRIAL_CODE}
    versions = {"keras": keras.version(), "backend": keras.backend.backend(), "tensorflow": tf.__version__,
                "keras_tuner": kt.__version__}
    return hashlib.sha256(json.dumps([files, versions], sort_keys=True).encode()).hexdigest()


def make_tuner(params: Params, num_classes: int, project: str, run: StageRun) -> Any:
    settings = params.tune
    limits = {"max_epochs": settings.epochs} if settings.algorithm == "hyperband" else {"max_trials": settings.max_trials}
    tuner_class = type(f"Tracked{_TUNERS[settings.algorithm].__name__}", (MlflowTrials, _TUNERS[settings.algorithm]), {})
    return tuner_class(
        build_hypermodel(params, num_classes),
        objective="val_accuracy",
        seed=params.seed,
        directory=str(paths.TUNER),
        project_name=project,
        overwrite=False,
        stage_run=run,
        trial_seed=params.seed,
        max_retries_per_trial=1,  # a trial whose worker died (or that crashed) runs once more, then counts as failed
        # A failed trial (a configuration too large for memory, say) is a result, not the end of the search
        # (Keras Tuner's default stops at 3 in a row, with a traceback); none completed is best_completed's error.
        max_consecutive_failed_trials=sys.maxsize,
        **limits,
    )


def discard_other_searches(project: str) -> list[str]:
    """Remove every search in data/tuner but `project`: each was keyed on other inputs, so its trials say
    nothing about this one, and keeping them would grow the DVC output with every change."""
    if not paths.TUNER.is_dir():
        return []
    others = sorted(p for p in paths.TUNER.iterdir() if p.is_dir() and p.name != project)
    for folder in others:
        shutil.rmtree(folder)
    return [folder.name for folder in others]


def open_search(params: Params, num_classes: int, project: str, run: StageRun) -> Any:
    """The chief's tuner for search `project`: resumed where data/tuner holds it, else new, the others removed."""
    removed = discard_other_searches(project)
    tuner = make_tuner(params, num_classes, project, run)
    if tuner.oracle.trials:
        log.info("search %s resumes: %d trials already in data/tuner", project, len(tuner.oracle.trials))
    elif removed:
        log.info("search %s starts afresh; removed the searches on other data, code or params from data/tuner: %s",
                 project, ", ".join(removed))
    else:
        log.info("search %s starts afresh", project)
    return tuner


def failure_of(trial: Any) -> str:
    """The exception line of a failed trial's traceback: its last unindented line (TensorFlow's own messages
    end with indented graph-node lines)."""
    lines = [line for line in trial.message.splitlines() if line.strip() and not line[0].isspace()]
    return lines[-1] if lines else "no message"


def best_completed(oracle: Any, project: str) -> Any:
    """The completed trial with the best val accuracy; a UserError in one line when none completed."""
    best = oracle.get_best_trials(1)  # Keras Tuner pads the list with failed trials when too few completed
    if best and best[0].status == "COMPLETED":
        return best[0]
    failed = [trial for trial in oracle.trials.values() if trial.message]
    last = failure_of(failed[-1]) if failed else "no message"
    raise UserError(
        f"none of the search's {len(oracle.trials)} trials completed; the last failure: {last} (each trial's "
        f"message is in {paths.TUNER / project}/trial_*/trial.json)"
    )


def subset_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    """A stratified `fraction` of the train images (by row), to search on part of the data as the seed did.

    None keeps everything. Every class keeps at least one image, however few it has (scikit-learn's
    stratified split refuses a class of one). Augmented copies follow their source image in or out.
    """
    if fraction >= 1:
        return None
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep[rng.choice(rows, max(1, round(fraction * len(rows))), replace=False)] = True
    return keep


def search(tuner: Any, train: Split, val: Split, params: Params, keep: np.ndarray | None) -> None:
    on_the_fly = training.on_the_fly(params)
    tuner.search(
        training.train_stream(train, params.train, params.seed, keep=keep, **on_the_fly),
        validation_data=training.val_stream(val, params.train),
        epochs=params.tune.epochs,
        shuffle=False,  # the stream shuffles
        callbacks=training.plateau_callbacks(params.train),  # plain Keras callbacks: safe to deep-copy
        verbose=2,
    )


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def serve_oracle(oracle: Any, address: str) -> tuple[Any, str]:
    """Keras Tuner's own gRPC OracleServicer for `oracle` on HOST:PORT (port 0: any free one); returns the
    started server and the address workers dial. A port already taken is an error naming it."""
    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute.oracle_chief import OracleServicer

    host, port = split_address(address)
    # One thread, as Keras Tuner's chief has; no SO_REUSEPORT, so a port another process holds is refused.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[("grpc.so_reuseport", 0)])
    protos.get_service_grpc().add_OracleServicer_to_server(OracleServicer(oracle), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises or returns 0, depending on the version
        bound = 0
    if not bound:
        raise UserError(
            f"tune.oracle: cannot serve the tuner's oracle on {host}:{port}: port {port} is in use (another "
            "search's chief?) or the host is not this machine's; free the port or set tune.oracle to another"
        )
    server.start()
    return server, f"{host}:{bound}"


def wait_for_oracle(address: str, seconds: float) -> None:
    """Return once the chief's oracle accepts connections; after `seconds`, one line saying what to check."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=seconds)
        except grpc.FutureTimeoutError:
            raise UserError(
                f"no tuner oracle answered at {address} within {seconds:g} s: start the chief first (the tune "
                "stage with tune.workers or tune.oracle set) and check that this machine can reach that port"
            ) from None


def worker_command(name: str, address: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.stages.tune", "--worker", name, "--oracle", address]


def supervise(oracle: Any, workers: dict[str, subprocess.Popen], run: StageRun) -> list[str]:
    """Wait for the local workers to finish the search; returns what went wrong, one line each.

    A worker that exits while it holds a trial gives the trial back to the oracle as INVALID: another
    worker retries it (once; then it counts as FAILED), and its MLflow run is marked KILLED. Trials held by
    workers on other machines are waited for: the chief cannot see those processes.
    """
    import mlflow
    from keras_tuner.src.engine.trial import TrialStatus

    problems: list[str] = []
    waited_since = time.monotonic()
    while workers or oracle.ongoing_trials:
        for name, process in list(workers.items()):
            code = process.poll()
            if code is None:
                continue
            del workers[name]
            trial = oracle.ongoing_trials.get(name)
            if trial is None and code == 0:
                continue
            problem = f"tune worker {name} exited with code {code}"
            if trial is not None:
                trial.status = TrialStatus.INVALID
                trial.message = problem
                oracle.end_trial(trial)  # the oracle queues it for a retry, or marks it FAILED
                retried = trial.status == TrialStatus.INVALID
                problem += f" during trial {trial.trial_id}: " + (
                    "another worker retries it" if retried else "it failed (no retries left)"
                )
                with run.timed():
                    tracking.close_orphans(mlflow.MlflowClient(), mlflow.active_run().info.experiment_id)
            log.warning(problem)
            problems.append(problem)
        if not workers and oracle.ongoing_trials and time.monotonic() - waited_since > 60:
            held = ", ".join(f"trial {t.trial_id} on {name}" for name, t in oracle.ongoing_trials.items())
            log.info("waiting for workers on other machines: %s (Ctrl-C stops; the search resumes later)", held)
            waited_since = time.monotonic()
        time.sleep(POLL_SECONDS)
    return problems


def search_with_workers(tuner: Any, settings: TuneParams, run: StageRun) -> list[str]:
    """Serve the tuner's oracle and run `settings.workers` worker processes here until the search ends;
    returns the workers' failures that the search survived."""
    server, address = serve_oracle(tuner.oracle, settings.oracle or "127.0.0.1:0")
    run.set_tags({"tune.oracle": address, "tune.workers": str(settings.workers)})
    log.info("tuner oracle at %s; a worker elsewhere joins with: python %s", address,
             " ".join(worker_command("NAME", address)[1:]))
    host = socket.gethostname()
    workers = {}
    try:
        for i in range(settings.workers):
            name = f"{host}-w{i}"
            workers[name] = subprocess.Popen(worker_command(name, address))
        problems = supervise(tuner.oracle, workers, run)
    finally:
        for process in workers.values():  # the chief stopped early (Ctrl-C, an error): so do its workers
            process.terminate()
        for process in workers.values():
            process.wait()
        server.stop(grace=None)
    unfinished = [t.trial_id for t in tuner.oracle.trials.values() if t.status not in ("COMPLETED", "FAILED")]
    if problems and unfinished:
        raise UserError(
            f"the search stopped with trials {', '.join(unfinished)} unfinished ({'; '.join(problems)}): "
            "run the stage again to resume it"
        )
    if problems:
        run.set_tags({"tune.worker_problems": "; ".join(problems)[:5000]})
    return problems


def prepared(params: Params) -> tuple[list[str], Split, Split, np.ndarray | None, str]:
    """What chief and workers search on: classes, train, val, the subset searched, and the search's key."""
    classes, train, val = training.load_train_val(params)
    keep = subset_mask(imageset.load_split(paths.PREPARED, "train").labels, params.tune.subset, params.seed)
    return classes, train, val, keep, search_key(params, data_fingerprint(classes, train, val), code_fingerprint())


def trials_logged(run_id: str) -> list[Any]:
    """The finished trial runs nested under the stage run `run_id`, whoever ran them."""
    import mlflow

    runs = mlflow.search_runs(
        [mlflow.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", output_format="list"
    )
    return [r for r in runs if "trial" in r.data.tags and r.info.status == "FINISHED"]


@cli.stage("tune")
def main(params: Params, run: StageRun) -> None:
    import mlflow

    classes, train, val, keep, project = prepared(params)
    searched = params.train.on_the_fly_copies * imageset.streamed(train, keep)  # images per search epoch
    run.set_tags({"tune.project": project})  # before any worker starts: workers find this run by it
    tuner = open_search(params, len(classes), project, run)
    start = time.perf_counter()
    problems: list[str] = []
    if params.tune.workers:
        problems = search_with_workers(tuner, params.tune, run)
        with run.timed():
            logged = trials_logged(mlflow.active_run().info.run_id)
        tuner.trials_run = len(logged)
        tuner.epochs_run = int(sum(r.data.metrics.get("epochs", 0) for r in logged))
    else:
        search(tuner, train, val, params, keep)
    search_seconds = time.perf_counter() - start
    best_trial = best_completed(tuner.oracle, project)
    best_hp = best_trial.hyperparameters
    log.info("best of %d trials: %s (val accuracy %.4f)", len(tuner.oracle.trials), best_hp.values, best_trial.score)

    with run.nested(MODEL_NAME, {"model": MODEL_NAME, **best_hp.values, "epochs": params.tune.final_epochs}):
        keras.utils.set_random_seed(params.seed)
        model = tuner.hypermodel.build(best_hp)
        result = training.fit(
            model, train, val, settings=params.train, epochs=params.tune.final_epochs, run=run, seed=params.seed,
            **training.on_the_fly(params),
        )
        probabilities = training.predict(model, val, params.train.batch_size)
        final = {**scores(val.labels, probabilities, "val_"), **result.summary}
        run.log_now(final)
    with fsio.atomic_dir(paths.TUNED_MODELS) as out, fsio.atomic_dir(paths.CURVES / "tune") as curves:
        meta = saved.model_meta(
            MODEL_NAME, "tune", params, classes, hyperparameters=best_hp.values, parameters=model.count_params()
        )
        saved.save_keras(model, out, meta)
        training.write_curves(result.rows, curves / f"{MODEL_NAME}.json")

    run.images = result.images_seen + tuner.epochs_run * searched
    run.record({
        "search": {
            "trials": len(tuner.oracle.trials),
            "trials_run_now": tuner.trials_run,
            "workers": params.tune.workers,
            "worker_failures": len(problems),
            "searched_images": searched,
            "seconds": round(search_seconds, 3),
            "best_val_accuracy": round(float(best_trial.score), 4),
            "best": best_hp.values,
        },
        MODEL_NAME: final,
    })


def find_stage_run(project: str, experiment: str, seconds: float) -> str:
    """The chief's running tune stage run searching `project` (the same params and data/prepared as this
    worker's), waited for up to `seconds`."""
    import mlflow

    deadline = time.monotonic() + seconds
    while True:
        found = mlflow.search_runs(
            experiment_names=[experiment], output_format="list", max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"attributes.status = 'RUNNING' and tags.stage = 'tune' and tags.`tune.project` = '{project}'",
        )
        if found:
            return found[0].info.run_id
        if time.monotonic() > deadline:
            raise UserError(
                f"no running tune stage searches project {project} in {mlflow.get_tracking_uri()}: this worker's "
                "params.yaml and data/prepared must be the chief's, and MLFLOW_TRACKING_URI its tracking server"
            )
        time.sleep(1)


def work(name: str, address: str, connect_seconds: float) -> None:
    """One worker: run the trials the chief's oracle hands out, each a nested run under the chief's stage run."""
    import grpc
    import mlflow
    from keras_tuner.src.distribute import oracle_client

    from pipeline import device

    if "chief" in name:
        raise UserError(f"--worker {name!r}: Keras Tuner takes a name with 'chief' in it for the chief; choose another")
    params = load_params()
    info = device.configure_training(params.train)
    wait_for_oracle(address, connect_seconds)
    host, port = split_address(address)
    os.environ.update(KERASTUNER_TUNER_ID=name, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=str(port))
    oracle_client.TIMEOUT = RPC_SECONDS  # read at each call: Keras Tuner's own knob, an hour by default
    classes, train, val, keep, project = prepared(params)
    uri = tracking.tracking_uri(params)
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    run = StageRun("tune", parent_run_id=find_stage_run(project, params.mlflow.experiment, connect_seconds))
    run.tags = {**tracking.run_tags("tune", tracking.stage_params("tune", params), info), "tune.worker": name}
    tuner = make_tuner(params, len(classes), project, run)
    try:
        search(tuner, train, val, params, keep)
    except grpc.RpcError as exc:
        raise UserError(
            f"tune worker {name} lost the oracle at {address} ({exc.code().name}): the chief stopped or the "
            "network failed; the search resumes when the tune stage runs again"
        ) from None
    log.info("tune worker %s ran %d trials", name, tuner.trials_run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", metavar="NAME", help="run as a search worker with this name (unique per worker)")
    parser.add_argument("--oracle", metavar="HOST:PORT", help="the chief's oracle (default: tune.oracle)")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_SECONDS, metavar="SECONDS")
    args = parser.parse_args()
    if args.worker is None:
        main()
    else:
        def worker() -> None:
            address = args.oracle or load_params().tune.oracle
            if address is None:
                raise UserError("a tune worker needs the chief's oracle: --oracle HOST:PORT, or tune.oracle in params.yaml")
            work(args.worker, address, args.connect_timeout)

        cli.run(worker)
