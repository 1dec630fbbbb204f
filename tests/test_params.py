import copy
import subprocess
import sys

import pytest
import yaml

from pipeline.params import ParamsError, load_params, parse_checksum, validate

from .conftest import REPO


@pytest.fixture
def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def error_for(raw, change) -> str:
    changed = copy.deepcopy(raw)
    change(changed)
    with pytest.raises(ParamsError) as caught:
        validate(changed)
    return str(caught.value)


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert [m.path for m in params.data.spec.mirrors] == ["../shared/datasets/rps"]
    assert abs(sum(params.preprocess.splits.as_dict().values()) - 1) < 1e-9


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r["train"].update(device="gpux"), "train.device: Input should be 'auto', 'cpu' or 'gpu'; got 'gpux'"),
        (lambda r: r["preprocess"].update(imagesize=64), "preprocess.imagesize: unknown key; allowed here: image_size"),
        (lambda r: r.update(sede=1), "sede: unknown key; allowed here: seed, data"),
        (lambda r: r["data"]["datasets"]["rps"].update(mirror=[]), "data.datasets.rps.mirror: unknown key"),
        (lambda r: r["data"].update(dataset="mnist"), "data.dataset must be one of rps, cats_vs_dogs, dog_breeds, digits, cifar10; got 'mnist'"),
        (lambda r: r["preprocess"]["splits"].update(val=0.5), "preprocess.splits must add up to 1; got 1.35"),
        (lambda r: r["data"]["datasets"]["rps"].update(group_pattern="(["), "data.datasets.rps.group_pattern: not a valid regular expression"),
        (lambda r: r["data"]["datasets"]["rps"].update(group_pattern="shot"), "data.datasets.rps.group_pattern: needs one capture group"),
        (lambda r: r.update(seed=2**32), "seed: Input should be less than or equal to 4294967295; got 4294967296"),
        (lambda r: r["download"].update(max_compression_ratio=1), "download.max_compression_ratio: Input should be greater than 1"),
        (lambda r: r["preprocess"].update(image_size=4), "preprocess.image_size: Input should be greater than or equal to 8; got 4"),
        (lambda r: r["preprocess"].pop("resize"), "preprocess.resize: required key is missing"),
        (lambda r: r["baselines"].update(models=["mlp", "svm"]), "baselines.models.1: Input should be"),
        (lambda r: r["baselines"].update(models=["mlp", "mlp"]), "baselines.models: lists a model twice"),
        (lambda r: r["transfer"].update(image_size=32), "transfer.image_size: Input should be greater than or equal to 71"),
        (lambda r: r["transfer"].update(features_block="block14"), "transfer.features_block='block14' is not a block of xception (known: block4,"),
        (lambda r: r["transfer"].update(backbone="vgg16"), "transfer.features_block='block13' is not a block of vgg16 (known: none: only null)"),
        (lambda r: r["data"]["datasets"]["rps"].update(checksum="abc"), "data.datasets.rps.checksum: must be a sha256"),
    ],
)
def test_bad_values_name_the_key(raw, change, expected):
    assert expected in error_for(raw, change)


def test_every_problem_is_reported_at_once(raw):
    def two_typos(r):
        r["train"]["device"] = "tpu"
        r["augment"]["copies"] = -1

    message = error_for(raw, two_typos)
    assert "train.device" in message and "augment.copies" in message


def test_checksum_forms():
    assert parse_checksum("A" * 64) == ("sha256", "a" * 64)
    assert parse_checksum("md5:" + "0" * 32) == ("md5", "0" * 32)
    with pytest.raises(ValueError):
        parse_checksum("sha1:" + "0" * 40)


def test_a_stage_refuses_bad_params_before_any_work(tmp_path, raw):
    raw["train"]["device"] = "gpux"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.download"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "train.device: Input should be 'auto', 'cpu' or 'gpu'; got 'gpux'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlruns").exists()
