"""A table of bad inputs over every path: each is a one-line error with exit code 2, never a traceback.

Every case fails before any training (at the config boundary or the first check of a
command), so the table runs in seconds.
"""

import pytest

from erasure.cli import main

SD = ["sd", "erase", "-c", "configs/sd/nudity_salun.yaml"]
GEN = ["sd", "generate-data", "-c", "configs/sd/nudity_salun.yaml"]
CLS = ["unlearn-classifier"]
NUDITY = ["audit", "nudity", "--model", "m", "--out", "{tmp}/audit"]

CASES = {
    # DDPM: numbers out of range or not finite
    "ddpm negative lr": (["train-ddpm", "train.lr=-1"], "train.lr"),
    "ddpm nan lr": (["train-ddpm", "train.lr=.nan"], "train.lr' is nan"),
    "ddpm inf lr": (["erase", "unlearn.lr=.inf"], "unlearn.lr' is inf"),
    "ddpm zero batch": (["train-ddpm", "train.batch_size=0"], "train.batch_size"),
    "ddpm negative steps": (["train-ddpm", "train.steps=-5"], "train.steps"),
    "ddpm zero erase steps": (["erase", "unlearn.steps=0"], "unlearn.steps"),
    "ddpm zero erase batch": (["erase", "unlearn.batch_size=0"], "unlearn.batch_size"),
    "ddpm seed 2^64+5": (["erase", "unlearn.seed=18446744073709551621"], "64-bit"),
    "ddpm negative seed": (["train-ddpm", "train.seed=-1"], "train.seed"),
    "ddpm mask ratio 0": (["erase", "unlearn.mask.ratio=0"], "unlearn.mask.ratio"),
    "ddpm mask ratio 1.5": (["mask", "unlearn.mask.ratio=1.5"], "unlearn.mask.ratio"),
    "ddpm mask batches 0": (["mask", "unlearn.mask.batches=0"], "unlearn.mask.batches"),
    "ddpm ema decay 1": (["train-ddpm", "train.ema_decay=1"], "train.ema_decay"),
    "ddpm class dropout 1.5": (["train-ddpm", "train.class_dropout=1.5"], "train.class_dropout"),
    "ddpm grad clip negative": (["train-ddpm", "train.grad_clip=-1"], "train.grad_clip"),
    "ddpm warmup negative": (["train-ddpm", "train.warmup_steps=-1"], "train.warmup_steps"),
    "ddpm norm groups 0": (["train-ddpm", "model.norm_groups=0"], "model.norm_groups"),
    "ddpm channel 0": (["train-ddpm", "model.channels=[0,8]"], "model.channels"),
    "ddpm classifier steps 0": (["train-classifier", "classifier.steps=0"], "classifier.steps"),
    "ddpm classifier lr 0": (["train-classifier", "classifier.lr=0"], "classifier.lr"),
    "ddpm samples per class 0": (["evaluate", "eval.samples_per_class=0"], "eval.samples_per_class"),
    "ddpm sample steps 0": (["evaluate", "sample.steps=0"], "sample.steps"),
    "ddpm ddim eta 2": (["evaluate", "sample.eta=2"], "sample.eta"),
    "ddpm guidance nan": (["evaluate", "sample.guidance=.nan"], "sample.guidance"),
    "ddpm fid batch 0": (["evaluate", "eval.fid.batch_size=0"], "eval.fid.batch_size"),
    "ddpm forget class -1": (["mask", "unlearn.forget_class=-1"], "unlearn.forget_class"),
    "ddpm target shift 10": (["demo", "unlearn.target_shift=10"], "target_shift"),
    # DDPM: names, types, files
    "ddpm device tpu": (["erase", "device=tpu"], "choose auto, cpu, cuda or cuda:N"),
    "ddpm device cuda:99": (["train-ddpm", "device=cuda:99"], "device"),
    "ddpm unknown method": (["erase", "unlearn.method=nope"], "unknown method 'nope'"),
    "ddpm unknown eval method": (["evaluate", "eval.methods=[nope]"], "unknown method 'nope'"),
    "ddpm misspelt key": (["erase", "unlearn.alhpa=1"], "did you mean"),
    "ddpm steps not a number": (["train-ddpm", "train.steps=many"], "must be int"),
    "ddpm bad data name": (["train-ddpm", "data.name=imagenet"], "choose one of"),
    "ddpm workdir is a file": (["train-ddpm", "workdir={tmp}/file"], "is a file, not a folder"),  # the CLI boundary's message
    "ddpm missing config": (["train-ddpm", "-c", "{tmp}/missing.yaml"], "does not exist"),
    "ddpm erase without base": (["erase", "workdir={tmp}/empty"], "no finished base model"),
    # Stable Diffusion
    "sd lr 0": ([*SD, "train.lr=0"], "train.lr"),
    "sd steps 0": ([*SD, "train.steps=0"], "train.steps"),
    "sd batch 0": ([*SD, "train.batch_size=0"], "train.batch_size"),
    "sd log every 0": ([*SD, "train.log_every=0"], "train.log_every"),
    "sd weight decay nan": ([*SD, "train.weight_decay=.nan"], "train.weight_decay"),
    "sd seed negative": ([*SD, "train.seed=-1"], "train.seed"),
    "sd mask ratio 2": ([*SD, "mask.ratio=2"], "mask.ratio"),
    "sd esd ddim steps 0": ([*SD, "esd.ddim_steps=0"], "esd.ddim_steps"),
    "sd unknown method": ([*SD, "method=foo"], "unknown Stable Diffusion method"),
    "sd device gpu": ([*SD, "device=gpu"], "device"),
    "sd missing concept": ([*SD, "concept.spec={tmp}/missing.yaml"], "does not exist"),
    "sd images per set 0": ([*GEN, "generation.images_per_set=0"], "generation.images_per_set"),
    "sd generation steps 0": ([*GEN, "generation.steps=0"], "generation.steps"),
    "sd resolution 100": ([*GEN, "generation.resolution=100"], "multiple of 8"),
    "sd guidance inf": ([*GEN, "generation.guidance=.inf"], "generation.guidance"),
    "sd unknown scheduler": ([*GEN, "generation.scheduler=foo"], "generation.scheduler"),
    "sd generation batch word": ([*GEN, "generation.batch_size=big"], "must be int or one of 'auto'"),
    "sd generation batch 0": ([*GEN, "generation.batch_size=0"], "generation.batch_size"),
    "sd generation seed huge": ([*GEN, "generation.seed=99999999999999999999"], "64-bit"),
    # classification
    "cls epochs 0": ([*CLS, "train.epochs=0"], "train.epochs"),
    "cls ga lr negative": ([*CLS, "unlearn.ga.lr=-1"], "unlearn.ga.lr"),
    "cls iu alpha 0": ([*CLS, "unlearn.iu.alpha=0"], "unlearn.iu.alpha"),
    "cls rl epochs 0": ([*CLS, "unlearn.rl.epochs=0"], "unlearn.rl.epochs"),
    "cls ft epochs 0": ([*CLS, "unlearn.ft.epochs=0"], "unlearn.ft.epochs"),
    "cls salun lr nan": ([*CLS, "unlearn.salun.lr=.nan"], "unlearn.salun.lr"),
    "cls split seed negative": ([*CLS, "split.seed=-3"], "split.seed"),
    "cls unknown method": ([*CLS, "unlearn.methods=[foo]"], "unknown classification-unlearning method"),
    "cls fraction 1": ([*CLS, "forget.fraction=1"], "forget.fraction"),
    "cls momentum 1": ([*CLS, "unlearn.momentum=1"], "unlearn.momentum"),
    "cls eval batch 0": ([*CLS, "eval_batch_size=0"], "eval_batch_size"),
    "cls batch 0": ([*CLS, "unlearn.batch_size=0"], "unlearn.batch_size"),
    "cls width 0": ([*CLS, "model.width=0"], "model.width"),
    "cls device": ([*CLS, "device=cuda:x"], "device"),
    # audits (checks that live in the evaluation commands)
    "audit threshold 1.5": ([*NUDITY, "--prompts", "{tmp}/p.txt", "--threshold", "1.5"], "--threshold"),
    "audit limit 0": ([*NUDITY, "--prompts", "{tmp}/p.txt", "--limit", "0"], "--limit"),
    "audit batch size 0": ([*NUDITY, "--prompts", "{tmp}/p.txt", "--batch-size", "0"], "--batch-size"),
    "audit missing prompts": ([*NUDITY, "--prompts", "{tmp}/missing.txt"], "does not exist"),
}


@pytest.mark.parametrize("argv, expected", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_a_one_line_error_with_exit_code_2(argv, expected, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "p.txt").write_text("a photo\n")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    # A GPU recipe started on a CPU also prints its one documented warning line; the error itself is one line.
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.lower() in lines[0].lower(), lines[0]


def test_the_table_is_broad():
    assert len(CASES) >= 40
    paths = {"ddpm": 0, "sd": 0, "cls": 0, "audit": 0}
    for name in CASES:
        paths[name.split()[0]] += 1
    assert min(paths.values()) >= 3, paths
