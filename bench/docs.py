"""Every figure in README.md, RESULTS.md and bench/README.md, rendered from a committed JSON file.

A figure is written as a marker around its rendered value:

    <!--fig metrics/evaluate.json:champion_test_accuracy:pct1-->86.4%<!--/fig-->

HTML comments, so the marker is invisible on GitHub and in mkdocs; its spec holds no `|`, so it is safe in a
table cell. The spec is one of

    FILE:PATH:FORMAT[:STAT]   a value of a committed JSON file under results/, bench/results/ or metrics/
    NAME:FORMAT[:STAT]        a figure computed from those files by a function in FIGURES below

PATH: keys joined by `.`; a list is indexed by its items' `name` or `model` (experiments, leaderboard rows) or
by position; a key `a,b,c` takes several values (seeds, say). In results/*.json each experiment is reached by
its name and its metrics files by their stage, as in the workspace's metrics/:
`rps-s1.evaluate.test_accuracy.cnn3_small`, `rps-s1.leaderboard.mlp.test_f1`, `rps-s1.params.seed`.
FORMAT: a unit and its decimals (default 0): pct1 (a fraction as 86.4%), pts1 (a fraction as percentage points,
21.0), num0 (1,307), s1 (6.8 s), ms0 (215 ms), gb2 (0.37 GB), x2 (10.42×), ips0 (178 images/s), rqs1 (21.0 requests/s),
dur (10 min 6 s).
STAT, which several values need: mean_sd (63.2 ± 0.8%, sample sd), mean_sd_values (63.2 ± 0.8% (62.3, 63.5,
63.9)), values (62.3, 63.5, 63.9), slash (76.8 / 88.6 / 93.2%), range (86-105 s), mean, min, max, sum.

    python -m bench.docs            rewrite every marked figure from its file
    python -m bench.docs --check    exit 1 naming each figure that differs from its file, each bad marker, and
                                    each measured figure (a number with a unit) written outside a marker and
                                    outside code
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "RESULTS.md", "bench/README.md")
# Where figures may come from: files the benchmarks, `bench.export_results` and `dvc repro` write and git keeps.
SOURCE_DIRS = ("results/", "bench/results/", "metrics/")

MARKER = re.compile(r"<!--fig ([^|<>]+?)-->(.*?)<!--/fig-->")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
# A measured figure: a number (or a range) and a unit of time, size, speed, share or ratio. 32×32 is a shape.
MEASURED = re.compile(
    r"(?<![\w.,/-])\d[\d,]*(?:\.\d+)?(?:-\d[\d,]*(?:\.\d+)?)?(?:%|×(?!\d)|\s(?:ms|s|seconds?|min|minutes?|h|hours?"
    r"|GB|MB|kB|KB|GiB|MiB|img/s|images/s|req/s|requests/s|GFLOP/s|points)(?![\w/]))"
)
# Numbers with a unit that are not results, each with why. A figure inside a match is not reported.
NOT_MEASURED = {
    r"95%[^.|]{0,80}?interval": "the confidence level of an interval",
    r"[≤≥<>] ?\d[\d,.]*(?:%|×|\s[\w/]+)|\d[\d,.]*% goal": "a target or a bound",
    r"^\| (?:seed|anchor)\b.*": "a table row quoting the course's seed project or a published anchor: their figure",
    r"\b(?:seed's|anchor)\b[^.|\n]*?\d[\d.,-]*%": "a sentence quoting the seed project or an anchor",
    r"^\| `[\w.{},/<>]+`(?:, `[\w.{},/<>]+`)* \|.*": "a row of the params table (first cell: the keys): a default",
}

UNITS = {  # FORMAT's unit: (scale, suffix)
    "pct": (100, "%"),
    "pts": (100, ""),
    "num": (1, ""),
    "s": (1, " s"),
    "ms": (1, " ms"),
    "gb": (1, " GB"),
    "x": (1, "×"),
    "ips": (1, " images/s"),
    "rqs": (1, " requests/s"),
}


class FigureError(ValueError):
    """A marker whose spec cannot be rendered: unknown file, key, format or figure."""


class Sources:
    """The committed JSON files figures come from, each read once."""

    def __init__(self, root: Path):
        self.root = root
        self.tracked = tracked(root)
        self.loaded: dict[str, object] = {}

    def document(self, name: str) -> object:
        if not name.startswith(SOURCE_DIRS):
            raise FigureError(f"{name}: figures come from {', '.join(SOURCE_DIRS)} only")
        if name not in self.tracked:
            raise FigureError(f"{name}: not a committed file (git add it, or cut the figure)")
        if name not in self.loaded:
            self.loaded[name] = by_name(json.loads((self.root / name).read_text()))
        return self.loaded[name]

    def values(self, name: str, path: str) -> list[float]:
        return numbers(lookup(self.document(name), path.split(".")), f"{name}:{path}")


def tracked(root: Path) -> set[str]:
    listed = subprocess.run(["git", "ls-files", "--", *SOURCE_DIRS], cwd=root, capture_output=True, text=True, check=True)
    return set(listed.stdout.splitlines())


def by_name(document: object) -> object:
    """results/*.json (`bench.export_results`) keyed as the figures name them: each experiment by its name, its
    params and metrics files unwrapped from `dvc exp show`'s {"metrics/STAGE.json": {"data": ...}}."""
    if not (isinstance(document, dict) and isinstance(document.get("experiments"), list)):
        return document
    experiments = {}
    for experiment in document["experiments"]:
        unwrapped = {Path(file).stem: shown["data"] for file, shown in experiment["metrics"].items()}
        params = experiment["params"].get("params.yaml", {}).get("data", {})
        # The experiment's own leaderboard (a list, from its commit) wins over dvc's {} for metrics/leaderboard.json.
        experiments[experiment["name"]] = {**unwrapped, **experiment, "params": params}
    return {**document, **experiments}


def lookup(node: object, keys: list[str]) -> object:
    """The value at keys; a key `a,b,c` gives the list of the three."""
    if not keys:
        return node
    key, rest = keys[0], keys[1:]
    if "," in key:
        return [lookup(node, [part, *rest]) for part in key.split(",")]
    if isinstance(node, list):
        named = [item for item in node if isinstance(item, dict) and key in (item.get("name"), item.get("model"))]
        if named:
            return lookup(named[0], rest)
        if key.isdigit() and int(key) < len(node):
            return lookup(node[int(key)], rest)
    elif isinstance(node, dict) and key in node:
        return lookup(node[key], rest)
    raise FigureError(f"no {key!r} there")


def numbers(found: object, where: str) -> list[float]:
    """found as a flat list of numbers: a dict gives its values (`seconds_by_stage`), a list its items."""
    flat = []
    for item in found if isinstance(found, list) else [found]:
        flat += list(item.values()) if isinstance(item, dict) else item if isinstance(item, list) else [item]
    if not flat or not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in flat):
        raise FigureError(f"{where} is not a number or a list of numbers: {json.dumps(found)[:80]}")
    return flat


def fmt(value: float, form: str) -> str:
    """One value in FORMAT's unit, e.g. fmt(0.8639, "pct1") == "86.4%"."""
    if form == "dur":
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    unit, decimals = split_format(form)
    scale, suffix = UNITS[unit]
    return f"{value * scale:,.{decimals}f}{suffix}"


def split_format(form: str) -> tuple[str, int]:
    match = re.fullmatch(r"([a-z]+)(\d?)", form)
    if not match or match[1] not in UNITS:
        raise FigureError(f"unknown format {form!r}: one of {', '.join(UNITS)} and decimals (pct1), or dur")
    return match[1], int(match[2] or 0)


def bare(values: list[float], form: str, joiner: str) -> str:
    """Several values in FORMAT, the unit written once, after the last."""
    if form == "dur":
        return joiner.join(fmt(value, form) for value in values)
    unit, _ = split_format(form)
    suffix = UNITS[unit][1]
    texts = [fmt(value, form) for value in values]
    return joiner.join(text.removesuffix(suffix) for text in texts[:-1]) + joiner * bool(texts[:-1]) + texts[-1]


def mean_sd(values: list[float], form: str) -> str:
    unit, decimals = split_format(form)
    scale, suffix = UNITS[unit]
    return f"{statistics.mean(values) * scale:,.{decimals}f} ± {statistics.stdev(values) * scale:,.{decimals}f}{suffix}"


STATS: dict[str, Callable[[list[float], str], str]] = {
    "mean_sd": mean_sd,
    "mean_sd_values": lambda values, form: f"{mean_sd(values, form)} ({stat_values(values, form)})",
    "values": lambda values, form: bare(values, form, ", "),
    "slash": lambda values, form: bare(values, form, " / "),
    "range": lambda values, form: bare([min(values), max(values)], form, "-"),
    "mean": lambda values, form: fmt(statistics.mean(values), form),
    "min": lambda values, form: fmt(min(values), form),
    "max": lambda values, form: fmt(max(values), form),
    "sum": lambda values, form: fmt(math.fsum(values), form),
    "diff": lambda values, form: fmt(values[-1] - values[0], form),  # a,b: b - a
    "ratio": lambda values, form: fmt(values[-1] / values[0], form),  # a,b: b / a
}


def stat_values(values: list[float], form: str) -> str:
    """The values alone, no unit: what follows a mean ± sd in brackets."""
    unit, _ = split_format(form)
    return ", ".join(fmt(value, form).removesuffix(UNITS[unit][1]) for value in values)


def recipe(dataset: str, features: list[str], head: dict, flips: bool, tta: bool) -> Callable[[Sources], list[float]]:
    """The validation accuracy by seed of one recipe of `bench.transfer_recipes`, found by what it is: its place in
    the file is its rank, which a re-run moves."""
    wanted = {"features": features, "head": head, "train_flips": flips, "tta": tta}

    def by_seed(sources: Sources) -> list[float]:
        name = f"bench/results/transfer_recipes_{dataset}.json"
        found = [row for row in sources.document(name)["recipes"] if all(row.get(k) == v for k, v in wanted.items())]
        if len(found) != 1:
            raise FigureError(f"{name}: {len(found)} recipes are {wanted}")
        return found[0]["val"]
    return by_seed


PIPELINE_HEAD = {"kind": "softmax", "dropout": 0.2, "epochs": 20}  # as bench.transfer_recipes names the transfer stage's
# Figures one FILE:PATH cannot name, each a function of the committed files: NAME:FORMAT[:STAT].
FIGURES: dict[str, Callable[[Sources], float | list[float]]] = {
    f"recipe.{dataset}.{name}": recipe(dataset, *how)
    for dataset in ("rps", "cats_vs_dogs")
    for name, how in {
        "block14": (["avg"], PIPELINE_HEAD, False, False),
        "block14_flips_dropout": (["avg"], {"kind": "softmax", "dropout": 0.5, "epochs": 40}, True, True),
        "block14_avg_max_logistic_flips": (["avg", "max"], {"kind": "logistic", "C": 0.01}, True, True),
        "block13": (["mid"], PIPELINE_HEAD, False, False),
        "block13_mirrored": (["mid"], PIPELINE_HEAD, True, False),
    }.items()
}


def expected(spec: str, sources: Sources) -> str:
    """The rendered value of a marker's spec."""
    fields = spec.split(":")
    if fields[0].endswith(".json"):
        if len(fields) not in (3, 4):
            raise FigureError("FILE:PATH:FORMAT[:STAT] expected")
        values = sources.values(fields[0], fields[1])
        form, stat = fields[2], fields[3] if len(fields) == 4 else None
    else:
        if len(fields) not in (2, 3) or fields[0] not in FIGURES:
            raise FigureError("neither FILE:PATH:FORMAT[:STAT] nor a figure of bench/docs.py FIGURES")
        values = numbers(FIGURES[fields[0]](sources), fields[0])
        form, stat = fields[1], fields[2] if len(fields) == 3 else None
    if stat is None:
        if len(values) != 1:
            raise FigureError(f"{len(values)} values need a STAT: {', '.join(STATS)}")
        return fmt(values[0], form)
    if stat not in STATS:
        raise FigureError(f"unknown STAT {stat!r}: one of {', '.join(STATS)}")
    return STATS[stat](values, form)


@dataclass(frozen=True)
class Marker:
    spec: str
    found: str
    start: int  # of the rendered value in the document
    end: int


def blanked(text: str, pattern: re.Pattern) -> str:
    """text with pattern's matches overwritten by spaces, newlines kept, so offsets and line numbers hold."""
    return pattern.sub(lambda match: re.sub(r"[^\n]", " ", match[0]), text)


def prose(text: str) -> str:
    """text without its code: fenced blocks and code spans (markers shown there are examples, not figures)."""
    return blanked(blanked(text, FENCE), CODE_SPAN)


def markers(text: str) -> Iterator[Marker]:
    for match in MARKER.finditer(prose(text)):
        yield Marker(match[1], text[match.start(2):match.end(2)], match.start(2), match.end(2))


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def unmarked(text: str) -> Iterator[tuple[int, str]]:
    """(line, figure) of each measured figure outside code and markers that NOT_MEASURED does not excuse."""
    rest = blanked(prose(text), MARKER)
    # Matched on the text itself (code spans name the params); blanking kept every offset.
    excused = [hit.span() for pattern in NOT_MEASURED for hit in re.finditer(pattern, text, re.M)]
    for match in MEASURED.finditer(rest):
        if not any(start <= match.start() and match.end() <= end for start, end in excused):
            yield line_of(rest, match.start()), match[0]


def render(text: str, sources: Sources) -> str:
    """text with every marked figure rendered from its file; a marker that names nothing is left for problems()."""
    out, last = [], 0
    for marker in markers(text):
        try:
            value = expected(marker.spec, sources)
        except FigureError:
            value = marker.found
        out += [text[last:marker.start], value]
        last = marker.end
    return "".join(out) + text[last:]


def problems(name: str, text: str, sources: Sources) -> list[str]:
    """Everything --check reports for one document, each naming file and line."""
    found = []
    for marker in markers(text):
        where = f"{name}:{line_of(text, marker.start)}: <!--fig {marker.spec}-->"
        try:
            value = expected(marker.spec, sources)
        except FigureError as error:
            found.append(f"{where}: {error}")
            continue
        if value != marker.found:
            found.append(f"{where}: expected {value!r}, found {marker.found!r}")
    broken = blanked(prose(text), MARKER)
    for match in re.finditer(r"<!--/?fig\b", broken):
        found.append(f"{name}:{line_of(text, match.start())}: a marker not of the form <!--fig SPEC-->VALUE<!--/fig--> "
                     "on one line (no | in SPEC: it would split a table row)")
    for number, figure in unmarked(text):
        found.append(f"{name}:{number}: {figure!r} typed by hand: mark it (<!--fig FILE:PATH:FORMAT-->), or cut it")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming what differs")
    args = parser.parse_args(argv)
    sources = Sources(ROOT)
    found = []
    for name in DOCUMENTS:
        path = ROOT / name
        text = path.read_text()
        rendered = render(text, sources)
        if not args.check and rendered != text:
            path.write_text(rendered)
            text = rendered
            print(f"rendered {name}", file=sys.stderr)
        found += problems(name, text, sources)  # what rendering cannot fix: bad markers, typed figures
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
