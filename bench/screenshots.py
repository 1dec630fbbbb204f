"""The README's two screenshots of the app, taken from a project's champion: run it after the default `dvc repro`.

    python -m bench.screenshots [--project DIR] [--out DIR]

Starts `python -m pipeline.app` (this checkout's code) in the project, so the app serves that project's
data/models/champion.keras, its metrics/leaderboard.json and its test split; clicks the test split's first photo
in headless chromium and saves the Classify tab, then the Leaderboard tab, as app_classify.png and
app_leaderboard.png in --out (default docs/ of this checkout). The steps are those tests/test_app.py checks.
Needs the app extra (Gradio, Playwright) and Debian's chromium.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import ROOT, free_port
from pipeline import paths

# Gradio imports and the champion's first prediction (graph tracing) come before the page answers.
START_SECONDS = 180
# One classification of a photo, TensorFlow warm.
CLASSIFY_MS = 60_000


def wait_for(url: str, server: subprocess.Popen, seconds: float) -> None:
    """Until url answers (the app is up); an error if the server exits or the time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not answer at {url} within {seconds} s")


def shoot(url: str, chromium: str, out: Path) -> None:
    """The two screenshots of the app at url."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url)
        page.get_by_text("Photos from the test split").wait_for()
        page.locator(".gallery-item").first.click()  # a test photo: the champion never trained on it
        expect(page.locator("#verdict")).to_contain_text("classified in", timeout=CLASSIFY_MS)
        page.screenshot(path=out / "app_classify.png")
        page.get_by_role("tab", name="Leaderboard").click()
        expect(page.get_by_text(re.compile(r"^How .+ fails"))).to_be_visible()
        page.screenshot(path=out / "app_leaderboard.png", full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="where `dvc repro` ran (default: this checkout)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    if not (project / paths.CHAMPION).is_file():
        print(f"error: no {paths.CHAMPION} in {project}: run `dvc repro` there first", file=sys.stderr)
        return 2
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no chromium on PATH (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.app", "--port", str(port)], cwd=project,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, server, START_SECONDS)
        shoot(url, chromium, args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out / 'app_classify.png'} and {args.out / 'app_leaderboard.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
