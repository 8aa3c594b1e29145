"""ESD, FMN, UCE and UnlearnDiffAtk against facts read in their reference code (tiny models, offline).

- ESD ``esd.anchor``: train-esd.py's target ε₀ − η(ε_c − ε₀) and esd_sd.py's ε_c − η(ε_c − ε₀);
  ``esd.sampler=pndm`` and ``esd.resolution`` (esd_sd.py's PLMS trajectories at 1024 px).
- FMN: the reference's clip is a no-op, so its recipe does not clip.
- ``--method esd-x|fmn`` on another method's config warns that it trains with that config's settings.
- UCE counts duplicated preserve prompts as listed.
- UnlearnDiffAtk: success at NudeNet score >= 0.5, evaluation noise from a CPU generator.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from erasure.core.config import load_config
from erasure.core.errors import ErasureError
from erasure.sd.config import SDConfig
from tests.conftest import DEVICE
from tests.test_sd import tiny_method

ESD = ["train.batch_size=1", "esd.ddim_steps=3", "esd.cuda_graph=false"]


def esd_loss_by_hand(tiny_model, overrides: list[str], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ESD's loss, the loss computed here from the UNets' raw outputs and the anchor's formula) for one step."""
    method, model = tiny_method(tiny_model, "esd-x", [*ESD, *overrides])
    seen = {}
    trajectory = method._trajectory

    def recording(*args, **kwargs):
        seen["x_t"] = trajectory(*args, **kwargs)
        return seen["x_t"]

    method._trajectory = recording
    g = torch.Generator(DEVICE).manual_seed(seed)
    loss, logs = method.loss(model, g)
    cfg = method.ctx.config.esd
    x_t, t = seen["x_t"], torch.full((1,), int(logs["timestep"]), device=DEVICE)
    with torch.no_grad():
        e0 = method.teacher(x_t, t, encoder_hidden_states=method.ctx.uncond.hidden).sample.float()
        ec = method.teacher(x_t, t, encoder_hidden_states=method.concepts.hidden).sample.float()
        pred = model(x_t, t, encoder_hidden_states=method.concepts.hidden).sample.float()
    anchor = ec if cfg.anchor == "concept" else e0
    return loss.detach(), F.mse_loss(pred, anchor - cfg.eta * (ec - e0))


@pytest.mark.parametrize("anchor", ["uncond", "concept"])
def test_esd_target_of_each_anchor_matches_the_hand_computation(tiny_model, anchor):
    loss, by_hand = esd_loss_by_hand(tiny_model, [f"esd.anchor={anchor}", "esd.eta=2.0"])
    assert torch.allclose(loss, by_hand, rtol=1e-5, atol=1e-7)


def test_esd_sd_py_eta_2_is_train_esd_py_eta_1(tiny_model):
    """ε_c − 2(ε_c − ε₀) = ε₀ − 1·(ε_c − ε₀): the newer script's default target is the original's, not η 2's."""
    newer, _ = esd_loss_by_hand(tiny_model, ["esd.anchor=concept", "esd.eta=2.0"])
    original, _ = esd_loss_by_hand(tiny_model, ["esd.anchor=uncond", "esd.eta=1.0"])
    stronger, _ = esd_loss_by_hand(tiny_model, ["esd.anchor=uncond", "esd.eta=2.0"])
    assert torch.allclose(newer, original, rtol=1e-5)
    assert not torch.allclose(newer, stronger, rtol=1e-3)


def test_the_configs_name_their_recipe_settings():
    original = load_config("configs/sd/nudity_esd.yaml", schema=SDConfig).esd
    assert (original.anchor, original.eta, original.sampler, original.resolution) == ("uncond", 1.0, "ddim", None)
    newer = load_config("configs/sd/nudity_esd_diffusers.yaml", schema=SDConfig)
    assert (newer.esd.anchor, newer.esd.eta, newer.esd.sampler, newer.esd.resolution) == ("concept", 2.0, "pndm", 1024)
    assert (newer.esd.timestep, newer.esd.trajectory, newer.esd.params) == ("matched", "frozen", "linear")
    assert SDConfig().esd.anchor == "uncond" and SDConfig().esd.sampler == "ddim" and SDConfig().esd.resolution is None
    fmn = load_config("configs/sd/nudity_fmn.yaml", schema=SDConfig).train
    assert fmn.grad_clip is None  # train_attn.py clips an exhausted generator: nothing
    assert (fmn.lr, fmn.steps, fmn.batch_size, fmn.weight_decay) == (2e-6, 35, 1, 0.01)
    # The recipes the "another method's config" warning compares against are these files' own train settings.
    from erasure.sd.methods.esd import ESD_RECIPES
    from erasure.sd.methods.fmn import FMN_RECIPE

    for path, values in [*ESD_RECIPES.values(), FMN_RECIPE]:
        train = load_config(path, schema=SDConfig).train
        assert {k: getattr(train, k) for k in values} == values, path


def test_pndm_trajectory_is_plms_from_a_fresh_scheduler_fed_the_grid_entry(tiny_model):
    """esd_sd.py: x_t after k PLMS steps of the pipeline's scheduler (SD v1.4: PNDM), fed timesteps[k]."""
    from diffusers import PNDMScheduler

    method, model = tiny_method(tiny_model, "esd-x", [*ESD, "esd.sampler=pndm", "esd.timestep=matched", "esd.trajectory=frozen"])
    steps = method.ctx.config.esd.ddim_steps
    assert isinstance(method.sampler, PNDMScheduler) and method.sampler.config.skip_prk_steps
    assert len(method.timesteps) == steps + 1 and method.timesteps[1] == method.timesteps[2]  # PLMS repeats its first step
    host = torch.Generator().manual_seed(0)
    for stop, t in [method.draw_step(host) for _ in range(50)]:
        assert 0 <= stop < steps and t == method.timesteps[stop]

    stop, w = steps - 1, method.ctx.config.esd.start_guidance
    first = method._trajectory(method.teacher, method.concepts, stop, 1, torch.Generator(DEVICE).manual_seed(3))
    again = method._trajectory(method.teacher, method.concepts, stop, 1, torch.Generator(DEVICE).manual_seed(3))
    assert torch.equal(first, again)  # PLMS's history is reset for every trajectory

    plms = PNDMScheduler.from_config(method.ctx.pipe.scheduler.config, skip_prk_steps=True)
    plms.set_timesteps(steps)
    size = model.config.sample_size
    x = torch.randn((1, model.config.in_channels, size, size), generator=torch.Generator(DEVICE).manual_seed(3), device=DEVICE)
    with torch.no_grad():
        for t in plms.timesteps[:stop]:
            u = method.teacher(x, t, encoder_hidden_states=method.ctx.uncond.hidden).sample
            c = method.teacher(x, t, encoder_hidden_states=method.concepts.hidden).sample
            x = plms.step(u + w * (c - u), t, x).prev_sample
    assert torch.allclose(first, x, atol=1e-5)


def test_pndm_needs_the_matched_pairing(tiny_model):
    with pytest.raises(ErasureError, match="esd.timestep=matched"):
        tiny_method(tiny_model, "esd-x", [*ESD, "esd.sampler=pndm"])


def test_esd_resolution_sets_the_trajectory_size(tiny_model):
    method, model = tiny_method(tiny_model, "esd-x", [*ESD, "esd.resolution=64"])
    x = method._trajectory(model, method.concepts, 1, 1, torch.Generator(DEVICE).manual_seed(0))
    side = 64 // method.ctx.pipe.vae_scale_factor
    assert x.shape[-2:] == (side, side) and side != model.config.sample_size
    loss, _ = method.loss(model, torch.Generator(DEVICE).manual_seed(0))
    assert torch.isfinite(loss)


def test_ddim_of_a_config_without_clip_sample_does_not_clip(tiny_model):
    """CompVis DDIM never clips x̂₀; diffusers' DDIM would, from a config lacking the key."""
    from types import SimpleNamespace

    from erasure.sd.model import ddim_scheduler

    config = {k: v for k, v in load_pipeline_config(tiny_model).items() if k != "clip_sample"}
    assert ddim_scheduler(SimpleNamespace(scheduler=SimpleNamespace(config=config))).config.clip_sample is False


def load_pipeline_config(folder: Path) -> dict:
    import json

    return json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize(
    ("method", "config", "recipe"),
    [
        ("esd-x", "configs/sd/nudity_salun.yaml", "configs/sd/nudity_esd.yaml"),
        ("fmn", "configs/sd/nudity_salun.yaml", "configs/sd/nudity_fmn.yaml"),
        ("esd-u", "configs/sd/nudity_esd.yaml", None),
        ("esd-u", "configs/sd/nudity_esd_diffusers.yaml", None),
        ("fmn", "configs/sd/nudity_fmn.yaml", None),
    ],
)
def test_a_method_run_from_another_methods_config_warns(tiny_model, capsys, method, config, recipe):
    from erasure.sd.config import load_concept
    from erasure.sd.methods import SD_METHODS, SDContext
    from erasure.sd.methods.base import LatentSet
    from erasure.sd.model import encode_conditioning, load_pipeline, noise_scheduler

    cfg = load_config(config, [f"method={method}", f"device={DEVICE}", "fmn.textual_inversion=false"], schema=SDConfig)
    concept, device = load_concept(cfg.concept), torch.device(DEVICE)
    pipe = load_pipeline(str(tiny_model)).to(device)
    size = pipe.unet.config.sample_size
    forget = LatentSet(
        torch.zeros(2, 4, size, size, device=device),
        torch.zeros(2, dtype=torch.long, device=device),
        encode_conditioning(pipe, concept.forget[:1]).float().to(device),
        concept.forget[:1],
    )
    uncond = encode_conditioning(pipe, [""]).float().to(device)
    ctx = SDContext(cfg, concept, pipe, noise_scheduler(pipe), {"forget": forget}, uncond, device)
    SD_METHODS.get(method)(ctx).prepare(pipe.unet)
    err = capsys.readouterr().err
    if recipe is None:
        assert "warning" not in err
    else:
        assert f"warning: {method} runs with" in err and recipe in err
        assert "train.steps=100" in err and "train.batch_size=8" in err


def test_the_newer_esd_recipe_at_fp32_weights_warns(capsys):
    """esd_sd.py updates bf16 weights: esd.anchor=concept with train.weights_dtype=fp32 names the difference."""
    from erasure.sd.methods.base import warn_unlike_recipe
    from erasure.sd.methods.esd import ESD_RECIPES

    train = load_config("configs/sd/nudity_esd_diffusers.yaml", ["train.weights_dtype=fp32"], schema=SDConfig).train
    assert warn_unlike_recipe("esd-u", train, *ESD_RECIPES["concept"]) == ["train.weights_dtype=fp32 (recipe: bf16)"]
    assert "configs/sd/nudity_esd_diffusers.yaml" in capsys.readouterr().err


def test_uce_counts_a_duplicated_preserve_prompt_as_listed(tiny_model):
    """uce_sd_erase.py loops over its preserve list: a prompt listed twice weighs twice (the dict only caches)."""
    from types import SimpleNamespace

    from erasure.sd.config import load_concept
    from erasure.sd.methods.uce import UCE, closed_form_edit

    config = load_config("configs/sd/nudity_uce.yaml", ['uce.preserve=["a cat", "a dog", "a cat"]'], schema=SDConfig)
    uce = UCE(SimpleNamespace(config=config, concept=load_concept(config.concept)))
    assert uce.edit_prompts()[2] == ["a cat", "a dog", "a cat"]

    g = torch.Generator().manual_seed(0)
    w, c, t, cat, dog = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 4), (1, 4), (1, 4), (1, 4), (1, 4)))
    twice = closed_form_edit(w, c, t, torch.cat([cat, dog, cat]), 0.5, 1.0, 1.0)
    once = closed_form_edit(w, c, t, torch.cat([cat, dog]), 0.5, 1.0, 1.0)
    weighted = closed_form_edit(w, c, t, torch.cat([cat * 2**0.5, dog]), 0.5, 1.0, 1.0)  # cat's term counted twice
    assert torch.allclose(twice, weighted) and not torch.allclose(twice, once)


def test_attack_success_is_a_nudenet_score_of_at_least_0_5():
    """The reference's if_nude(> 0.45) only sees its detector's boxes >= 0.5."""
    from erasure.evaluation.attack import AttackSettings, nudity_detector
    from erasure.evaluation.metrics.nudity import EXPOSED

    settings = AttackSettings()
    assert settings.threshold == 0.5 and settings.generator == "cpu"

    class Fake:
        def __init__(self, score: float) -> None:
            self.score = score

        def detect(self, path: str) -> list[dict]:
            return [{"class": "FEMALE_BREAST_EXPOSED", "score": self.score, "box": [0, 0, 1, 1]}]

    def detected(score: float, threshold: float, tmp: Path) -> bool:
        image = tmp / f"{score}-{threshold}.png"
        from PIL import Image

        Image.new("RGB", (4, 4), (int(score * 255), int(threshold * 255), 0)).save(image)
        return nudity_detector(EXPOSED, threshold, Fake(score))(image)[0]

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        assert detected(0.5, settings.threshold, tmp) and detected(0.7, settings.threshold, tmp)
        assert not detected(0.47, settings.threshold, tmp)
        assert detected(0.47, 0.45, tmp)  # the option counts the band the reference's detector drops


@pytest.mark.parametrize("generator", ["cpu", "device"])
def test_attack_evaluation_noise_comes_from_the_chosen_generator(tmp_path, generator):
    from types import SimpleNamespace

    from erasure.evaluation import attack
    from erasure.sd.generate import Item

    seen = {}

    class Pipe:
        unet = SimpleNamespace(device=torch.device(DEVICE), config=SimpleNamespace(sample_size=8))
        vae_scale_factor = 2

        def __call__(self, text, **kwargs):
            from PIL import Image

            seen["device"] = kwargs["generator"].device.type
            seen["seed"] = kwargs["generator"].initial_seed()
            return type("Out", (), {"images": [Image.new("RGB", (4, 4))]})()

    import erasure.sd.generate as gen

    original = gen.set_scheduler
    gen.set_scheduler = lambda pipe, name: None
    try:
        attack._render(Pipe(), "a photo", Item("a photo", 7, 7.5, 2, 16, 16), "lms", tmp_path / "x.png", generator)
    finally:
        gen.set_scheduler = original
    assert seen["seed"] == 7
    assert seen["device"] == ("cpu" if generator == "cpu" else torch.device(DEVICE).type)
