"""Evaluation reports: a JSON file for machines and a Markdown table for people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasure.core.io import write_json, write_text


def table(report: dict[str, Any]) -> str:
    """The Markdown results table: one row per model."""
    fid_name = report["fid_features"]
    head = f"| model | UA (class {report['forget_class']}) | retained accuracy | FID retained ({fid_name}) |"
    lines = [head, "|---|---|---|---|"]
    for name, r in report["models"].items():
        lines.append(f"| {name} | {100 * r['ua']:.1f}% | {100 * r['retained_accuracy']:.1f}% | {r['fid_retained']:.2f} |")
    return "\n".join(lines)


def write_report(folder: str | Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` in ``folder``; records the CPU thread count (results can depend on it)."""
    import torch

    report.setdefault("threads", torch.get_num_threads())
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


# ----------------------------------------------------------------------------- Stable Diffusion audits


def nudity_table(result: dict[str, Any]) -> str:
    """Markdown table of a nudity audit: one row per model, one column per NudeNet class."""
    s = result["settings"]
    classes = s["classes"]
    head = "| model | " + " | ".join(c.removesuffix("_EXPOSED").lower() for c in classes) + " | total parts | images with any |"
    lines = [head, "|---" * (len(classes) + 3) + "|"]
    for name, r in result["models"].items():
        cells = " | ".join(str(r["parts"][c]) for c in classes)
        any_ = f"{r['images_with_any']}/{r['images']} ({100 * r['fraction_with_any']:.1f}%)"
        lines.append(f"| {name} | {cells} | {r['parts_total']} | {any_} |")
    where = f"'{s.get('prompts')}'" + (f", category '{s['category']}'" if s.get("category") else "")
    lines += [
        "",
        f"Detections of {s['detector']} with score >= {s['threshold']}, classes {', '.join(classes)}; "
        f"{s['prompts_used']} prompts from {where}, {sampling(s)}.",
    ]
    return "\n".join(lines)


def sampling(s: dict[str, Any]) -> str:
    """How an audit's images were made, in words (results from before the generator was recorded name only the sampler)."""
    text = f"sampler {s['scheduler']}, {s.get('steps')} steps"
    if s.get("generator"):
        text += f", initial noise from a {s['generator']} generator, {s.get('dtype')}"
    return text


def ua_table(result: dict[str, Any]) -> str:
    """Markdown table of a UA audit: UA of the forgotten class(es), accuracy on the rest, per class."""
    s = result["settings"]
    forget = s.get("forget_classes") or [s["forget_class"]]
    classes = list(dict.fromkeys(c for r in result["models"].values() for c in r["per_class"]))
    # Several forgotten classes: each one's UA, then all of them pooled.
    ua_heads = [f"UA ({c})" for c in forget] + (["UA (all forgotten)"] if len(forget) > 1 else [])
    head = "| model | " + " | ".join(ua_heads) + " | retained accuracy | " + " | ".join(classes) + " |"
    lines = [head, "|---" * (len(classes) + len(ua_heads) + 2) + "|"]
    for name, r in result["models"].items():
        ret = "n/a" if r["retained_accuracy"] is None else f"{100 * r['retained_accuracy']:.1f}%"
        uas = [r.get("ua_per_class", {}).get(c, r["ua"]) for c in forget] + ([r["ua"]] if len(forget) > 1 else [])
        per = " | ".join(f"{100 * r['per_class'][c]['accuracy']:.0f}%" for c in classes)
        lines.append(f"| {name} | " + " | ".join(f"{100 * u:.1f}%" for u in uas) + f" | {ret} | {per} |")
    lines += [
        "",
        f"Classifier: {s['classifier']} ({s['classifier_weights']}); {s['accuracy']}. {s['prompts_used']} images per model, {sampling(s)}.",
    ]
    return "\n".join(lines)


def attack_method(result: dict[str, Any]) -> str:
    """The attack's name as written in tables (attack.json files from before Ring-A-Bell name none: UnlearnDiffAtk)."""
    from erasure.evaluation.attack import METHODS

    return METHODS[result["settings"].get("method", "unlearndiffatk")]


def attack_table(result: dict[str, Any]) -> str:
    """Markdown table of an adversarial-prompt audit: pre- and post-attack ASR per model."""
    s = result["settings"]
    method = attack_method(result)
    lines = [f"| model | pre-attack ASR | post-attack ASR ({method}) | prompts | skipped |", "|---|---|---|---|---|"]
    for name, r in result["models"].items():
        pre = f"{100 * r['pre_asr']:.2f}% ({r['pre_success']}/{r['prompts']})"
        post = f"{100 * r['post_asr']:.2f}% ({r['post_success']}/{r['prompts']})"
        lines.append(f"| {name} | {pre} | {post} | {r['prompts']} | {r['skipped']} |")
    where = f"'{s.get('prompts')}'"
    if method == "Ring-A-Bell":
        search = (
            f"{s['k']} searched tokens ({s['vocabulary']} vocabulary) replace the prompt; target = prompt embedding + {s['eta']} x "
            f"the concept vector of {s['concept_pairs_count']} prompt pairs; genetic algorithm: population {s['population']}, "
            f"{s['generations']} generations, mutation {s['mutation_rate']}, crossover {s['crossover_rate']}; {s['encoder']}"
        )
    else:
        search = (
            f"{s['k']} prepended tokens ({s['vocabulary']} vocabulary), {s['timesteps']} timesteps x {s['iterations']} steps, "
            f"Adam lr {s['lr']}, weight decay {s['weight_decay']}, {s['criterion']} loss; targets {s['targets']}"
        )
    lines += [
        "",
        f"Success: {s['detector']}. {search}; evaluation images: {s['scheduler']}, {s.get('steps')} steps; "
        f"{s['prompts_used']} prompts from {where}.",
    ]
    return "\n".join(lines)


def attack_details(result: dict[str, Any]) -> str:
    """Markdown tables of every prompt's attack: detected before and after, steps used, the adversarial prompt, loss."""

    def cell(text: Any, width: int = 80) -> str:
        text = str(text).replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= width else text[: width - 1] + "…"

    steps, loss_name = ("generations", "distance to target") if attack_method(result) == "Ring-A-Bell" else ("steps", "final loss")
    out = []
    for name, r in result["models"].items():
        out += [
            f"## {name}",
            "",
            f"| # | prompt | seed | pre | post | {steps} | adversarial prompt | {loss_name} |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in r["results"]:
            if "skipped" in row:
                out.append(f"| {row['index']} | {cell(row['prompt'], 50)} | {row['seed']} | skipped: {row['skipped']} | | | | |")
                continue
            loss = "" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
            adv = "" if row["adversarial_prompt"] is None else cell(row["adversarial_prompt"])
            yes = {True: "yes", False: "no"}
            out.append(
                f"| {row['index']} | {cell(row['prompt'], 50)} | {row['seed']} | {yes[row['pre_detected']]} | "
                f"{yes[row['post_detected']]} | {row['iterations']} | {adv} | {loss} |"
            )
        out.append("")
    return "\n".join(out)


def fid_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of FID/KID results, each row naming its protocol and sample counts."""
    lines = ["| generated | reference | protocol | FID | KID (mean ± std) | images (gen / ref) |", "|---|---|---|---|---|---|"]
    for r in results:
        p = r["protocol"]
        lines.append(
            f"| {r['generated']} | {r['reference']} | {p['name']} ({p['layer']}-d) | {r['fid']:.3f} | "
            f"{r['kid_mean']:.4f} ± {r['kid_std']:.4f} | {r['generated_images']} / {r['reference_images']} |"
        )
    return "\n".join(lines)


def _skip(path: Path, root: Path) -> bool:
    # Generated-image folders (they hold a manifest) and hidden folders are inputs, not results.
    parents = path.relative_to(root).parents
    return any(part.startswith(".") for part in path.relative_to(root).parts) or any(
        (root / p / "manifest.jsonl").is_file() for p in parents
    )


def _html(markdown: str, title: str) -> str:
    """A minimal HTML rendering of the Markdown this module writes (headings, tables, images, text)."""
    import html
    import re

    out, table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            out.append(("<table>" if not table else "") + "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            table = True
            continue
        if table:
            out.append("</table>")
            table = False
        if m := re.fullmatch(r"(#+) (.*)", line):
            out.append(f"<h{len(m[1])}>{html.escape(m[2])}</h{len(m[1])}>")
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            out.append(f'<p><img src="{html.escape(m[2])}" alt="{html.escape(m[1])}" style="max-width:100%"></p>')
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if table:
        out.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "td{border:1px solid #ccc;padding:3px 8px}table{border-collapse:collapse}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n" + (
        "\n".join(out) + "\n</body></html>\n"
    )


def collect_report(folder: str | Path) -> Path:
    """Gather every audit, UA and FID result, grid and chart under ``folder`` into summary.md and summary.html."""
    from erasure.core.errors import ErasureError
    from erasure.core.io import read_json

    root = Path(folder)
    if not root.is_dir():
        raise ErasureError(f"'{root}' is not a folder; pass the folder your audits, fid results and grids were written to.")
    results = {"nudity": [], "ua": [], "attack": [], "fid": [], "ddpm": []}
    for path in sorted(root.rglob("*.json")):
        if _skip(path, root):
            continue
        data = read_json(path)
        if not isinstance(data, dict):
            continue
        kind = data.get("audit") or ("fid" if "fid" in data and "protocol" in data else None)
        if kind is None and "models" in data and "forget_class" in data:
            kind = "ddpm"  # an `erasure evaluate` report.json
        if kind in results:
            results[kind].append((path, data))
    images = [p for p in sorted(root.rglob("*.png")) if not _skip(p, root)]
    if not any(results.values()) and not images:
        raise ErasureError(f"nothing to report in '{root}': no audit.json, ua.json, attack.json, fid JSON, DDPM report.json or PNG found.")
    md = [f"# Evaluation report: {root.name}", ""]
    for path, data in results["ddpm"]:
        md += [f"## DDPM erasure: {data['dataset']}, forget class {data['forget_class']} ({path.relative_to(root)})", "", table(data), ""]
    for path, data in results["nudity"]:
        md += [f"## Nudity audit ({path.relative_to(root)})", "", nudity_table(data), ""]
    for path, data in results["ua"]:
        md += [f"## UA audit ({path.relative_to(root)})", "", ua_table(data), ""]
    for path, data in results["attack"]:
        md += [f"## Adversarial-prompt audit, {attack_method(data)} ({path.relative_to(root)})", "", attack_table(data), ""]
    if results["fid"]:
        md += ["## FID and KID", "", fid_table([d for _, d in results["fid"]]), ""]
        md += [
            f"- {d['protocol']['name']}: {d['protocol']['note']}" for d in {d["protocol"]["name"]: d for _, d in results["fid"]}.values()
        ]
        md += [""]
    if images:
        md += ["## Grids and charts", ""]
        for p in images:
            md += [f"### {p.relative_to(root)}", "", f"![{p.stem}]({p.relative_to(root).as_posix()})", ""]
    text = "\n".join(md)
    write_text(root / "summary.md", text)
    write_text(root / "summary.html", _html(text, f"Evaluation report: {root.name}"))
    return root / "summary.md"
