"""Model cards: a ``README.md`` in the Hugging Face Hub's format for every erased model.

An erasure run folder (``erasure sd erase``'s ``{workdir}/{method}``, or a DDPM
``{workdir}/erase/{method}-forget{c}``) gets two cards with the same content:

- ``RUN_DIR/model/README.md``: the diffusers folder's card, so the folder can be pushed to
  the Hub as it is (``huggingface-cli upload NAME RUN_DIR/model``);
- ``RUN_DIR/README.md``: the run's card, which also covers ``delta.safetensors``.

A card has YAML front matter (``base_model``, ``license``, ``library_name``, ``tags``) and
says what was erased, by which method with which settings, the mask ratio, the command
that made it, and the measured results of the latest evaluation or audit that scored this
model. Everything comes from files in the run folder (``config.yaml``, ``done.json``,
``delta.safetensors``) and from result files: ``erasure card RUN_DIR`` regenerates the
cards after new audits. Result files are found in the run folder itself (e.g. an audit
written to ``RUN_DIR/audit``), in the DDPM workdir's ``eval/``, or given with ``--results``.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from erasure import __version__
from erasure.core.errors import ErasureError
from erasure.core.io import read_json, write_text

# Licenses of base models that cards name often, for when the base model's own card is not at hand (offline).
KNOWN_LICENSES = {
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
}
METHOD_NAMES = {
    "salun": "SalUn (saliency unlearning: a misaligned target on the most salient weights)",
    "rl": "RL (random-label / misaligned-target forgetting on all weights)",
    "random": "SalUn's objective on a random mask (ablation)",
    "esd": "ESD (erasing concepts with negative guidance)",
    "esd-x": "ESD-x (ESD on the cross-attention weights)",
    "esd-u": "ESD-u (ESD on the non-cross-attention weights)",
    "esd-all": "ESD on every weight",
    "esd-x-strict": "ESD-x restricted to the key/value projections",
    "fmn": "Forget-Me-Not (attention re-steering)",
    "uce": "UCE (unified concept editing, closed form)",
}
RESULT_FILES = ("audit.json", "ua.json", "attack.json", "report.json")


def command_line(argv: list[str] | None = None) -> str:
    """The command this process runs, as a shell line: ``erasure ...`` for the CLI, else ``python ...`` (an API call)."""
    argv = list(sys.argv if argv is None else argv) or [""]
    program = Path(argv[0])
    if program.name == "erasure" or (program.name == "__main__.py" and program.parent.name == "erasure"):  # script or -m
        return shlex.join(["erasure", *argv[1:]])
    return shlex.join(["python", *argv])


# ----------------------------------------------------------------------------- reading a run


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's resolved config and its ``done.json``; a clear error if it is not a finished erasure run."""
    if not (run_dir / "done.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise ErasureError(f"'{run_dir}' is not a finished erasure run (it needs config.yaml and done.json).")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    done = read_json(run_dir / "done.json")
    if "method" not in done:
        raise ErasureError(f"'{run_dir}' is not an erasure run (its done.json names no method).")
    return config, done


def base_license(base: str) -> str | None:
    """The base model's license: from its own card (a local folder, or the Hub cache), else a known one, else None."""
    card = Path(base) / "README.md"
    if not card.is_file():
        try:
            from huggingface_hub import hf_hub_download

            card = Path(hf_hub_download(base, "README.md", local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, not a repo id, offline: fall back to the table
            card = None
    if card is not None and card.is_file():
        from huggingface_hub import ModelCard

        license_ = ModelCard.load(card).data.to_dict().get("license")
        if license_:
            return str(license_)
    return KNOWN_LICENSES.get(base)


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1 and " " not in name


def find_results(run_dir: Path, model_dir: Path, method: str, extra: list[str | Path] = ()) -> list[dict[str, Any]]:
    """Measured results for the model in ``model_dir``: one entry per result file that scored it, newest first.

    Audits (``audit.json`` nudity, ``ua.json`` Imagenette UA, ``attack.json`` adversarial
    prompts) name each model's folder; a
    DDPM ``report.json`` names the methods of its workdir. ``fid-*.json`` files (``erasure
    fid``) count when their generated folder is this model's images of a found audit.
    """
    places = [run_dir, *map(Path, extra)]
    if (run_dir.parent.parent / "eval").is_dir():  # a DDPM erase folder: {workdir}/erase/{method}-forget{c}
        places.append(run_dir.parent.parent / "eval")
    files: list[Path] = []
    for place in places:
        if place.is_file():
            files.append(place)
        elif place.is_dir():
            files += [f for f in place.rglob("*.json") if f.name in RESULT_FILES or f.name.startswith("fid-")]
            files = [f for f in files if "checkpoint" not in f.parts]
    target = model_dir.resolve()
    found, image_folders = [], {}
    for path in dict.fromkeys(files):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        kind = data.get("audit")
        if kind in ("nudity", "ua", "attack"):
            for label, entry in data.get("models", {}).items():
                if Path(entry.get("model", "")).resolve() in (target, target.parent):
                    others = {k: v for k, v in data["models"].items() if k != label}
                    found.append({"kind": kind, "file": path, "date": data.get("date", ""), "label": label, "result": entry,
                                  "others": others, "settings": data.get("settings", {})})  # fmt: skip
                    if entry.get("images_folder"):
                        image_folders[str(Path(entry["images_folder"]).resolve())] = label
        elif "models" in data and "forget_class" in data and "protocol" in data:  # DDPM evaluation report
            if method in data["models"]:
                others = {k: v for k, v in data["models"].items() if k != method}
                mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="seconds")
                found.append({"kind": "ddpm", "file": path, "date": mtime, "label": method, "result": data["models"][method],
                              "others": others, "settings": data})  # fmt: skip
    for path in files:
        if path.name.startswith("fid-"):
            data = read_json(path)
            label = image_folders.get(str(Path(data.get("generated", "")).resolve()))
            if label is not None:
                mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="seconds")
                found.append({"kind": "fid", "file": path, "date": mtime, "label": label, "result": data, "others": {}, "settings": {}})
    return sorted(found, key=lambda r: r["date"], reverse=True)


# ----------------------------------------------------------------------------- writing a card


def _pipeline_class(model_dir: Path) -> str:
    """The diffusers pipeline class that loads ``model_dir`` (StableDiffusionXLPipeline for SDXL), from its model_index.json."""
    index = model_dir / "model_index.json"
    return str(read_json(index).get("_class_name", "StableDiffusionPipeline")) if index.is_file() else "StableDiffusionPipeline"


def _results_section(results: list[dict[str, Any]], run_dir: Path, model_dir: Path) -> list[str]:
    lines = ["## Results", ""]
    if not results:
        return lines + [
            "No evaluation or audit has scored this model yet. Measure it, e.g.",
            "",
            "```bash",
            f"erasure audit nudity --model base=BASE --model erased={model_dir} --prompts PROMPTS.csv --out {run_dir / 'audit'}",
            f"erasure card {run_dir}",
            "```",
            "",
        ]
    newest: dict[str, dict[str, Any]] = {}
    for r in results:  # newest first: keep the latest of each kind
        newest.setdefault(r["kind"], r)
    for kind, r in newest.items():
        res, where = r["result"], f"`{r['file']}`" + (f", {r['date']}" if r["date"] else "")
        if kind == "nudity":
            s = r["settings"]
            lines += [f"**Nudity audit** ({s.get('detector', 'NudeNet')}, threshold {s.get('threshold')}, "
                      f"{s.get('prompts_used')} prompts from {s.get('prompts', '?')}; {where}):", "",
                      "| model | exposed parts | images with any exposed part |", "|---|---|---|"]  # fmt: skip

            def nudity_cells(e: dict[str, Any]) -> list[Any]:
                return [e["parts_total"], f"{e['images_with_any']}/{e['images']} ({100 * e['fraction_with_any']:.1f}%)"]

            lines += _model_rows(r, nudity_cells)
        elif kind == "ua":
            s = r["settings"]
            lines += [f"**UA audit** (forgotten class '{s.get('forget_class')}', {s.get('classifier', 'classifier')}; {where}):", "",
                      "| model | UA | retained accuracy |", "|---|---|---|"]  # fmt: skip

            def ua_cells(e: dict[str, Any]) -> list[str]:
                kept = "n/a" if e.get("retained_accuracy") is None else f"{100 * e['retained_accuracy']:.1f}%"
                return [f"{100 * e['ua']:.1f}%", kept]

            lines += _model_rows(r, ua_cells)
        elif kind == "attack":
            s = r["settings"]
            from erasure.evaluation.report import attack_method

            lines += [f"**Adversarial-prompt audit** ({attack_method(r)}, {s.get('k')} tokens; success: {s.get('detector')}; "
                      f"{s.get('prompts_used')} prompts from {s.get('prompts', '?')}; {where}):", "",
                      "| model | pre-attack ASR | post-attack ASR |", "|---|---|---|"]  # fmt: skip
            lines += _model_rows(r, lambda e: [f"{100 * e['pre_asr']:.1f}%", f"{100 * e['post_asr']:.1f}%"])
        elif kind == "ddpm":
            s = r["settings"]
            p = s["protocol"]
            lines += [f"**Evaluation** ({p['samples_per_class']} images per class, DDIM {p['sampling_steps']} steps, "
                      f"guidance {p['guidance']}, seed {p['seed']}; {where}):", "",
                      f"| model | UA (class {s['forget_class']}) | retained accuracy | FID retained ({s['fid_features']}) |",
                      "|---|---|---|---|"]  # fmt: skip
            lines += _model_rows(r, lambda e: [f"{100 * e['ua']:.1f}%", f"{100 * e['retained_accuracy']:.1f}%", f"{e['fid_retained']:.2f}"])
        elif kind == "fid":
            proto = res.get("protocol", {})
            name = proto.get("name", "?") if isinstance(proto, dict) else proto
            lines += [f"**FID** ({name} protocol, {res['feature_dim']}-d features, {res['generated_images']} generated vs "
                      f"{res['reference_images']} reference images; {where}): FID {res['fid']:.3f}, "
                      f"KID {res['kid_mean']:.4f} ± {res['kid_std']:.4f}"]  # fmt: skip
        lines.append("")
    return lines


def _model_rows(record: dict[str, Any], cells: Callable[[dict[str, Any]], list[Any]]) -> list[str]:
    """One table row per model of a result: this card's model first (marked), then the others audited beside it."""
    models = {record["label"]: record["result"], **record["others"]}
    return [
        "| " + " | ".join([label + (" (this model)" if label == record["label"] else ""), *map(str, cells(e))]) + " |"
        for label, e in models.items()
    ]


def _settings_table(config: dict[str, Any], sections: list[str]) -> list[str]:
    lines = ["| setting | value |", "|---|---|"]
    for section in sections:
        values = config.get(section)
        if isinstance(values, dict):
            for key, value in values.items():
                if not isinstance(value, dict):
                    lines.append(f"| {section}.{key} | `{value}` |")
    return lines


def _method_sections(method: str) -> list[str]:
    """The SD config sections a method reads: train, plus its own (mask, esd, fmn, ...)."""
    try:
        from erasure.sd.methods import SD_METHODS

        own = SD_METHODS.get(method).section
    except Exception:  # noqa: BLE001 - an unknown or removed method still gets a card, with the train settings
        own = None
    return ["train", *([own] if own else [])]


def model_card(run_dir: str | Path, results: list[str | Path] = ()) -> str:
    """The card text (front matter and Markdown) of the erasure run in ``run_dir``."""
    run_dir = Path(run_dir)
    config, done = _read_run(run_dir)
    method = done["method"]
    model_dir = run_dir / "model"
    found = find_results(run_dir, model_dir, method, list(results))
    sd = "concept" in done
    if sd:
        base = str(done.get("base_model") or config.get("model", {}).get("pretrained", ""))
        erased = str(done["concept"])
        subject = f"the concept **{erased}**"
        sections = _method_sections(method)
        ratio = config.get("mask", {}).get("ratio") if "mask" in sections else None
        tags = ["stable-diffusion", "text-to-image", "diffusers", "concept-erasure", "machine-unlearning", method, erased]
        pipeline_tag = "text-to-image"
    else:
        base = str(run_dir.parent.parent / "ddpm" / "model")
        erased = f"class {done['forget_class']}"
        dataset = config.get("data", {}).get("name", "its dataset")
        subject = f"**class {done['forget_class']}** of {dataset} (steered to class {done.get('target_class')})"
        sections = ["unlearn"]
        ratio = config.get("unlearn", {}).get("mask", {}).get("ratio") if method in ("salun", "random") else None
        tags = ["diffusers", "class-conditional", "ddpm", "machine-unlearning", method]
        pipeline_tag = "unconditional-image-generation"

    from huggingface_hub import ModelCard, ModelCardData

    license_ = base_license(base)
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,  # the Hub accepts only repo ids here
        license=license_,
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(t.replace(" ", "-").lower() for t in tags)),
    )
    method_name = METHOD_NAMES.get(method, method)
    kept = done.get("mask_kept_fraction")
    body = [
        f"# {erased} erased from {base} with {method}",
        "",
        f"This model is `{base}` with {subject} erased by {method_name}, made with erasure {__version__}.",
        "",
        "## How it was erased",
        "",
        f"- base model: `{base}`",
        f"- erased: {subject}",
        f"- method: `{method}`",
    ]
    if ratio is not None:
        body.append(f"- mask ratio: {ratio} (configured fraction of weights allowed to change)")
    else:
        body.append("- mask: none (every trained weight may change)")
    if kept is not None:
        body.append(f"- weights allowed to change: {100 * kept:.2f}% (measured on the saved mask)")
    delta = run_dir / "delta.safetensors"
    if sd and isinstance(done.get("delta"), dict):
        body.append(f"- changed: {done['delta']['entries']:,} entries in {done['delta']['tensors']} UNet tensors (`delta.safetensors`)")
    if done.get("seconds") is not None:
        body.append(f"- training time: {done['seconds'] / 60:.1f} minutes")
    body += ["", "Settings:", "", *_settings_table(config, sections), ""]
    body += _results_section(found, run_dir, model_dir)
    command = done.get("command")
    body += ["## The command that made it", "", "```bash", command or "(not recorded: the run predates command recording)", "```", ""]
    body += [f"The full resolved config is `config.yaml` in the run folder (`{run_dir}`).", ""]
    body += ["## Use", "", "```python"]
    if sd:
        cls = _pipeline_class(model_dir)
        body += [f"from diffusers import {cls}", "", "# this folder, or the Hub repo it was pushed to",
                 f'pipe = {cls}.from_pretrained("{model_dir}")']  # fmt: skip
    elif (model_dir / "config.json").is_file() and read_json(model_dir / "config.json").get("_class_name") != "UNet2DModel":
        # A UNet2DModel subclass of ours (the reference layout): diffusers alone cannot build it.
        body += ["from erasure.ddpm.model import load_unet", "", "# this folder (a Hub repo: snapshot_download it first)",
                 f'unet = load_unet("{model_dir}")']  # fmt: skip
    else:
        body += ["from diffusers import UNet2DModel", "", "# this folder, or the Hub repo it was pushed to",
                 f'unet = UNet2DModel.from_pretrained("{model_dir}")']  # fmt: skip
    body += ["```", ""]
    if delta.is_file():
        body += ["Or merge the delta (only the changed weights) onto the base model:", "", "```bash",
                 f"erasure sd apply-delta --base {base} --delta {delta} --out erased-model", "```", ""]  # fmt: skip
    body += ["## License", ""]
    if license_:
        body.append(f"`{license_}`, the license of the base model `{base}`; its use restrictions apply to this model too.")
    else:
        body.append(f"The license of the base model `{base}` is not known here: check it before sharing this model.")
    body.append("")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def write_cards(run_dir: str | Path, results: list[str | Path] = ()) -> list[Path]:
    """Write ``README.md`` into the run folder and into its ``model/`` folder; returns the paths written."""
    run_dir = Path(run_dir)
    text = model_card(run_dir, results)
    paths = [run_dir / "README.md"]
    if (run_dir / "model").is_dir():
        paths.append(run_dir / "model" / "README.md")
    for path in paths:
        write_text(path, text)
    return paths
