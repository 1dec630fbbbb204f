"""Every figure in README, RESULTS and bench/README is rendered from a committed file (bench/docs.py)."""
import json
import subprocess
import sys

import pytest

from bench import docs

from .conftest import REPO


@pytest.fixture
def sources(tmp_path) -> docs.Sources:
    """A git checkout holding one committed metrics file, one results file and one uncommitted file."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(
        {"champion_test_accuracy": 0.8639, "seconds_by_stage": {"download": 6.5, "features": 197.7}, "stage_seconds": 28.5}))
    experiments = [{"name": f"rps-s{seed}", "rev": "abc", "params": {"params.yaml": {"data": {"seed": seed}}},
                    "metrics": {"metrics/evaluate.json": {"data": {"test_accuracy": {"cnn3_small": accuracy}}}},
                    "leaderboard": [{"model": "cnn3_small", "test_f1": accuracy - 0.01}]}
                   for seed, accuracy in [(1, 0.623), (2, 0.635), (3, 0.639)]]
    (tmp_path / "results" / "rps.json").write_text(json.dumps({"source": "test", "experiments": experiments}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "metrics", "results"], cwd=tmp_path, check=True)
    (tmp_path / "metrics" / "new.json").write_text('{"seconds": 1.0}')
    return docs.Sources(tmp_path)


@pytest.mark.parametrize("spec, rendered", [
    ("metrics/evaluate.json:champion_test_accuracy:pct1", "86.4%"),
    ("metrics/evaluate.json:seconds_by_stage,stage_seconds:dur:sum", "3 min 53 s"),
    ("metrics/evaluate.json:seconds_by_stage.features:s1", "197.7 s"),
    ("results/rps.json:rps-s1,rps-s2,rps-s3.evaluate.test_accuracy.cnn3_small:pct1:mean_sd_values", "63.2 ± 0.8% (62.3, 63.5, 63.9)"),
    ("results/rps.json:rps-s1,rps-s2,rps-s3.evaluate.test_accuracy.cnn3_small:pct1:range", "62.3-63.9%"),
    ("results/rps.json:rps-s1,rps-s3.evaluate.test_accuracy.cnn3_small:pts1:diff", "1.6"),
    ("results/rps.json:rps-s1,rps-s3.evaluate.test_accuracy.cnn3_small:x3:ratio", "1.026×"),
    ("results/rps.json:rps-s2.leaderboard.cnn3_small.test_f1:num3", "0.625"),
    ("results/rps.json:rps-s1,rps-s2.params.seed:num0:slash", "1 / 2"),
])
def test_a_spec_renders_its_files_value(sources, spec, rendered):
    assert docs.expected(spec, sources) == rendered


@pytest.mark.parametrize("spec, error", [
    ("metrics/new.json:seconds:s1", "not a committed file"),
    ("params.yaml:seed:num0", "neither FILE:PATH"),
    ("README.json:x:num0", "figures come from"),
    ("metrics/evaluate.json:champion_test_acuracy:pct1", "no 'champion_test_acuracy'"),
    ("metrics/evaluate.json:champion_test_accuracy:percent", "unknown format"),
    ("results/rps.json:rps-s1,rps-s2.evaluate.test_accuracy.cnn3_small:pct1", "2 values need a STAT"),
])
def test_a_spec_that_names_nothing_is_an_error(sources, spec, error):
    with pytest.raises(docs.FigureError, match=error):
        docs.expected(spec, sources)


def test_the_repository_docs_match_their_files():
    """The check the suite keeps: no figure differs from its file, none is typed by hand."""
    done = subprocess.run([sys.executable, "-m", "bench.docs", "--check"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_figure_edited_by_hand_in_results_fails_and_rendering_restores_it():
    sources = docs.Sources(REPO)
    text = (REPO / "RESULTS.md").read_text()
    marker = next(docs.markers(text))
    edited = text[:marker.start] + "99.9%" + text[marker.end:]
    line = docs.line_of(text, marker.start)
    assert docs.problems("RESULTS.md", edited, sources) == [
        f"RESULTS.md:{line}: <!--fig {marker.spec}-->: expected {marker.found!r}, found '99.9%'"]
    assert docs.render(edited, sources) == text


@pytest.mark.parametrize("typed", ["took 12.5 s", "at 830 images/s", "peaked at 2.71 GB", "is 10.4× faster", "fell to 42.4%",
                                   "in 9 min 3 s", "2 workers took 1.38× longer", "uses 0.67-0.72 s"])
def test_a_measured_figure_typed_by_hand_fails(sources, typed):
    found = docs.problems("README.md", f"# Title\n\nThe stage {typed} here.\n", sources)
    assert found and all(problem.startswith("README.md:3: ") and "typed by hand" in problem for problem in found)


@pytest.mark.parametrize("text", [
    "`dvc repro` took `12.5 s` in code\n",
    "```\nfeatures 197.7 s\n```\n",
    "a 95% shot-level bootstrap interval\n",
    "target ≤ 2 s, speedup ≥ 5×\n",
    "| seed | 3-conv CNN | 94.23% (477 s training) |\n",
    "| `download.max_download_bytes` | largest body (default 20 GB) |\n",
    "images of 32×32 pixels, 3 × (Conv → MaxPool)\n",
    "<!--fig metrics/evaluate.json:champion_test_accuracy:pct1-->86.4%<!--/fig--> test accuracy\n",
])
def test_code_markers_and_the_allowlist_are_not_typed_figures(sources, text):
    assert docs.problems("README.md", text, sources) == []


@pytest.mark.parametrize("text", [
    "| model | <!--fig metrics/evaluate.json:champion_test_accuracy|x:pct1-->86.4%<!--/fig--> |\n",
    "<!--fig metrics/evaluate.json:champion_test_accuracy:pct1-->86.4% and no end\n",
])
def test_a_malformed_marker_is_reported(sources, text):
    assert any("a marker not of the form" in problem for problem in docs.problems("README.md", text, sources))
