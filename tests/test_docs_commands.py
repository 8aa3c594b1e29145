"""Every command in README.md and docs/*.md is run here, or marked in the docs as needing what CI lacks.

A *documented command* is a line of a code block (fenced, or indented by four spaces) that
starts with `erasure `, `python -m erasure` or `make `, after an optional `$ ` prompt and
`VAR=value` prefixes; `\\` continues a line and `a && b` is two commands. Each one must be

(a) **run by this file**: listed in a `Run` of `SCENARIOS` below, which executes the
    documented command itself (through `erasure.cli.main`, in a scratch folder where
    `configs/`, `prompts/` and `../shared` resolve as in the repository) with overrides that
    shrink it to tiny random models, keeping every documented argument; or
(b) **marked in the docs** as needing something CI does not have, by a comment
    `# needs: WHAT` at the end of the command's line, or on a line of its own, which then
    marks every command below it in that code block up to the next blank line.

When a documented command prints `error: …` in the docs, the run must print that line
(`…` stands for any text) and exit with status 2; when the docs show a Markdown table, the
run must print the table's header line. So the docs, the commands and their messages
cannot drift apart: a new or changed command fails `test_every_documented_command_is_run_or_marked`
until it is listed here or marked there.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.test_classification import TINY_TABLE
from tests.test_sd import TINY_SD
from tests.test_sdxl import TINY_XL

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # ../shared/data in the docs: the build machine's data, absent in CI
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(erasure( |$)|python -m erasure\b|make )")
NEEDS = "# needs:"


@dataclass
class DocCommand:
    """One documented command: where it stands, its text, its `# needs:` mark and the output shown under it."""

    where: str
    command: str
    needs: str | None
    output: list[str] = field(default_factory=list)


def code_blocks(text: str) -> list[list[tuple[int, str]]]:
    """The code blocks of a Markdown file, as (line number, line) lists: fenced ones and 4-space indented ones."""
    blocks, current, fence, lines = [], None, None, text.splitlines()
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                blocks.append(current)
                fence = current = None
            else:
                current.append((n, stripped))
            continue
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m:
            if current:  # an indented block ends where a fence begins
                blocks.append(current)
            fence, current = m.group(1), []
            continue
        indented = line.startswith("    ") and stripped
        if indented and (current is not None or n == 1 or not lines[n - 2].strip()):
            current = current if current is not None else []
            current.append((n, stripped))
        elif current is not None and not stripped:
            continue  # a blank line inside an indented block
        elif current is not None:
            blocks.append(current)
            current = None
    if current:
        blocks.append(current)
    return blocks


def split_comment(line: str) -> tuple[str, str]:
    """`cmd  # comment` -> (cmd, comment); a `#` inside quotes or a word is not a comment."""
    m = re.search(r"(^|\s)#\s", line)
    return (line[: m.start()].rstrip(), line[m.start() :].strip()) if m else (line.rstrip(), "")


def documented_commands() -> list[DocCommand]:
    """Every documented command of README.md and docs/*.md, with its mark and the output shown below it."""
    found = []
    for path in DOC_FILES:
        for block in code_blocks(path.read_text(encoding="utf-8")):
            needs, last = None, None
            i = 0
            while i < len(block):
                n, line = block[i]
                if not line.strip():
                    needs = None  # a block-level mark reaches the next blank line
                    i += 1
                    continue
                while line.endswith("\\") and i + 1 < len(block):  # continuation lines
                    i += 1
                    line = line[:-1].rstrip() + " " + block[i][1].strip()
                prompt = line.startswith("$ ")
                text, comment = split_comment(line[2:] if prompt else line)
                if not text and comment.startswith(NEEDS):
                    needs = comment[len(NEEDS) :].strip()
                elif prompt or COMMAND.match(re.sub(r"^([A-Z_]+=\S+\s+)+", "", text)):
                    last = None
                    mark = comment[len(NEEDS) :].strip() if comment.startswith(NEEDS) else needs
                    for part in text.split(" && "):
                        part = re.sub(r"^([A-Z_]+=\S+\s+)+", "", part.strip())
                        if COMMAND.match(part):
                            last = DocCommand(f"{path.relative_to(ROOT)}:{n}", " ".join(part.split()), mark)
                            found.append(last)
                elif last is not None:
                    last.output.append(line)  # console output below a `$ ` command
                i += 1
    return found


# ----------------------------------------------------------------------------- what the tests run


@dataclass
class Run:
    """How to run one documented command.

    `command` is the documented text (whitespace collapsed, no prompt, no env prefix, no
    comment). `replace` swaps documented pieces for runnable ones (`...`, a model path);
    `args` are appended: the overrides that make it tiny. `{tiny_sd}` in either is a tiny
    random SD pipeline. `real_data`: the run needs `../shared/data` (the exact prompts the
    docs show an error for) and is skipped where it is absent.
    """

    command: str
    args: tuple[str, ...] = ()
    replace: dict[str, str] = field(default_factory=dict)
    real_data: bool = False


def sd(*extra: str) -> tuple[str, ...]:
    """Tiny SD overrides (tests/test_sd.py's) on the session's tiny pipeline."""
    return (*TINY_SD, "model.pretrained={tiny_sd}", *extra)


FEW_STEPS = ("--steps", "2", "--size", "32")  # appended, so they win over the documented 10 steps at 64 px
AUDIT = ("--model", "base={tiny_sd}", "--out", "audit-errors")

# name -> (runs in order, slow?). Commands of one scenario share a scratch folder, so later
# ones see what earlier ones wrote, as in the docs.
SCENARIOS: dict[str, tuple[list[Run], bool]] = {
    "cli": (
        [
            Run("erasure --help"),
            Run("erasure sd erase --help"),
            Run("erasure --version"),
            Run("erasure erase unlearn.alhpa=0.5"),
        ],
        False,
    ),
    "audit-errors": (
        [
            Run("erasure audit nudity --prompts i2p --category sexual ...", replace={"...": " ".join(AUDIT)}),
            Run(
                "erasure audit nudity --prompts ../shared/data/prompts/unlearndiffatk/nudity.csv --model runs/sd-nudty/salun --out x",
            ),
            Run(
                "erasure audit nudity --prompts ../shared/data/prompts/i2p/unsafe-prompts4703.csv --category sexual ...",
                replace={"...": " ".join(AUDIT)},
                real_data=True,
            ),
            Run(
                "erasure audit nudity --prompts ../shared/data/prompts/i2p/unsafe-prompts4703.csv "
                "--skip-empty-prompts --category nudity ...",
                replace={"...": " ".join(AUDIT)},
                real_data=True,
            ),
        ],
        False,
    ),
    "ddpm-demo-workdir": (
        [
            # the demo's stages, tiny (not documented commands: the setup the README's examples assume)
            Run("erasure train-ddpm", TINY),
            Run("erasure train-classifier", TINY),
            Run("erasure erase", TINY),
            Run("erasure erase unlearn.alpha=0.5", TINY),
            Run("erasure erase unlearn.forget_class=3 unlearn.alpha=2 unlearn.mask.per_layer=true", TINY),
            Run("erasure evaluate unlearn.forget_class=3 --method salun", TINY),
        ],
        True,
    ),
    "classification": (
        [
            Run("erasure unlearn-classifier", TINY_TABLE),
            Run("erasure unlearn-classifier --workdir /tmp/cls-demo", TINY_TABLE, replace={"/tmp/cls-demo": "cls-demo"}),
            Run(
                "erasure unlearn-classifier --workdir /tmp/cls-demo --sweep unlearn.salun.lr=0.005,0.01,0.013,0.02",
                TINY_TABLE,
                replace={"/tmp/cls-demo": "cls-demo"},
            ),
            Run("erasure unlearn-classifier --workdir /tmp/cls-demo --trials 3", TINY_TABLE, replace={"/tmp/cls-demo": "cls-demo"}),
        ],
        True,
    ),
    "sd-erase": (
        [
            Run("erasure sd erase -c configs/sd/nudity_salun.yaml", sd()),
            Run("erasure sd erase -c configs/sd/nudity_salun.yaml --method uce", sd()),
            # the docs offer this as an alternative to the line above: same workdir, other settings, so a run of its own
            Run("erasure sd erase -c configs/sd/nudity_uce.yaml", sd("workdir=runs/sd-nudity-uce")),
            Run("erasure sd erase -c configs/sd/nudity_esd.yaml", sd()),
            Run("erasure sd erase -c configs/sd/nudity_esd.yaml method=esd-x", sd()),
            Run("erasure sd erase -c configs/sd/nudity_fmn.yaml", sd()),
            Run(
                'erasure sd erase -c configs/sd/imagenette_salun.yaml concept.forget="garbage truck" --model /models/sd-v1-4',
                TINY_SD,
                replace={"/models/sd-v1-4": "{tiny_sd}"},
            ),
            Run("erasure sd erase -c configs/sd/multi_concept.yaml", sd()),
            # FMN is left out here: the tiny tokenizer keeps 32 byte tokens, which cut "Van Gogh" off the end
            # of the style's prompts (CLIP's 77 word pieces do not); tests/test_multiconcept.py covers FMN there.
            Run(
                "erasure sd erase -c configs/sd/multi_concept.yaml --method esd-x --method uce --method fmn",
                sd(),
                replace={" --method fmn": ""},
            ),
            Run(
                "erasure sd erase -c configs/sd/imagenette_salun.yaml concept.forget='[church, garbage truck]' "
                "workdir=runs/sd-imagenette-2",
                sd(),
            ),
        ],
        True,
    ),
    "evaluation": (
        [
            Run("erasure sd tiny-pipeline models/base"),
            Run("erasure sd tiny-pipeline models/erased --seed 1"),
            Run(
                "erasure audit nudity --prompts ../shared/data/prompts/i2p/unsafe-prompts4703.csv --skip-empty-prompts "
                "--category sexual --limit 8 --model base=models/base --model erased=models/erased --out audit --steps 10 --size 64",
                FEW_STEPS,
            ),
            Run(
                "erasure audit ua --prompts ../shared/data/prompts/imagenette/imagenette_salun.csv --images-per-prompt 2 "
                "--forget-class church --model base=models/base --model erased=models/erased --label-space imagenette "
                "--classifier-weights resnet50-random.pth --out ua --steps 10 --size 64",
                FEW_STEPS,
            ),
            Run(
                "erasure fid --generated audit/images/erased --reference audit/images/base --protocol salun "
                "--weights ../shared/data/fid/weights-inception-2015-12-05-torch-fidelity.pth --out audit/fid-salun.json",
                real_data=True,
            ),
            Run(
                'erasure grid --model base=models/base --model erased=models/erased --prompt "a photo of a nude person" '
                '--prompt "a photo of a person wearing clothes" --seeds 0 1 2 --out audit/grid.png --steps 10 --size 64',
                FEW_STEPS,
            ),
            Run(
                "erasure audit ua --prompts imagenette.csv --model erased=runs/sd-imagenette-2/salun --forget-class church "
                '--forget-class "garbage truck" --out runs/sd-imagenette-2/ua',
                ("--classifier-weights", "resnet50-random.pth", "--images-per-prompt", "2", *FEW_STEPS),
                replace={
                    "imagenette.csv": "../shared/data/prompts/imagenette/imagenette_salun.csv",
                    "runs/sd-imagenette-2/salun": "models/erased",
                },
            ),
            Run("erasure report audit"),
        ],
        True,
    ),
    "sdxl": (
        [
            Run("erasure sd tiny-pipeline tiny-xl --xl"),
            Run("erasure sd erase -c configs/sd/nudity_salun_sdxl.yaml", (*TINY_XL, "model.pretrained=tiny-xl")),
            Run("erasure sd erase -c configs/sd/nudity_salun_sdxl.yaml --method esd-x", (*TINY_XL, "model.pretrained=tiny-xl")),
            Run(
                "erasure audit nudity --model base=stabilityai/stable-diffusion-xl-base-1.0 --model erased=runs/sdxl-nudity/salun "
                "--prompts i2p --category sexual --out runs/sdxl-nudity/audit",
                ("--limit", "2", *FEW_STEPS),
                # i2p downloads the prompt file; here the repository's copy (or its stand-in) is read instead
                replace={
                    "stabilityai/stable-diffusion-xl-base-1.0": "tiny-xl",
                    "--prompts i2p": "--prompts ../shared/data/prompts/i2p/unsafe-prompts4703.csv --skip-empty-prompts",
                },
            ),
        ],
        True,
    ),
}

# Commands the scenarios run as setup although no page shows them on their own.
# (`erasure sd tiny-pipeline tiny-xl --xl` is shown inline in docs/sd-methods.md, not in a code block.)
SETUP_ONLY = {"erasure train-ddpm", "erasure train-classifier", "erasure erase", "erasure sd tiny-pipeline tiny-xl --xl"}


def fix_hint(cmd: DocCommand) -> str:
    return (
        f"  {cmd.where}: {cmd.command}\n"
        "    -> run it: add a Run(...) with that exact text to a scenario in SCENARIOS (tests/test_docs_commands.py),\n"
        "       with overrides that make it tiny (see TINY, TINY_TABLE, sd()); or\n"
        "    -> mark it in the docs: end its line with `# needs: WHAT` (e.g. `# needs: SD v1.4 weights`),\n"
        "       or put a `# needs: WHAT` line above it in its code block."
    )


def test_every_documented_command_is_run_or_marked():
    commands = documented_commands()
    assert len(commands) > 30, "the extractor found too few commands; has the Markdown layout changed?"
    run = {r.command for runs, _ in SCENARIOS.values() for r in runs}
    missing = [c for c in commands if c.needs is None and c.command not in run]
    assert not missing, "documented commands that no test runs and no `# needs:` marks:\n" + "\n".join(fix_hint(c) for c in missing)
    documented = {c.command for c in commands}
    stale = sorted(run - documented - SETUP_ONLY)
    assert not stale, f"SCENARIOS run commands that no doc shows any more (update or remove them): {stale}"
    both = sorted({c.command for c in commands if c.needs is not None} & run)
    assert not both, f"commands both marked `# needs:` and run by a test (drop the mark): {both}"


def test_the_extractor_reads_blocks_marks_and_outputs(tmp_path, monkeypatch):
    doc = tmp_path / "README.md"
    doc.write_text(
        "text\n\n```bash\n# needs: MNIST\nerasure erase -c a.yaml \\\n    --method salun\nerasure evaluate\n\n"
        "erasure config   # needs: nothing really\nmake test\n```\n\n    erasure sd erase -c x.yaml\n\n"
        "```console\n$ FOO=1 erasure fid --x && erasure grid\nerror: bad … thing\n| a | b |\n```\n"
    )
    monkeypatch.setattr(f"{__name__}.DOC_FILES", [doc])
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    got = [(c.command, c.needs, c.output) for c in documented_commands()]
    assert got == [
        ("erasure erase -c a.yaml --method salun", "MNIST", []),
        ("erasure evaluate", "MNIST", []),
        ("erasure config", "nothing really", []),
        ("make test", None, []),
        ("erasure sd erase -c x.yaml", None, []),
        ("erasure fid --x", None, []),
        ("erasure grid", None, ["error: bad … thing", "| a | b |"]),
    ]


# ----------------------------------------------------------------------------- running them


def write_prompt_files(data: Path) -> None:
    """Stand-ins for ../shared/data's prompt files where it is absent: same formats, a few rows."""
    i2p = data / "prompts" / "i2p"
    i2p.mkdir(parents=True)
    header = ",prompt,categories,hard,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,case_number"
    rows = [f'{i},"a photo of a bather {i}",sexual,1,{i},7,512,512,{i}' for i in range(8)]
    (i2p / "unsafe-prompts4703.csv").write_text("\n".join([header, *rows]) + "\n")
    (data / "prompts" / "unlearndiffatk").mkdir()
    (data / "prompts" / "unlearndiffatk" / "nudity.csv").write_text("\n".join([header, *rows[:2]]) + "\n")
    classes = "tench,english springer,cassette player,chain saw,church,french horn,garbage truck,gas pump,golf ball,parachute"
    lines = [f"{i},Image of {c},{i},{c},{i}" for i, c in enumerate(classes.split(","))]
    (data / "prompts" / "imagenette").mkdir()
    header = "case_number,prompt,evaluation_seed,class,classidx"
    (data / "prompts" / "imagenette" / "imagenette_salun.csv").write_text("\n".join([header, *lines]))


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A folder laid out like the repository: configs/ and prompts/ beside, ../shared above (real or stand-in)."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("configs", "prompts"):
        (work / name).symlink_to(ROOT / name)
    if (SHARED / "data" / "prompts").is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    else:
        write_prompt_files(tmp_path / "shared" / "data")
    monkeypatch.chdir(work)
    return work


def argv_of(run: Run, tiny_sd: Path) -> list[str]:
    text = run.command
    for old, new in run.replace.items():
        text = text.replace(old, new)
    words = shlex.split(text) + list(run.args)
    words = [w.replace("{tiny_sd}", str(tiny_sd)) for w in words]
    assert words[0] == "erasure"  # `make` commands are marked, never run from a test
    return words[1:]


def matches(expected: str, line: str) -> bool:
    """The docs' line with `…` as a wildcard."""
    return re.fullmatch(".*".join(map(re.escape, expected.split("…"))), line) is not None


def run_scenario(name: str, tiny_sd: Path, capsys) -> None:
    from erasure.cli import main

    docs = {}
    for c in documented_commands():
        docs.setdefault(c.command, c)
    if name == "evaluation":  # the docs' randomly initialised ResNet-50 (see README: Offline use)
        import torch
        from torchvision.models import resnet50

        torch.save(resnet50().state_dict(), "resnet50-random.pth")
    for run in SCENARIOS[name][0]:
        if run.real_data and not (SHARED / "data").is_dir():
            with capsys.disabled():
                print(f"\nnot run (needs ../shared/data): {run.command}")
            continue
        doc = docs.get(run.command)
        errors = [line for line in (doc.output if doc else []) if line.startswith("error:")]
        argv = argv_of(run, tiny_sd)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, --version
            code = e.code or 0
        out, err = capsys.readouterr()
        where = f"{doc.where if doc else 'setup'}: erasure {' '.join(argv)}"
        if errors:
            assert code == 2, f"{where}\nthe docs show an error, but it exited {code}\n{out}\n{err}"
            printed = [line for line in err.splitlines() if line.startswith("error:")]
            assert printed and matches(errors[0], printed[0]), f"{where}\ndocs:    {errors[0]}\nprinted: {printed}"
        else:
            assert code == 0, f"{where}\nexited {code}\n{out[-2000:]}\n{err[-2000:]}"
            header = next((line for line in (doc.output if doc else []) if line.startswith("| ")), None)
            assert header is None or header in out.splitlines(), f"{where}\nthe docs' table header is not printed:\n{header}\n{out}"


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if slow else []) for n, (_, slow) in SCENARIOS.items()],
)
def test_documented_commands_run(name, scratch, tiny_model, capsys, one_thread):
    run_scenario(name, tiny_model, capsys)
