"""Every file the stages exchange, relative to the project root (DVC runs each stage from there)."""
from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
DVC_YAML = Path("dvc.yaml")
DVC_LOCK = Path("dvc.lock")

DATA = Path("data")
SOURCE = DATA / "source.json"           # source: a fingerprint of the dataset's local files (download's dependency)
RAW = DATA / "raw.tar"                  # download: one uncompressed tar, members <class>/<file>
RAW_MANIFEST = DATA / "raw.json"        # download: members (bytes, sha256, offset), class counts, who served them
WEIGHTS = DATA / "weights"              # download: backbone weights + weights.json
DOWNLOADS = DATA / ".downloads"         # not a DVC output: partial downloads survive for resuming
PREPARED = DATA / "prepared"            # preprocess: one image set (see imageset.py)
AUGMENTED = DATA / "augmented"          # augment: the train split's augmented copies
MODELS = DATA / "models"                # one directory per model stage, plus the champion
BASELINE_MODELS = MODELS / "baselines"  # baselines: <name>.keras|.skops + <name>.json
TUNED_MODELS = MODELS / "tuned"         # tune: the best hyperparameters, retrained
TRANSFER_MODELS = MODELS / "transfer"   # transfer: the exported backbone + head
CHAMPION = MODELS / "champion.keras"    # evaluate: a copy of the best Keras model (+ champion.json)
TUNER = DATA / "tuner"                  # tune: keras-tuner's trials (persisted, so a search resumes)
FEATURES = DATA / "features"            # features: the frozen backbone's pooled features per split

METRICS = Path("metrics")               # metrics/<stage>.json, one per stage (DVC metrics)
REPORTS = Path("reports")
QUARANTINE = REPORTS / "quarantine.json"
AUGMENT_PREVIEW = REPORTS / "augment_preview.png"
CURVES = REPORTS / "curves"             # <stage>/<model>.json learning curves (DVC plots)
EVALUATION = REPORTS / "evaluate"       # per-model confusion PNG, confused pairs, class report
PREDICTIONS = REPORTS / "predictions"   # <model>.json actual/predicted rows (DVC confusion plots)
LEADERBOARD_MD = REPORTS / "leaderboard.md"
LEADERBOARD = METRICS / "leaderboard.json"

MLRUNS = Path("mlruns")                 # MLflow: mlflow.db + artifacts/
TEAM_STACK = Path(".team-stack")         # scripts/team-stack: PostgreSQL cluster, MLflow artifacts, DVC remote


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def workspace_root(start: Path | None = None) -> Path:
    """The user's project directory, also when DVC runs us in a temporary copy.

    `dvc exp run --temp/--queue` runs stages inside `<project>/.dvc/tmp/exps/<run>/`, which is
    deleted afterwards: tracking stores and relative mirror paths must resolve against <project>.
    """
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def resolve_local(path: str | Path, root: Path | None = None) -> Path:
    """A user-given local path (a mirror, a weights file): relative ones are relative to the project."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (root or workspace_root()) / path
