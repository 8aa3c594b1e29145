"""Measured numbers in README.md and docs/*.md come from results files in benchmarks/results/.

Two marks, both invisible on GitHub and on the site:

- `<!-- from: benchmarks/results/FILE.json -->` on the line above a Markdown table (or above
  a code block that contains one, such as a transcript): every number in the table's cells
  is checked against FILE, read by the `TABLES` reader for that kind of file, as rounded in
  the table (a cell "48.20 (4.80)" holds two numbers, value and gap);
- `NUMBER <!-- = FILE.json key.path -->` right after a number in prose: that number is
  checked against the value at `key.path` in benchmarks/results/FILE.json; add ` %` before
  `-->` when the file holds a fraction that the text shows in percent.

A number "as shown" matches when it equals the file's value rounded to the shown decimals.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NUMBER = re.compile(r"[−-]?\d[\d,]*(?:\.\d+)?")
TABLE_MARK = re.compile(r"^<!-- from: (benchmarks/results/\S+\.json) -->$")  # a line of its own
# a number, a unit, then the mark; not an example inside a code span
INLINE_MARK = re.compile(
    r"(?P<number>[−+-]?\d[\d,]*(?:\.\d+)?)[^\d<]{0,12}<!-- = (?P<file>\S+\.json) (?P<path>\S+)(?P<percent> %)? -->(?!`)"
)


def ddpm_erasure(data: dict) -> dict[str, dict[str, float]]:
    """benchmarks/ddpm_erasure.py: one row per model."""
    if "table" in data:
        rows = {r["model"]: r for r in data["table"]}
        models = {
            m: {"ua": r["ua"] / 100, "retained_accuracy": r["retained_accuracy"] / 100, "fid_retained": r["fid_retained"]}
            for m, r in rows.items()
        }
    else:
        rows, models = {}, data["results"]["models"]
    original = models["original"]["fid_retained"]
    seconds = {k.removeprefix("erase_").removesuffix("_forget0"): v["seconds"] for k, v in data["timings"].items()}
    features = data["results"]["fid_features"] if "results" in data else "inception-2048"
    table = {}
    for name, m in models.items():
        table[name] = {
            "UA (class 0)": 100 * m["ua"],
            "retained accuracy": 100 * m["retained_accuracy"],
            f"FID retained ({features})": m["fid_retained"],
            "FID / original": m["fid_retained"] / original,
            "FID vs original": 100 * (m["fid_retained"] / original - 1),
        }
        if name in seconds:
            table[name]["erase time"] = seconds[name]
    return table


def classification(data: dict) -> dict[str, dict[str, list[float]]]:
    """benchmarks/classification.py: one row per method, value and gap to Retrain."""
    table = {}
    for r in data["table"]:
        row = {m: [r[m], r.get(f"gap_{m}", 0.0)] for m in ("UA", "RA", "TA", "MIA")}
        row["avg gap"] = [r["avg_gap"]]
        if "RTE" in r:
            row["RTE (min)"] = [r["RTE"]]
        if "TA_forget_class" in r:  # class-wise forgetting
            row["TA forget class"] = [r["TA_forget_class"]]
        table[r["method"]] = row
    return table


def cpu_times(data: dict) -> dict[str, dict[str, float]]:
    """benchmarks/cpu_times.py: the demo's table, and its transcript's result lines."""
    demo = data["jobs"]["demo"]
    table = {
        name: {
            "UA (class 0)": 100 * m["ua"],
            "retained accuracy": 100 * m["retained_accuracy"],
            f"FID retained ({demo['fid_features']})": m["fid_retained"],
        }
        for name, m in demo["models"].items()
    }
    lines = [(rf"^{name}: UA (\S+)%  retained acc (\S+)%  FID (\S+) ", list(row.values())) for name, row in table.items()]
    return {**table, LINES: [*lines, (r"^done in (\S+) s$", [demo["printed_seconds"]])]}


def sd_training(data: dict) -> dict[str, dict[str, float]]:
    """benchmarks/sd_training.py: one row per phase."""
    names = {"salun-mask": "SalUn mask pass (one batch)", "salun": "SalUn fine-tune", "esd-x": "ESD-x", "fmn": "FMN"}
    table = {}
    for r in data["results"]:
        row = {"s/step": r["seconds_per_step"]}
        if r.get("tflop_per_step") is not None:
            row |= {"model TFLOP/step": r["tflop_per_step"], "achieved TFLOP/s": r["achieved_tflops"]}
        table[names.get(r["phase"], r["phase"])] = row
    return table


# A reader's LINES entry: (regex, values) for lines of a marked code block outside its table.
LINES = "lines"

# which reader a results file needs, by its name
TABLES = {"ddpm_erasure_": ddpm_erasure, "classification_": classification, "cpu_times": cpu_times, "sd_training_": sd_training}


def reader(path: str):
    name = Path(path).name
    found = [f for prefix, f in TABLES.items() if name.startswith(prefix)]
    assert found, f"no reader for {name}: add one to TABLES in tests/test_readme_numbers.py"
    return found[0]


def numbers(cell: str) -> list[float]:
    return [float(n.replace(",", "").replace("−", "-")) for n in NUMBER.findall(cell)]


def shown_equal(text: str, value: float) -> bool:
    """`text` (a number as printed) equals `value` rounded to the decimals shown."""
    digits = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text.replace(",", "").replace("−", "-")) - value) <= 0.5 * 10**-digits + 1e-9


def marked_tables() -> list[tuple[str, str, list[str], list[str]]]:
    """(where, results file, table lines, other lines of its code block) for every table under a `from:` mark."""
    found = []
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = TABLE_MARK.search(line)
            if not m:
                continue
            j, block = i + 1, lines[i + 1].startswith("```") if i + 1 < len(lines) else False
            table, other = [], []
            while j < len(lines) and not lines[j].startswith("|"):
                other.append(lines[j])
                j += 1
            while j < len(lines) and lines[j].startswith("|"):
                table.append(lines[j])
                j += 1
            while block and j < len(lines) and not lines[j].startswith("```"):  # the rest of a transcript
                other.append(lines[j])
                j += 1
            found.append((f"{path.relative_to(ROOT)}:{i + 1}", m.group(1), table, other if block else []))
    return found


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.parametrize("where,file,table,other", marked_tables(), ids=lambda v: v if isinstance(v, str) and ":" in v else "")
def test_marked_tables_match_their_results_file(where, file, table, other):
    assert table, f"{where}: a `from:` mark with no table below it"
    values = reader(file)(json.loads((ROOT / file).read_text()))
    header, problems, checked = cells(table[0]), [], 0
    for pattern, expected in values.pop(LINES, []):
        hits = [m for line in other if (m := re.search(pattern, line))]
        assert hits, f"{where}: no line of the transcript matches {pattern!r}"
        for text, value in zip(hits[0].groups(), expected):
            checked += 1
            if not shown_equal(text, value):
                problems.append(f"line {hits[0].string.strip()!r}: shows {text}, {file} has {value:.6g}")
    for line in table[2:]:
        row = cells(line)
        for column, cell in zip(header[1:], row[1:]):
            shown = NUMBER.findall(cell)
            if not shown:
                continue
            expected = values.get(row[0], {}).get(column)
            if expected is None:
                problems.append(f"{row[0]!r} / {column!r}: {file} has no value for it")
                continue
            expected = expected if isinstance(expected, list) else [expected]
            for text, value in zip(shown, expected):
                checked += 1
                if not shown_equal(text.replace("−", "-"), value):
                    problems.append(f"{row[0]!r} / {column!r}: shows {text}, {file} has {value:.6g}")
    assert not problems, f"{where}: numbers that do not match {file}:\n  " + "\n  ".join(problems)
    assert checked, f"{where}: no number checked"


def inline_marks() -> list[tuple[str, re.Match]]:
    return [
        (f"{path.relative_to(ROOT)}:{n}", m)
        for path in DOC_FILES
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for m in INLINE_MARK.finditer(line)
    ]


def test_marked_numbers_in_prose_match_their_results_file():
    marks = inline_marks()
    assert marks, "no `<!-- = FILE key -->` marks found"
    problems = []
    for where, m in marks:
        value = json.loads((RESULTS / m["file"]).read_text())
        for key in m["path"].split("."):
            value = value[int(key)] if isinstance(value, list) else value[key]
        value = 100 * value if m["percent"] else value
        if not shown_equal(m["number"].lstrip("+"), value):
            problems.append(f"{where}: shows {m['number']}, {m['file']} {m['path']} is {value:.6g}")
    assert not problems, "numbers that do not match their results file:\n  " + "\n  ".join(problems)


def test_every_marked_file_exists_and_every_results_table_in_readme_is_marked():
    for _, file, _, _ in marked_tables():
        assert (ROOT / file).is_file(), f"{file} is named by a `from:` mark but does not exist"
    for _, m in inline_marks():
        assert (RESULTS / m["file"]).is_file(), f"{m['file']} is named by a `<!-- = -->` mark but does not exist"
    # the README's measured tables: the demo's transcript
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- from: benchmarks/results/cpu_times.json -->" in readme
