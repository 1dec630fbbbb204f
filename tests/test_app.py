"""The Gradio app: its core on real files, and the page in headless chromium with a real upload."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import keras
import mlflow
import pytest

from pipeline import app, paths, predict, serving
from pipeline.models import cnn, saved

from .conftest import REPO, SHARED, free_port, wait_for, write_image

CLASSES = ["paper", "rock", "scissors"]
SCREENSHOTS = REPO / "reports" / "screenshots"


def photos(folder: Path) -> dict[str, list[Path]]:
    """Two photos per class: the rps mirror's, when present, else generated ones."""
    rps = SHARED / "datasets" / "rps"
    if rps.is_dir():
        return {c: sorted((rps / c).glob("*.jpg"))[:2] for c in CLASSES}
    return {c: [write_image(folder / c / f"{c}{i}.jpg", size=(120, 90), seed=10 * n + i) for i in range(2)]
            for n, c in enumerate(CLASSES)}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """What evaluate leaves in a project: the champion and its .json, the leaderboard, the champion's reports,
    and the prepared test split's manifest beside data/raw.tar (the examples' originals)."""
    root = tmp_path_factory.mktemp("project")
    keras.utils.set_random_seed(0)
    network = cnn.build("cnn3v2", image_size=32, pixels_size=16, num_classes=len(CLASSES))
    meta = {"name": "champion", "stage": "baselines", "dataset": "rps", "classes": CLASSES, "image_size": 32,
            "resize": "stretch", "min_size": 16, "champion_of": "tiny_cnn"}
    (root / paths.MODELS).mkdir(parents=True)
    saved.save_keras(network, root / paths.MODELS, meta)
    (root / paths.METRICS).mkdir()
    rows = [{"model": "tiny_cnn", "stage": "baselines", "val_accuracy": 0.9, "test_accuracy": 0.8125, "test_ci_low": 0.7,
             "test_ci_high": 0.9, "test_f1": 0.8, "inference_ms_per_image": 1.5},
            {"model": "random_forest", "stage": "baselines", "val_accuracy": 0.7, "test_accuracy": 0.6, "test_ci_low": 0.5,
             "test_ci_high": 0.7, "test_f1": 0.6, "inference_ms_per_image": 1.1}]
    (root / paths.LEADERBOARD).write_text(json.dumps(rows))
    report = root / paths.EVALUATION / "tiny_cnn"
    report.mkdir(parents=True)
    (report / "report.json").write_text(json.dumps({"confused_pairs": [{"true": "rock", "predicted": "paper", "count": 7}]}))
    write_image(report / "confusion.png", size=(200, 200), seed=1)
    write_image(report / "confused_pairs.png", size=(300, 100), seed=2)

    files = photos(root / "photos")
    entries = []
    with tarfile.open(root / paths.RAW, "w") as tar:
        for c, found in files.items():
            for row, path in enumerate(found):
                tar.add(path, arcname=f"{c}/{path.name}")
                entries.append({"path": f"{c}/{path.name}", "class": c, "split": "test" if row == 0 else "train", "row": row})
    (root / paths.PREPARED).mkdir()
    (root / paths.PREPARED / "manifest.json").write_text(json.dumps({"files": entries}))
    return root


@pytest.fixture
def inside(project, monkeypatch) -> Path:
    monkeypatch.chdir(project)
    return project


def test_classify_answers_as_predict_and_refuses_as_preprocess(inside, tmp_path):
    champion = app.load_file(paths.CHAMPION)
    photo = photos(tmp_path)["rock"][0]
    [line] = predict.predict_files(champion.model, [photo], k=app.TOP_K)
    ranked, verdict = app.classify(champion, photo)
    assert ranked == {e["label"]: e["probability"] for e in line["top_k"]}
    assert verdict.startswith(f"**{line['label']}** (") and "classified in" in verdict

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(photo.read_bytes()[:300])
    small = write_image(tmp_path / "small.png", size=(12, 30))
    (tmp_path / "empty.jpg").touch()
    for bad, reason in [(corrupt, "truncated"), (small, "too small: 12x30, shorter side < min_size 16"),
                        (tmp_path / "empty.jpg", "empty file (0 bytes)")]:
        assert app.classify(champion, bad) == (None, f"**Refused:** {next(predict.predict_files(champion.model, [bad], 1))['error']}")
        assert reason in app.classify(champion, bad)[1]


def test_the_champion_is_described_with_its_test_score_and_failures(inside):
    champion = app.load_file(paths.CHAMPION)
    assert champion.name == "tiny_cnn" and champion.interval == (0.7, 0.9)
    assert app.describe(champion).startswith("**tiny_cnn** on **rps**, test accuracy 81.2% (95% interval 70.0%-90.0%)")
    confusion, pairs, text = app.failures(champion)
    assert confusion.is_file() and pairs.is_file()
    assert "**rock** taken for **paper**: 7 test images" in text
    assert [row[0] for row in app.leaderboard_rows()] == ["tiny_cnn", "random_forest"]


def test_examples_are_the_test_splits_original_photos(inside, tmp_path):
    found = app.example_files(tmp_path)
    originals = {c: files[0] for c, files in photos(tmp_path / "again").items()}
    assert [p.name for p in found] == sorted(f"{c}-{originals[c].name}" for c in CLASSES)
    for path in found:
        assert path.read_bytes() == originals[path.name.split("-", 1)[0]].read_bytes()


def test_a_registered_champion_loads_with_its_tags(inside, monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(paths, "PARAMS", tmp_path / "absent.yaml")  # the store comes from the environment
    model = saved.load(paths.CHAMPION)
    with mlflow.start_run():
        info = serving.log_model(model, photos(tmp_path)["paper"][0].read_bytes(), registered_model_name="clf-rps")
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for key, value in {"model": "tiny_cnn", "dataset": "rps", "test_accuracy": "0.8125", "test_accuracy_ci": "0.7-0.9"}.items():
        client.set_model_version_tag("clf-rps", version, key, value)
    client.set_registered_model_alias("clf-rps", "champion", version)

    champion = app.load_registered("clf-rps")
    assert (champion.name, champion.dataset, champion.test_accuracy, champion.interval) == ("tiny_cnn", "rps", 0.8125, (0.7, 0.9))
    assert champion.source == "models:/clf-rps@champion (version 1)"
    photo = photos(tmp_path)["rock"][0]
    assert app.classify(champion, photo)[0] == app.classify(app.load_file(paths.CHAMPION), photo)[0]


def browser_or_skip() -> tuple[str, object]:
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install -c constraints.txt -e '.[app]'")
    playwright = pytest.importorskip("playwright.sync_api", reason="the app extra is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here (Debian: apt-get install -y chromium)")
    return chromium, playwright


def test_upload_a_photo_in_a_browser_and_read_the_label(project, tmp_path):
    """The app as a user starts it, in the project; headless chromium uploads a real test photo and a corrupt
    file through the page, clicks an example, opens the leaderboard; screenshots go to reports/screenshots/."""
    chromium, playwright = browser_or_skip()
    photo = photos(tmp_path)["scissors"][0]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(photo.read_bytes()[:300])
    model = saved.load(project / paths.CHAMPION)
    expected, refused = predict.predict_files(model, [photo, corrupt], k=app.TOP_K)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.app", "--port", str(port)], cwd=project,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/", server, seconds=180)
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})

            def upload(path: Path) -> str:
                page.goto(f"http://127.0.0.1:{port}/")
                page.set_input_files("input[type=file]", str(path))
                playwright.expect(page.locator("#verdict")).to_contain_text(re.compile("classified in|Refused"), timeout=60_000)
                return page.inner_text("#verdict")

            assert upload(photo).startswith(f"{expected['label']} (")
            assert page.inner_text("#labels").splitlines()[1] == expected["label"]  # the label's heading
            assert "tiny_cnn on rps, test accuracy 81.2% (95% interval 70.0%-90.0%)" in page.inner_text("body")
            page.screenshot(path=SCREENSHOTS / "app_classify.png")

            assert upload(corrupt) == f"Refused: {refused['error']}"

            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text("Photos from the test split").wait_for()
            page.locator(".gallery-item").first.click()  # the first example's thumbnail
            playwright.expect(page.locator("#verdict")).to_contain_text("classified in", timeout=60_000)

            page.get_by_role("tab", name="Leaderboard").click()
            playwright.expect(page.get_by_text("How tiny_cnn fails")).to_be_visible()
            body = page.inner_text("body")
            assert "random_forest" in body and "rock taken for paper: 7 test images" in body
            page.screenshot(path=SCREENSHOTS / "app_leaderboard.png", full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert (SCREENSHOTS / "app_classify.png").stat().st_size > 10_000
