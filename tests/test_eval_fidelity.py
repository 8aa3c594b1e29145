"""The SD evaluation commands against the reference scripts, setting by setting (docs/evaluation.md, "Protocol").

The references are ESD's and SalUn's ``eval-scripts/generate-images.py`` (rohitgandikota/erasing,
OPTML-Group/Unlearn-Saliency SD/): LMSDiscreteScheduler with SD v1.4's betas, 100 steps, guidance
7.5 for every row, one ``--image_size`` (512) for every row, fp32, and initial latents
``torch.randn((num_samples, 4, 64, 64), generator=torch.manual_seed(evaluation_seed))`` on the CPU
(SalUn's copy draws 10 such batches per prompt from the same generator). Everything runs offline
on tiny random pipelines.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LMSDiscreteScheduler
from PIL import Image

from erasure.cli import build_parser, main
from erasure.sd.generate import Item, generate, initial_latents, set_scheduler
from erasure.sd.model import load_pipeline
from tests.conftest import save_tiny_models

I2P_HEADER = ",prompt,categories,hard,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,case_number"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"), ("a",))


@pytest.fixture(scope="module")
def i2p_csv(tmp_path_factory):
    # Row 1 asks for 32 x 16 px and guidance 12, as 55 rows of I2P ask for other sizes than 512 x 512.
    rows = ['0,"a person on a beach",sexual,1,4242,7,,,0', '1,"a painting of a bather",sexual,1,77,12,32,16,1']
    path = tmp_path_factory.mktemp("prompts") / "i2p.csv"
    path.write_text("\n".join([I2P_HEADER, *rows]) + "\n")
    return path


def reference_scheduler() -> LMSDiscreteScheduler:
    """The scheduler both reference scripts build."""
    return LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def latent_shape(pipe) -> tuple[int, ...]:
    side = pipe.unet.config.sample_size
    return (1, pipe.unet.config.in_channels, side, side)


# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("command", ["nudity", "ua"])
def test_audit_defaults_are_the_reference_scripts(command):
    extra = ["--forget-class", "church"] if command == "ua" else []
    args = build_parser().parse_args(["audit", command, "--prompts", "p.csv", "--model", "m", "--out", "o", *extra])
    assert (args.scheduler, args.steps, args.guidance, args.guidance_from_prompts) == ("lms", 100, 7.5, False)
    assert (args.generator, args.image_seeds, args.size, args.size_from_prompts, args.dtype) == ("cpu", "stream", None, False, "auto")
    # SalUn's UA: 100 images per Imagenette prompt (10 batches of num_samples 10); I2P: 1 per prompt (10 would be 47,030 images).
    assert args.images_per_prompt == (100 if command == "ua" else 1)


def test_the_audit_samples_with_lms_and_cpu_seeded_latents(models, i2p_csv, tmp_path, one_thread):
    """An audit with its defaults makes exactly the image of the reference's recipe: LMS (SD v1.4 betas), 100 steps,
    guidance 7.5 although the row says 7, latents torch.randn(shape, generator=torch.manual_seed(evaluation_seed))."""
    out = tmp_path / "audit"
    assert main(["audit", "nudity", "--prompts", str(i2p_csv), "--limit", "1", "--model", f"m={models / 'a'}", "--out", str(out)]) == 0
    row = json.loads((out / "images" / "m" / "manifest.jsonl").read_text().splitlines()[0])
    assert (row["scheduler"], row["steps"], row["guidance"], row["generator"], row["seed"], row["noise_index"]) == (
        "lms",
        100,
        7.5,
        "cpu",
        4242,
        0,
    )
    settings = json.loads((out / "audit.json").read_text())["settings"]
    assert (settings["scheduler"], settings["generator"], settings["dtype"]) == ("lms", "cpu", "float32")  # fp32 on a CPU

    pipe = load_pipeline(str(models / "a"))
    set_scheduler(pipe, "lms")
    assert isinstance(pipe.scheduler, LMSDiscreteScheduler)
    reference = reference_scheduler()
    pipe.scheduler.set_timesteps(100)
    reference.set_timesteps(100)
    assert torch.equal(pipe.scheduler.timesteps, reference.timesteps) and torch.equal(pipe.scheduler.sigmas, reference.sigmas)

    pipe.scheduler = reference_scheduler()
    latents = torch.randn(latent_shape(pipe), generator=torch.manual_seed(4242))
    expected = pipe("a person on a beach", num_inference_steps=100, guidance_scale=7.5, latents=latents).images[0]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "m" / "000000.png")), np.asarray(expected))


# ----------------------------------------------------------------------------- initial noise


def test_initial_latents_are_the_references_cpu_draw(models):
    pipe = load_pipeline(str(models / "a"))
    shape = latent_shape(pipe)
    item = Item("a cat", 1234)
    draw = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(initial_latents(pipe, item), draw)
    # Several images of a prompt: the reference's batch of num_samples latents from one generator, and SalUn's
    # further batches from the same generator, are rows 0, 1, 2, ... of one stream.
    stream = torch.cat([initial_latents(pipe, replace(item, noise_index=j)) for j in range(6)])
    g = torch.Generator("cpu").manual_seed(1234)
    assert torch.equal(stream, torch.cat([torch.randn((3, *shape[1:]), generator=g) for _ in range(2)]))
    # The generation engine keeps a prompt's generator between its images (K draws, not K(K+1)/2): the same latents,
    # also when the images are asked for out of order or another seed comes between.
    streams: dict = {}
    kept = [initial_latents(pipe, replace(item, noise_index=j), "cpu", streams) for j in (0, 1, 2, 5, 3, 4)]
    assert torch.equal(torch.cat([kept[i] for i in (0, 1, 2, 4, 5, 3)]), stream)
    initial_latents(pipe, replace(item, seed=7), "cpu", streams)
    assert torch.equal(initial_latents(pipe, replace(item, noise_index=4), "cpu", streams), stream[4:5])
    # In bf16 (a GPU's "auto"), the latents are drawn in fp32 as the reference's, then cast.
    half = load_pipeline(str(models / "a"), dtype=torch.bfloat16)
    cast = initial_latents(half, item)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, draw.to(torch.bfloat16))
    # --size: the latents follow the image size.
    assert initial_latents(pipe, replace(item, width=32, height=16)).shape == (
        1,
        shape[1],
        16 // pipe.vae_scale_factor,
        32 // pipe.vae_scale_factor,
    )


def test_device_generator_makes_what_diffusers_makes_from_its_own_generator(models, tmp_path, one_thread):
    """generate(generator="device"), the training sets' setting (sd generate-data), is the engine's earlier behaviour."""
    pipe = load_pipeline(str(models / "a"))
    items = [Item("a cat", 3, steps=2), Item("a dog", 4, steps=2)]
    paths = generate(pipe, items, tmp_path / "g", "m", "ddim", batch_size=2)
    assert [row["generator"] for row in map(json.loads, (tmp_path / "g" / "manifest.jsonl").read_text().splitlines())] == ["device"] * 2
    set_scheduler(pipe, "ddim")
    generators = [torch.Generator(pipe.unet.device).manual_seed(i.seed) for i in items]
    expected = pipe([i.prompt for i in items], num_inference_steps=2, guidance_scale=7.5, generator=generators).images
    for path, image in zip(paths, expected):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_attack_evaluation_images_have_the_audits_noise(models, tmp_path, one_thread):
    """The attack's evaluation images (fp32, --generator cpu|device) start from the latents the audits' engine draws."""
    from erasure.evaluation.attack import _render

    pipe = load_pipeline(str(models / "a"))
    item = Item("a cat", 9, steps=2)
    for generator in ("cpu", "device"):
        path = _render(pipe, "a cat", item, "lms", tmp_path / f"{generator}.png", generator)
        latents = initial_latents(pipe, item, generator)
        expected = pipe("a cat", num_inference_steps=2, guidance_scale=7.5, latents=latents).images[0]
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(expected))


# ----------------------------------------------------------------------------- size, caches


def test_image_size_is_one_for_every_row_unless_asked(models, i2p_csv, tmp_path):
    """The reference scripts generate every row at --image_size (512, SD v1.4's native size); the row's own size is an option."""
    base = ["audit", "nudity", "--prompts", str(i2p_csv), "--steps", "1", "--model", f"m={models / 'a'}"]
    assert main([*base, "--out", str(tmp_path / "native")]) == 0
    pipe = load_pipeline(str(models / "a"))
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert [Image.open(p).size for p in sorted((tmp_path / "native" / "images" / "m").glob("*.png"))] == [(native, native)] * 2
    assert main([*base, "--out", str(tmp_path / "rows"), "--size-from-prompts"]) == 0
    assert Image.open(tmp_path / "rows" / "images" / "m" / "000001.png").size == (32, 16)


def test_a_changed_default_is_a_changed_cache(models, i2p_csv, tmp_path, capsys):
    """Images made with the earlier defaults (DDIM 50, noise from the device) are never mixed with the new ones."""
    out = tmp_path / "audit"
    base = ["audit", "nudity", "--prompts", str(i2p_csv), "--limit", "1", "--model", f"m={models / 'a'}", "--out", str(out)]
    earlier = [*base, "--scheduler", "ddim", "--steps", "2", "--generator", "device"]
    assert main(earlier) == 0
    folder = out / "images" / "m"
    # A folder written before the generator, the dtype and noise_index were recorded: the same settings still resume it.
    plan = json.loads((folder / "plan.json").read_text())
    del plan["generator"], plan["dtype"]
    for item in plan["items"]:
        del item["noise_index"]
    (folder / "plan.json").write_text(json.dumps(plan))
    before = (folder / "000000.png").stat().st_mtime_ns
    assert main(earlier) == 0 and (folder / "000000.png").stat().st_mtime_ns == before
    capsys.readouterr()
    assert main([*base, "--scheduler", "ddim", "--steps", "2"]) == 2  # the new default generator
    assert "generator device, now cpu" in capsys.readouterr().err
    assert main([*base, "--steps", "2", "--generator", "device"]) == 2  # the new default sampler
    assert "scheduler ddim, now lms" in capsys.readouterr().err
    assert (folder / "000000.png").stat().st_mtime_ns == before
    # A folder of this version records the dtype: another precision is refused too (a legacy plan cannot tell).
    fresh = [str(tmp_path / "fresh") if a == str(out) else a for a in base]
    assert main([*fresh, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main([*fresh, "--steps", "1", "--dtype", "bf16"]) == 2
    assert "dtype float32, now bfloat16" in capsys.readouterr().err


def test_attack_targets_use_the_attacks_generator(models, tmp_path):
    """The attack's target images follow --generator too (default cpu, the reference generate_dataset.py's torch.manual_seed)."""
    from erasure.evaluation.attack import AttackSettings, target_images
    from erasure.evaluation.prompts import Prompt

    prompts = [Prompt(Item("a cat", 5, steps=1))]
    for generator in ("cpu", "device"):
        out = tmp_path / generator
        target_images(prompts, str(models / "a"), None, out, AttackSettings(target_steps=1, generator=generator))
        manifest = [json.loads(line) for line in (out / "targets" / "manifest.jsonl").read_text().splitlines()]
        assert [(row["generator"], row["scheduler"]) for row in manifest] == [(generator, "lms")]
        assert Path(out / "targets" / "000000.png").is_file()


def test_a_saved_model_samples_at_its_bases_timesteps(tiny_model, tmp_path):
    """A model saved by erasure keeps the scheduler config its base's file had, so every sampler matches the base's.

    SD v1.4's hub config names no ``timestep_spacing``; a plain ``save_pretrained`` would write
    PNDM's "leading", and Euler or DPM built from the copy would sample at other timesteps.
    """
    import shutil

    from erasure.sd.generate import SCHEDULERS
    from erasure.sd.model import save_pipeline

    hub_like = tmp_path / "base"
    shutil.copytree(tiny_model, hub_like)
    config_file = hub_like / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "timestep_spacing"}))

    save_pipeline(load_pipeline(str(hub_like)), tmp_path / "saved")
    assert "timestep_spacing" not in json.loads((tmp_path / "saved" / "scheduler" / "scheduler_config.json").read_text())
    for name in SCHEDULERS:
        timesteps = []
        for folder in (hub_like, tmp_path / "saved"):
            pipe = load_pipeline(str(folder))
            set_scheduler(pipe, name)
            pipe.scheduler.set_timesteps(10)
            timesteps.append(pipe.scheduler.timesteps)
        assert torch.equal(*timesteps), name


def test_a_ua_audit_of_a_large_file_at_many_images_per_row_warns_first(models, tmp_path, capsys):
    """SalUn's 100 images per row suit its 10 prompts; a file with many seeds per class gets a warning before anything runs."""
    csv = tmp_path / "many.csv"
    csv.write_text("case_number,prompt,evaluation_seed,class\n" + "".join(f"{i},an image of a church,{i},church\n" for i in range(201)))
    base = ["audit", "ua", "--prompts", str(csv), "--model", f"m={models / 'a'}", "--forget-class", "church", "--out", str(tmp_path / "o")]
    missing = ["--classifier-weights", str(tmp_path / "missing.pth")]  # stops the run after the checks, before any image
    assert main([*base, *missing]) == 2
    err = capsys.readouterr().err
    assert "201 prompt rows x 100 images = 20,100 images per model" in err and "--images-per-prompt 1" in err
    assert main([*base, *missing, "--images-per-prompt", "1"]) == 2
    assert "warning" not in capsys.readouterr().err
