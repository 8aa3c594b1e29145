"""Evaluation reports: a JSON file for machines and a Markdown table for people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasure.io import write_json, write_text


def table(report: dict[str, Any]) -> str:
    """The Markdown results table: one row per model."""
    fid_name = report["fid_features"]
    head = f"| model | UA (class {report['forget_class']}) | retained accuracy | FID retained ({fid_name}) |"
    lines = [head, "|---|---|---|---|"]
    for name, r in report["models"].items():
        lines.append(f"| {name} | {100 * r['ua']:.1f}% | {100 * r['retained_accuracy']:.1f}% | {r['fid_retained']:.2f} |")
    return "\n".join(lines)


def write_report(folder: str | Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` in ``folder``."""
    folder = Path(folder)
    write_json(folder / "report.json", report)
    p = report["protocol"]
    md = [
        f"# Erasure report: {report['dataset']}, forget class {report['forget_class']} ({report['forget_class_name']})",
        "",
        table(report),
        "",
        "## Protocol",
        f"- {p['samples_per_class']} generated images per class, DDIM {p['sampling_steps']} steps, guidance w = {p['guidance']}, "
        f"seed {p['seed']}; every model starts from the same noise.",
        "- UA = 1 - accuracy of the classifier on images generated for the forgotten class (higher = more forgotten).",
        "- Retained accuracy: the classifier's accuracy on images generated for every other class.",
        f"- FID retained: generated retained-class images vs {p['fid_real_images']} real training images of those classes, "
        f"features `{report['fid_features']}`.",
        f"- Classifier test accuracy on real images: {100 * report['classifier_test_accuracy']:.1f}%.",
        "",
        "![comparison grid](grid.png)",
        "",
    ]
    write_text(folder / "report.md", "\n".join(md))
