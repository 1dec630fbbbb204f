"""Typed, validated params: the one place that knows what params.yaml may hold.

Every stage calls `load_params()` before doing any work, so a typo or a bad value fails fast
with a message naming the key (`train.device: ...`), never deep inside a stage.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from pipeline import trace
from pipeline.errors import UserError
from pipeline.models.catalog import BACKBONES

SPLITS = ("train", "val", "test")
ResizeMode = Literal["stretch", "pad", "center_crop"]  # how pipeline/images.py fits a photo into a square
BASELINE_MODELS = ("random_forest", "logistic", "mlp", "mnist_cnn", "cnn3_small", "cnn1", "cnn3", "cnn3v2")


class ParamsError(UserError):
    """params.yaml is missing, unreadable or invalid."""


class Section(BaseModel):
    """A mapping of params.yaml. Reading a key is reported to pipeline/trace.py, which holds each stage's
    reads against its `params:` in dvc.yaml (tests/test_dvc_deps.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _key: str | None = PrivateAttr(None)  # where it sits in params.yaml ("train", "" the root); None: untraced

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if trace.recording() and name in type(self).model_fields and not _holds_sections(value):
            key = self._key
            if key is not None:
                trace.param_read(f"{key}.{name}" if key else name)
        return value

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        dumped = super().model_dump(**kwargs)
        if trace.recording() and self._key is not None:
            trace.params_read(self._key, dumped)
        return dumped

    def place(self, key: str) -> None:
        """Name this section and those below it by their params.yaml keys, for the read trace."""
        self._key = key
        for name in type(self).model_fields:
            value = super().__getattribute__(name)
            inner = f"{key}.{name}" if key else name
            if isinstance(value, Section):
                value.place(inner)
            elif isinstance(value, dict) and _holds_sections(value):  # data.datasets: one section per name
                for item, section in value.items():
                    section.place(f"{inner}.{item}")


def _holds_sections(value: Any) -> bool:
    """A section, or a mapping of them: its reads are recorded key by key below it, not as a whole."""
    return isinstance(value, Section) or (
        isinstance(value, dict) and bool(value) and all(isinstance(v, Section) for v in value.values())
    )


def _relative_subdir(value: str | None) -> str | None:
    """A folder inside an archive: relative, '/'-separated, no '..'; trailing '/' dropped."""
    if value is None:
        return None
    parts = value.strip("/").split("/") if not value.startswith("/") else []
    if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in value:
        raise ValueError(f"must be a relative folder inside the archive, such as 'name-1.0/train'; got {value!r}")
    return "/".join(parts)


class ArchiveSettings(Section):
    """How to read an archive: its checksum and the class-per-folder folder inside it."""

    checksum: str | None = Field(None, description="sha256 hex, or 'sha256:HEX' / 'md5:HEX', of an archive")
    subdir: str | None = Field(None, description="class-per-folder directory inside the archive")

    @field_validator("checksum")
    @classmethod
    def _checksum_form(cls, value: str | None) -> str | None:
        if value is not None:
            parse_checksum(value)
        return value

    @field_validator("subdir")
    @classmethod
    def _subdir_form(cls, value: str | None) -> str | None:
        return _relative_subdir(value)


class MirrorSpec(ArchiveSettings):
    """A local copy of a dataset, tried before its source: a directory or an archive.

    In params.yaml a mirror is a path string, or a mapping {path, checksum, subdir} for an archive
    packed differently from the origin. A key the mapping leaves out is the dataset's own (a plain
    string leaves out both: the mirror is a byte-identical copy of the origin); null means none.
    """

    path: str = Field(min_length=1, description="local directory or .zip/.tar/.tar.gz, relative to the project")

    @model_validator(mode="before")
    @classmethod
    def _plain_path(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"path": value}
        if not isinstance(value, (dict, MirrorSpec)):
            raise ValueError(f"a mirror is a path or a mapping {{path, checksum, subdir}}; got {value!r}")
        return value

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Dump as written (a string stays a string; keys left out stay out), so a dump re-validates alike."""
        dumped = handler(self)
        if self.model_fields_set == {"path"}:
            return dumped["path"]
        return {key: value for key, value in dumped.items() if key in self.model_fields_set}

    @field_validator("path")
    @classmethod
    def _local(cls, value: str) -> str:
        if "://" in value or value.startswith(("sklearn:", "tfds:")):
            raise ValueError(f"a mirror is a local directory or archive path (put URLs in source); got {value!r}")
        return value

    def own(self, key: str) -> bool:
        """Whether this mirror gives `key` (checksum, subdir) itself rather than taking the dataset's."""
        return key in self.model_fields_set


class DatasetSpec(ArchiveSettings):
    source: str = Field(min_length=1, description="directory, archive path/URL, sklearn:digits or tfds:NAME")
    mirrors: list[MirrorSpec] = Field(
        default_factory=list, description="local copies tried before the source: a path, or {path, checksum, subdir}"
    )
    group_pattern: str | None = Field(
        None, description="regex on the file name, group 1 names the shot (frames of a burst); null = every file its own"
    )

    @field_validator("group_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compiled = re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc}); got {value!r}") from None
            if compiled.groups < 1:
                raise ValueError("needs one capture group naming the shot, e.g. '^(.+?)(?:_\\d+)?\\.\\w+$'")
        return value

    def archive_settings(self, mirror: MirrorSpec | None = None) -> tuple[str | None, str | None]:
        """(checksum, subdir) that apply to the source, or to `mirror`: its own where it gives them."""
        if mirror is None:
            return self.checksum, self.subdir
        return (
            mirror.checksum if mirror.own("checksum") else self.checksum,
            mirror.subdir if mirror.own("subdir") else self.subdir,
        )


class DataParams(Section):
    dataset: str
    datasets: dict[str, DatasetSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _dataset_known(self) -> DataParams:
        if self.dataset not in self.datasets:
            raise ValueError(f"data.dataset must be one of {', '.join(self.datasets)}; got {self.dataset!r}")
        return self

    @property
    def spec(self) -> DatasetSpec:
        return self.datasets[self.dataset]


class DownloadParams(Section):
    """Bounds on what the download stage accepts from servers and archives it does not control."""

    max_download_bytes: int = Field(gt=0, description="largest HTTP body accepted, announced or not")
    max_extracted_bytes: int = Field(gt=0, description="largest total of an archive's member sizes")
    max_members: int = Field(gt=0, description="most entries (files and folders) an archive may hold")
    max_compression_ratio: float = Field(
        gt=1, description="extracted bytes / archive bytes above which an archive is a bomb (checked past 100 MB)"
    )
    stall_seconds: float = Field(gt=0, description="window over which a download must average min_bytes_per_second")
    min_bytes_per_second: int = Field(ge=1)
    deadline_seconds: float = Field(gt=0, description="one file's download, all attempts and waits together")
    retries: int = Field(ge=0, le=20, description="attempts after the first for a broken or stalled transfer")


class SplitFractions(Section):
    train: float = Field(gt=0, lt=1)
    val: float = Field(ge=0, lt=1)
    test: float = Field(ge=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1) > 1e-6:
            raise ValueError(f"preprocess.splits must add up to 1; got {total:g}")
        return self

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SPLITS}


class PreprocessParams(Section):
    image_size: int = Field(ge=8, le=1024)
    resize: ResizeMode
    min_size: int = Field(ge=1, description="shorter side, in px, below which an image is quarantined")
    max_pixels: int = Field(gt=0, description="width*height above which a file is a decompression bomb")
    splits: SplitFractions
    min_per_class: int = Field(ge=1, description="classes with fewer good images are dropped with a warning")
    workers: int = Field(ge=0, description="decoding processes; 0 = auto (one per core from 4,000 files)")


class AugmentParams(Section):
    copies: int = Field(ge=0, le=50, description="augmented copies per train image; 0 = off")
    flip: Literal["horizontal", "vertical", "horizontal_and_vertical", "none"]
    rotation: float = Field(ge=0, le=0.5, description="max rotation, fraction of a full turn")
    zoom: float = Field(ge=0, lt=1)
    translation: float = Field(ge=0, lt=1)
    contrast: float = Field(ge=0, lt=1)
    batch_size: int = Field(ge=1)
    preview_images: int = Field(ge=1, le=32)


class TrainParams(Section):
    device: Literal["auto", "cpu", "gpu"]
    mixed_precision: bool = Field(description="float16 compute; GPU only")
    xla: bool = Field(description="jit_compile models; GPU only")
    deterministic: bool = Field(description="TensorFlow op determinism: a re-run on the same machine repeats every weight")
    batch_size: int = Field(ge=1)
    early_stopping_patience: int = Field(ge=0, description="0 = off")
    reduce_lr_patience: int = Field(ge=0, description="0 = off")
    reduce_lr_factor: float = Field(gt=0, lt=1)
    use_augmented: bool = Field(description="add the augment stage's copies to the train split")
    augment_on_the_fly: bool = Field(description="random augmentation in the training stream (tf.data, CPU)")
    on_the_fly_copies: int = Field(
        ge=1, le=100, description="with augment_on_the_fly: times each train image is streamed per epoch"
    )
    strategy: Literal["auto", "none", "mirrored", "multi_worker"] = Field(
        description="tf.distribute: auto = mirrored over the GPUs when more than one is visible"
    )

    @model_validator(mode="after")
    def _copies_need_augmentation(self) -> TrainParams:
        if self.on_the_fly_copies > 1 and not self.augment_on_the_fly:
            raise ValueError(
                "train.on_the_fly_copies > 1 repeats identical images unless train.augment_on_the_fly is true"
            )
        return self


class BaselinesParams(Section):
    models: list[Literal[BASELINE_MODELS]] = Field(min_length=1)  # type: ignore[valid-type]
    epochs: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    pixels_size: int = Field(ge=4, description="side of the downscaled image fed to scikit-learn models")
    normalize: bool = Field(description="Keras baselines scale pixels by 1/255; false feeds raw 0-255 values")
    forest_trees: int = Field(ge=1)
    forest_max_leaf_nodes: int | None = Field(
        ge=2,
        description="most leaves per tree of the random forest (grown best-first): the forest then holds at most "
        "forest_trees x (2 x leaves - 1) nodes whatever the number of training images, and so do its memory and "
        "its .skops/.onnx files. null grows every tree to purity: all of them grow with the training set. "
        "Chosen by validation accuracy (bench/forest_bound.py)",
    )

    @field_validator("models")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a model twice; got {value}")
        return value


class SearchSpace(Section):
    """The cnn3v2 family's hyperparameters: choices, and a log-uniform learning-rate range."""

    filters: list[int] = Field(min_length=1, description="first block's filters; the next two double it")
    kernel_size: list[int] = Field(min_length=1)
    dropout: list[bool] = Field(min_length=1, description="dropout 0.5 after the dense layer")
    dense_units: list[int] = Field(min_length=1)
    learning_rate: tuple[float, float] = Field(description="[low, high], sampled log-uniformly")

    @field_validator("filters", "kernel_size", "dense_units")
    @classmethod
    def _positive_unique(cls, value: list[int]) -> list[int]:
        if min(value) < 1 or len(set(value)) != len(value):
            raise ValueError(f"needs distinct positive values; got {value}")
        return value

    @field_validator("learning_rate")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] < value[1]:
            raise ValueError(f"needs 0 < low < high; got {list(value)}")
        return value


class TuneParams(Section):
    algorithm: Literal["random", "hyperband", "bayesian"]
    max_trials: int = Field(ge=1)
    epochs: int = Field(ge=1)
    subset: float = Field(gt=0, le=1, description="fraction of the train split used while searching")
    image_size: int = Field(ge=16, le=1024, description="side the searched models resize their input to")
    final_epochs: int = Field(ge=1, description="epochs when the best hyperparameters are retrained")
    space: SearchSpace
    workers: int = Field(ge=0, le=64, description="worker processes on this machine; 0 = the search runs in the stage's process")
    oracle: str | None = Field(
        None, description="HOST:PORT the chief serves its oracle on (workers elsewhere dial it); null = 127.0.0.1, any port"
    )

    @field_validator("oracle")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"must be HOST:PORT with a port in 1-65535, such as '10.0.0.5:8470'; got {value!r}")
        return value


class TransferParams(Section):
    backbone: Literal[tuple(BACKBONES)]  # type: ignore[valid-type]
    weights: str = Field(min_length=1, description="imagenet, none, or a path to a weights file")
    weights_mirrors: dict[str, list[MirrorSpec]] = Field(
        default_factory=dict,
        description="backbone -> local copies of its ImageNet weights, tried first: a path (a copy of Keras' own "
        "file, checked against the backbone table's checksum) or {path, checksum} (another file, its own checksum)",
    )
    image_size: int = Field(ge=71, le=1024)
    features_block: str | None = Field(description="the backbone block whose output is pooled; null = its last")
    dropout: float = Field(ge=0, lt=1)
    epochs: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    fine_tune_epochs: int = Field(ge=0)
    fine_tune_layers: int = Field(ge=0)
    fine_tune_learning_rate: float = Field(gt=0)

    @field_validator("weights_mirrors")
    @classmethod
    def _files_have_no_subdir(cls, value: dict[str, list[MirrorSpec]]) -> dict[str, list[MirrorSpec]]:
        if any(mirror.own("subdir") for mirrors in value.values() for mirror in mirrors):
            raise ValueError("a weights mirror is one file: it has a path and a checksum, no subdir")
        return value

    @model_validator(mode="after")
    def _known_block(self) -> TransferParams:
        blocks = BACKBONES[self.backbone].blocks
        if self.features_block is not None and self.features_block not in blocks:
            known = ", ".join(blocks) if blocks else "none: only null"
            raise ValueError(
                f"transfer.features_block={self.features_block!r} is not a block of {self.backbone} (known: {known})"
            )
        return self


class EvaluateParams(Section):
    top_k: int = Field(ge=1)
    confused_pairs: int = Field(ge=0)
    registered_model: str = Field(min_length=1)


class MlflowParams(Section):
    tracking_uri: str | None = Field(description="null = sqlite store under <project>/mlruns")
    experiment: str = Field(min_length=1)


class Params(Section):
    seed: int = Field(ge=0, le=2**32 - 1, description="numpy, TensorFlow and Keras take 32-bit seeds")
    data: DataParams
    download: DownloadParams
    preprocess: PreprocessParams
    augment: AugmentParams
    train: TrainParams
    baselines: BaselinesParams
    tune: TuneParams
    transfer: TransferParams
    evaluate: EvaluateParams
    mlflow: MlflowParams

    @model_validator(mode="after")
    def _one_kind_of_distribution(self) -> Params:
        # Keras Tuner's workers each run whole trials; multi_worker spreads one fit over TF_CONFIG's processes.
        if self.tune.workers and self.train.strategy == "multi_worker":
            raise ValueError(
                "tune.workers > 0 runs each trial in one worker process, train.strategy=multi_worker spreads one fit "
                "over several: set tune.workers to 0 or train.strategy to another value"
            )
        return self


def parse_checksum(value: str) -> tuple[str, str]:
    """'HEX' (sha256), 'sha256:HEX' or 'md5:HEX' -> (algorithm, lowercase hex)."""
    algo, _, digest = value.rpartition(":")
    algo = algo or "sha256"
    lengths = {"sha256": 64, "md5": 32}
    if algo not in lengths or not re.fullmatch(f"[0-9a-fA-F]{{{lengths[algo]}}}", digest):
        raise ValueError(f"must be a sha256 hex digest, 'sha256:HEX' or 'md5:HEX'; got {value!r}")
    return algo, digest.lower()


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at `loc` may hold, to list them beside an unknown one."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:  # a dict key such as a dataset's name: the value type is one level down
            continue
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        nested = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(Params, error["loc"][:-1])
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # our own validators: complete sentences, some naming the key
        # A check across sections (the root: no key) names its keys itself.
        return message if not key or message.startswith((f"{key} ", f"{key}.")) else f"{key}: {message}"
    return f"{key}: {message}; got {error['input']!r}"


def validate(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors(include_url=False)]
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None
    params.place("")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the project root)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return validate(raw, str(path))
