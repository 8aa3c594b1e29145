"""The Stable Diffusion path on a tiny random pipeline: every method, masks, deltas, resume."""

import os
import signal

import pytest
import torch
from diffusers import StableDiffusionPipeline

from erasure.cli import main
from erasure.core.config import load_config
from erasure.core.delta import apply_delta
from erasure.core.errors import ErasureError
from erasure.core.saliency import Mask
from erasure.sd.config import ConceptConfig, SDConfig, load_concept
from erasure.sd.methods import salun
from erasure.sd.model import load_pipeline, load_unet
from erasure.sd.pipeline import erase
from tests.conftest import DEVICE, no_host_sync

METHODS = ["salun", "esd-x", "esd-u", "esd-all", "esd-x-strict", "fmn"]
TINY_SD = [
    f"device={DEVICE}",
    "generation.images_per_set=6",
    "generation.steps=2",
    "generation.batch_size=3",
    "mask.batches=2",
    "mask.batch_size=2",
    "train.steps=4",
    "train.batch_size=2",
    "train.lr=1e-3",  # large enough that a few steps visibly move the tiny model
    "train.checkpoint_every=2",
    "esd.ddim_steps=3",
    "fmn.ti_steps=3",  # the textual-inversion stage FMN runs first (500 in the recipe)
]


def sd_config(model, workdir, *extra) -> SDConfig:
    overrides = [*TINY_SD, f"model.pretrained={model}", f"workdir={workdir}", *extra]
    return load_config("configs/sd/nudity_salun.yaml", overrides, schema=SDConfig)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Every method erased from the same tiny model in one workdir (the data is generated once)."""
    workdir = tmp_path_factory.mktemp("sd-run")
    folders = {m: erase(sd_config(tiny_model, workdir, f"method={m}")) for m in METHODS}
    return tiny_model, workdir, folders


def changed_params(base, erased) -> set[str]:
    other = dict(erased.named_parameters())
    return {n for n, p in base.named_parameters() if not torch.equal(p, other[n])}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_exports_and_the_model_reloads_and_generates(runs, method):
    model, _, folders = runs
    folder = folders[method]
    assert (folder / "done.json").is_file() and (folder / "log.csv").is_file()
    assert not (folder / "checkpoint").exists()
    pipe = StableDiffusionPipeline.from_pretrained(folder / "model")
    assert pipe.safety_checker is None
    assert load_pipeline(str(folder)).unet.config == pipe.unet.config  # a run folder loads its exported model
    image = pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()
    assert changed_params(load_unet(str(model)), pipe.unet), "training changed nothing"
    assert (folder / "textual_inversion.safetensors").is_file() == (method == "fmn")  # FMN keeps its learned tokens


def assert_mask_held(base: torch.nn.Module, erased: torch.nn.Module, mask: Mask) -> None:
    """Masked-out weights of ``erased`` are ``base``'s bit for bit, and some kept weight moved."""
    other = dict(erased.named_parameters())
    moved = 0
    for n, p in base.named_parameters():
        keep = mask.tensors[n]
        assert torch.equal(p[~keep], other[n][~keep]), n
        moved += int((p[keep] != other[n][keep]).sum())
    assert moved > 0


def test_salun_mask_holds_masked_out_weights_bit_identical(runs):
    model, _, folders = runs
    base, erased = load_unet(str(model)), load_unet(str(folders["salun"] / "model"))
    mask = Mask.load(folders["salun"] / "mask.safetensors", base)
    assert abs(mask.kept_fraction - 0.5) < 1e-6 and mask.info["loss"] == "sd-guided-mse"
    assert_mask_held(base, erased, mask)


def test_esd_variants_train_only_their_weights(runs):
    model, _, folders = runs
    base = load_unet(str(model))
    changed = {m: changed_params(base, load_unet(str(folders[m] / "model"))) for m in ["esd-x", "esd-u", "esd-x-strict"]}
    assert changed["esd-x"] and all(".attn2." in n for n in changed["esd-x"])
    assert changed["esd-u"] and not any(".attn2." in n for n in changed["esd-u"])
    # the original ESD-u also leaves the time embedding and the output norm/conv alone, but trains norms
    assert not any(n.startswith(("time_embedding.", "conv_norm_out.", "conv_out.")) for n in changed["esd-u"])
    assert any(".norm" in n for n in changed["esd-u"])
    assert changed["esd-x-strict"] and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed["esd-x-strict"])


def test_fmn_trains_the_whole_unet_by_default_and_attn2_on_request(runs, tmp_path):
    model, _, folders = runs
    base = load_unet(str(model))
    whole = changed_params(base, load_unet(str(folders["fmn"] / "model")))
    assert any(".attn2." in n for n in whole) and any(".attn2." not in n for n in whole)
    attn2 = erase(sd_config(model, tmp_path, "method=fmn", "fmn.params=attn2"))
    only = changed_params(base, load_unet(str(attn2 / "model")))
    assert only and all(".attn2." in n for n in only)


def test_newer_esd_trains_linear_and_conv_weights_from_the_frozen_trajectory(tiny_model, tmp_path):
    folder = erase(sd_config(tiny_model, tmp_path, "method=esd-u", "esd.params=linear", "esd.trajectory=frozen"))
    changed = changed_params(load_unet(str(tiny_model)), load_unet(str(folder / "model")))
    assert changed and not any(".attn2." in n or "norm" in n for n in changed)
    assert any(n.startswith("time_embedding.") for n in changed)


@pytest.mark.parametrize("method", ["salun", "esd-x"])
def test_delta_round_trip_is_exact_and_refuses_the_wrong_base(runs, method, tmp_path):
    model, _, folders = runs
    base, erased = load_unet(str(model)), load_unet(str(folders[method] / "model"))
    delta = folders[method] / "delta.safetensors"
    assert delta.stat().st_size < sum(t.numel() * 4 for t in base.state_dict().values())
    merged = apply_delta(base.state_dict(), delta)
    for name, value in erased.state_dict().items():
        assert torch.equal(merged[name], value), name
    with pytest.raises(ErasureError, match="different base weights"):
        apply_delta(erased.state_dict(), delta)
    assert main(["sd", "apply-delta", "--base", str(model), "--delta", str(delta), "--out", str(tmp_path / "merged")]) == 0
    reloaded = load_unet(str(tmp_path / "merged"))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), erased.parameters()))


def test_unet_variant_trains_exports_and_deltas_from_that_variant(tiny_model, tmp_path):
    """model.unet_variant=non_ema: the raw weights the references train, beside the pipeline's own (EMA) UNet."""
    import shutil

    from erasure.core.delta import delta_record
    from erasure.sd.pipeline import training_sets
    from erasure.sd.tiny import tiny_pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tiny_pipeline(tmp_path / "tok", seed=1).unet.save_pretrained(model / "unet", variant="non_ema", safe_serialization=True)
    own, raw = load_unet(str(model)), load_unet(str(model), variant="non_ema")
    folder = erase(sd_config(model, tmp_path / "run", "method=salun", "model.unet_variant=non_ema"))
    erased = load_unet(str(folder / "model"))
    kept = sum(int((a == b).sum()) for a, b in zip(erased.parameters(), raw.parameters()))
    total = sum(p.numel() for p in raw.parameters())
    assert 0.4 < kept / total < 1  # the weights outside the mask are the variant's: it is what trained
    apart = [(e, o) for e, o, r in zip(erased.parameters(), own.parameters(), raw.parameters()) if not torch.equal(o, r)]
    assert apart and not any(torch.equal(e, o) for e, o in apart)  # nothing of the pipeline's own UNet where the two differ

    delta = folder / "delta.safetensors"
    assert delta_record(delta)["unet_variant"] == "non_ema"
    assert main(["sd", "apply-delta", "--base", str(model), "--delta", str(delta), "--out", str(tmp_path / "merged")]) == 0
    merged = load_unet(str(tmp_path / "merged"))
    assert all(torch.equal(a, b) for a, b in zip(merged.parameters(), erased.parameters()))

    # The training images come from the pipeline's own UNet: switching the variant reuses them.
    plain = sd_config(model, tmp_path / "run", "method=salun")
    training_sets(plain, load_concept(plain.concept), load_pipeline(str(model)), ("forget",), torch.device("cpu"))
    with pytest.raises(ErasureError, match="model.unet_variant=null"):
        erase(sd_config(model, tmp_path / "other", "method=esd-x", "model.unet_variant=fp8"))


def test_bf16_weights_train_and_update_in_bf16_as_esd_sd(tiny_model, tmp_path, monkeypatch):
    """train.weights_dtype=bf16 (esd_sd.py): the trained weights and Adam's moments are bf16; the frozen ones stay the base's."""
    from erasure.core import loop

    optimizers, make = [], loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda *a: optimizers.append(make(*a)) or optimizers[-1])
    folder = erase(sd_config(tiny_model, tmp_path, "method=esd-x", "train.weights_dtype=bf16"))
    (optimizer,) = optimizers
    state = [v for s in optimizer.state.values() for v in s.values() if v.ndim > 0]
    assert state and {v.dtype for v in state} == {torch.bfloat16}
    base, erased = load_unet(str(tiny_model)), load_unet(str(folder / "model"))
    changed = changed_params(base, erased)
    assert changed and all(".attn2." in n for n in changed)
    for name, p in erased.named_parameters():
        if ".attn2." in name:
            assert torch.equal(p, p.bfloat16().float()), name  # each value a bf16 one: updated in bf16
    with pytest.raises(ErasureError, match="mixed_precision=bf16"):
        sd_config(tiny_model, tmp_path, "train.weights_dtype=bf16", "mixed_precision=no")


def test_finished_runs_and_generated_data_are_reused(runs, capsys):
    model, workdir, folders = runs
    stamp = (folders["salun"] / "done.json").stat().st_mtime_ns
    images = sorted((workdir / "data" / "forget" / "images").glob("*.png"))
    assert len(images) == 6 and (workdir / "data" / "forget" / "images" / "manifest.jsonl").is_file()
    args = ["sd", "erase", "-c", "configs/sd/nudity_salun.yaml", *TINY_SD, f"model.pretrained={model}", f"workdir={workdir}"]
    assert main(args) == 0
    assert (folders["salun"] / "done.json").stat().st_mtime_ns == stamp
    assert main([*args, "train.alpha=0.7"]) == 2
    assert "different settings" in capsys.readouterr().err


def test_interrupted_erase_resumes_to_the_same_weights(runs, tmp_path, monkeypatch):
    model, _, folders = runs
    config = sd_config(model, tmp_path / "run", "method=salun")
    original = salun.SalUnSD.loss
    calls = []

    def interrupt_once(self, m, g):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, m, g)

    monkeypatch.setattr(salun.SalUnSD, "loss", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        erase(config)
    assert (tmp_path / "run" / "salun" / "checkpoint" / "state.json").is_file()
    monkeypatch.setattr(salun.SalUnSD, "loss", original)
    folder = erase(config)
    resumed, uninterrupted = load_unet(str(folder / "model")), load_unet(str(folders["salun"] / "model"))
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted.parameters()))


def test_class_sets_target_the_next_class_and_keep_the_rest():
    concept = load_concept(ConceptConfig("configs/sd/concepts/imagenette.yaml", "church"))
    assert concept.forget == ["an image of a church"]
    assert concept.target == ["an image of a French horn"]
    assert len(concept.retain) == 9 and "an image of a church" not in concept.retain
    with pytest.raises(ErasureError, match="not a class"):
        load_concept(ConceptConfig("configs/sd/concepts/imagenette.yaml", "cathedral"))
    template = load_concept(ConceptConfig("configs/sd/concepts/template.yaml"))
    assert template.words == "Van Gogh" and len(template.forget) == 3


def test_bad_input_is_a_clear_error(tiny_model, tmp_path, capsys):
    base = ["sd", "erase", "-c", "configs/sd/nudity_salun.yaml", *TINY_SD, f"workdir={tmp_path}"]
    assert main([*base, f"model.pretrained={tmp_path / 'nowhere'}"]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert main([*base, f"model.pretrained={tiny_model}", "method=esd-y"]) == 2
    assert "esd-x" in capsys.readouterr().err
    assert main([*base, f"model.pretrained={tiny_model}", "train.alhpa=1"]) == 2
    assert "Did you mean 'alpha'" in capsys.readouterr().err
    wrong = tmp_path / "wrong-mask.safetensors"
    Mask.random(torch.nn.Linear(3, 3), 0.5).save(wrong)
    assert main([*base, f"model.pretrained={tiny_model}", f"mask.path={wrong}"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    with pytest.raises(ErasureError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


def test_v_prediction_models_train_on_velocity(tiny_model, tmp_path):
    """SD 2.x (768 px) predicts velocity; the denoising targets must follow the scheduler."""
    from diffusers import DDIMScheduler

    from erasure.sd.methods.base import SDContext
    from erasure.sd.model import noise_scheduler

    pipe = load_pipeline(str(tiny_model))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "v-model")
    config = sd_config(tmp_path / "v-model", tmp_path / "run", "method=salun")
    scheduler = noise_scheduler(load_pipeline(str(tmp_path / "v-model")))
    latents = torch.randn(2, 4, 8, 8)
    ctx = SDContext(config, load_concept(config.concept), pipe, scheduler, {}, torch.zeros(1), torch.device("cpu"))
    x_t, target, t = ctx.noisy(latents, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t_again = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(t, t_again) and torch.allclose(target, scheduler.get_velocity(latents, noise, t))
    assert (erase(config) / "done.json").is_file()


def test_generate_data_command_makes_resumable_seeded_sets(tiny_model, tmp_path, capsys):
    args = ["sd", "generate-data", "-c", "configs/sd/nudity_salun.yaml", *TINY_SD, f"model.pretrained={tiny_model}", f"workdir={tmp_path}"]
    assert main([*args, "--set", "forget"]) == 0
    assert "forget: 6 images" in capsys.readouterr().out
    folder = tmp_path / "data" / "forget" / "images"
    first = (folder / "000002.png").read_bytes()
    # An interrupted generation: the finished marker and one image are gone; only that image is made again.
    (tmp_path / "data" / "forget" / "done.json").unlink()
    (folder / "000002.png").unlink()
    stamp = (folder / "000001.png").stat().st_mtime_ns
    assert main([*args, "--set", "forget"]) == 0
    assert (folder / "000002.png").read_bytes() == first  # seeded per image
    assert (folder / "000001.png").stat().st_mtime_ns == stamp


def test_the_readme_method_example_runs(tiny_model, tmp_path):
    """The "Adding a method" example in the README, executed as written, erases with the shared harness."""
    import re
    from pathlib import Path

    from erasure.sd.methods import SD_METHODS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Adding a method.*?```python\n(.*?)```", readme, re.S).group(1)
    try:
        exec(compile(code, "README.md", "exec"), {})
        folder = erase(sd_config(tiny_model, tmp_path / "run", "method=mine"))
        assert (folder / "done.json").is_file() and (folder / "delta.safetensors").is_file()
        base = load_unet(str(tiny_model))
        changed = changed_params(base, load_unet(str(folder / "model")))
        assert changed and all("attn2" in n for n in changed)
    finally:
        SD_METHODS.entries.pop("mine", None)


def test_compiled_generation_pads_to_one_shape_and_gives_back_the_unet(tiny_model, tmp_path, monkeypatch):
    """generate(compile=True): every UNet call has the full batch (no recompiles), the images are eager's, the UNet is restored."""
    import numpy as np
    from PIL import Image

    from erasure.sd.generate import Item, generate

    compiled = []

    def eager_backend(fn, **kwargs):  # dynamo without inductor: the mechanics, without minutes of C++ compiling
        compiled.append(fn)
        return torch._dynamo.optimize("eager")(fn)

    pipe = load_pipeline(str(tiny_model)).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    items = [Item(f"a photo {i}", i, 7.5, 2) for i in range(5)]
    eager = generate(pipe, items, tmp_path / "eager", "tiny", batch_size=2)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: batches.append(args[0].shape[0]), with_kwargs=True)
    monkeypatch.setattr(torch, "compile", eager_backend)
    fast = generate(pipe, items, tmp_path / "compiled", "tiny", batch_size=2, compile=True)
    assert len(compiled) == 1 and set(batches) == {4}  # 2 items x (cond, uncond), the last batch padded from 1 item
    assert "forward" not in vars(pipe.unet)  # the pipeline's UNet is eager again for whatever comes next
    for a, b in zip(eager, fast):
        diff = np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16))
        assert diff.max() <= 1  # the same images (a padded batch may round differently)


def test_auto_batch_size_halves_on_out_of_memory_and_keeps_saved_images(tiny_model, tmp_path, monkeypatch):
    """generate(batch_size="auto"): a batch that runs out of memory is halved, images already saved are not made again,
    and the images are those of a fixed batch size."""
    import numpy as np
    from PIL import Image

    from erasure.sd import generate as engine

    pipe = load_pipeline(str(tiny_model)).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    items = [engine.Item(f"a photo {i}", i, 7.5, 2) for i in range(7)]
    fixed = engine.generate(pipe, items, tmp_path / "fixed", "tiny", batch_size=2)
    monkeypatch.setattr(engine, "AUTO_BATCH_CPU", 8)
    monkeypatch.setattr(engine, "AUTO_BATCH_GPU", 8)
    monkeypatch.setattr(engine, "_FITTED", {})
    rows = []

    def memory_of_three_images(module, args, kwargs):  # the UNet sees 2 rows per image (guidance)
        rows.append(args[0].shape[0])
        if args[0].shape[0] > 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # the message accelerate recognises

    hook = pipe.unet.register_forward_pre_hook(memory_of_three_images, with_kwargs=True)
    (tmp_path / "auto").mkdir()
    Image.open(fixed[3]).save(tmp_path / "auto" / fixed[3].name)  # one image already made by an earlier run
    auto = engine.generate(pipe, items, tmp_path / "auto", "tiny", batch_size="auto")
    hook.remove()
    assert rows[0] == 12 and set(rows[1:]) == {6}  # 6 missing images: batch 6 runs out of memory, batch 3 fits
    assert len(rows) - 1 == 2 * 2  # 2 batches of 3, 2 denoising steps each
    rows.clear()  # the next pipeline of the same kind (an audit's next model) starts at the batch that fitted
    hook = pipe.unet.register_forward_pre_hook(memory_of_three_images, with_kwargs=True)
    engine.generate(pipe, items, tmp_path / "again", "tiny", batch_size="auto")
    hook.remove()
    assert sorted(rows) == [2, 2, 6, 6, 6, 6]  # 7 images at batch 3 (3 + 3 + 1), 2 steps each, no out-of-memory first
    for a, b in zip(fixed, auto):
        diff = np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16))
        assert diff.max() <= 1
    with pytest.raises(ErasureError, match="whole number >= 1, or 'auto'"):
        engine.generate(pipe, items, tmp_path / "bad", "tiny", batch_size=0)


def test_esd_cuda_graph_trains_the_weights_of_the_eager_trajectory(runs, tmp_path):
    """esd.cuda_graph replays the trajectory's UNet calls (on CUDA; a CPU calls them as usual) and trains the same weights."""
    model, _, _ = runs
    # Both explicit: graphs are the default, so the fixture's ESD-x run is itself graphed on CUDA.
    eager = erase(sd_config(model, tmp_path / "eager", "method=esd-x", "esd.cuda_graph=false"))
    graphed = erase(sd_config(model, tmp_path / "graphed", "method=esd-x", "esd.cuda_graph=true"))
    eager, replayed = load_unet(str(eager / "model")), dict(load_unet(str(graphed / "model")).named_parameters())
    base = dict(load_unet(str(model)).named_parameters())
    for name, p in eager.named_parameters():
        moved = (p - base[name]).norm()
        # Adam turns tiny numeric differences (kernel choices inside a graph) into up to 2 lr per weight,
        # so the check is on the whole tensor's change: the same within 2% of how far training moved it.
        assert (replayed[name] - p).norm() <= 0.02 * moved, name


def tiny_method(tiny_model, name: str, overrides: list[str] = ()):
    """SD method ``name`` on the tiny pipeline (on DEVICE) with random forget and retain latents; returns (method, UNet)."""
    from erasure.sd.methods import SD_METHODS, SDContext
    from erasure.sd.methods.base import LatentSet
    from erasure.sd.model import encode_conditioning, noise_scheduler

    config = load_config("configs/sd/nudity_salun.yaml", [f"method={name}", *overrides], schema=SDConfig)
    concept, device = load_concept(config.concept), torch.device(DEVICE)
    pipe = load_pipeline(str(tiny_model)).to(device)
    size = pipe.unet.config.sample_size
    g = torch.Generator(device).manual_seed(1)
    sets = {
        k: LatentSet(
            torch.randn(8, 4, size, size, device=device, generator=g),
            torch.arange(8, device=device) % len(getattr(concept, k)),
            encode_conditioning(pipe, getattr(concept, k)).float().to(device),
            getattr(concept, k),
        )
        for k in ("forget", "retain")
    }
    ctx = SDContext(config, concept, pipe, noise_scheduler(pipe), sets, encode_conditioning(pipe, [""]).float().to(device), device)
    method = SD_METHODS.get(name)(ctx)
    method.prepare(pipe.unet)
    return method, pipe.unet


def test_salun_trains_forget_and_retain_in_one_unet_call_with_the_separate_losses(tiny_model, monkeypatch):
    """eps_of_batches: one call carries the forget and retain batches; the loss is that of a call per batch."""
    import erasure.sd.methods.salun as salun
    from erasure.sd.methods.base import eps

    # On CUDA, TF32 convolutions would let two batch sizes pick kernels that differ at 1e-3; the check is on fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    method, model = tiny_method(tiny_model, "salun", ["train.batch_size=3"])
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    fused, _ = method.loss(model, torch.Generator(DEVICE).manual_seed(0))
    assert calls == [3, 6]  # the no-grad target, then forget + retain together
    monkeypatch.setattr(salun, "eps_of_batches", lambda m, *batches: [eps(m, *b) for b in batches])
    separate, _ = method.loss(model, torch.Generator(DEVICE).manual_seed(0))
    assert calls[2:] == [3, 3, 3]
    assert fused.item() == pytest.approx(separate.item(), rel=1e-4)


def test_the_joint_unet_call_holds_no_more_activations_for_backward(tiny_model, monkeypatch):
    """The memory that grows with the batch is what autograd saves for backward: the joint call saves no more bytes."""
    import erasure.sd.methods.salun as salun
    from erasure.sd.methods.base import eps

    method, model = tiny_method(tiny_model, "salun", ["train.batch_size=4"])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes() -> int:
        storages = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:  # weights are saved by reference: no new memory
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = method.loss(model, torch.Generator(DEVICE).manual_seed(0))
        loss.backward()
        return sum(storages.values())

    joint = saved_bytes()
    monkeypatch.setattr(salun, "eps_of_batches", lambda m, *batches: [eps(m, *b) for b in batches])
    # Equal on a CPU; on an H200 the separate calls saved 128 bytes more (small tensors saved once per call).
    assert 0 < joint <= saved_bytes()


@pytest.mark.parametrize("name", ["salun", "esd-x"])
def test_a_training_step_never_waits_for_the_gpu(tiny_model, name):
    """No host synchronisation inside a step (on CUDA, sync debug mode raises at any): a sync per step
    would make the GPU idle while Python launches the next step's kernels. On a CPU the step just runs."""
    method, model = tiny_method(tiny_model, name, ["train.batch_size=2", "esd.ddim_steps=3"])
    device = torch.device(DEVICE)
    g = torch.Generator(device).manual_seed(0)
    method.loss(model, g)[0].backward()  # the first step may initialise things (cuBLAS handles, the scheduler's tables)
    with no_host_sync():
        for _ in range(3):  # ESD's trajectory length varies with the draw
            loss, _ = method.loss(model, g)
            loss.backward()
    assert torch.isfinite(loss.detach()).all()


def test_frozen_weights_held_in_bf16_train_exactly_as_autocast_casts_them(tiny_model):
    """hold_frozen_weights_in_bf16: under bf16 autocast an ESD-x step gives the same loss and gradients (bit for bit on a CPU)."""
    from erasure.sd.pipeline import hold_frozen_weights_in_bf16

    method, model = tiny_method(tiny_model, "esd-x", ["train.batch_size=1", "esd.ddim_steps=3"])
    for name, p in model.named_parameters():
        p.requires_grad_(method.trainable(name))

    def step():
        model.zero_grad()
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            loss, _ = method.loss(model, torch.Generator(DEVICE).manual_seed(0))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = step()
    hold_frozen_weights_in_bf16(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["conv_in.weight"] == torch.bfloat16 and dtypes["conv_norm_out.weight"] == torch.float32  # norms stay fp32
    assert all(dtypes[n] == torch.float32 for n in grads) and any(".attn2." in n for n in grads)  # trained weights stay fp32
    held_loss, held_grads = step()
    assert held_loss == (loss if DEVICE == "cpu" else pytest.approx(loss, rel=1e-5))  # CUDA: kernels may differ in the last bits
    for n, g in grads.items():
        if DEVICE == "cpu":
            assert torch.equal(held_grads[n], g), n
        else:  # some CUDA backward kernels accumulate with atomics, so two runs of one step can differ in the last bits
            assert (held_grads[n] - g).norm() <= 1e-3 * g.norm(), n


def test_a_bf16_erase_exports_the_base_frozen_weights_exactly(tiny_model, tmp_path):
    """Frozen weights held in bf16 while training are exported as the base's fp32 values, not rounded ones."""
    folder = erase(sd_config(tiny_model, tmp_path, "method=esd-x", "mixed_precision=bf16"))
    base, erased = load_unet(str(tiny_model)), dict(load_unet(str(folder / "model")).named_parameters())
    changed = changed_params(base, load_unet(str(folder / "model")))
    assert changed and all(".attn2." in n for n in changed)
    rounded = [n for n, p in base.named_parameters() if not torch.equal(p, p.to(torch.bfloat16).float())]
    assert any(n not in changed for n in rounded)  # bf16 rounding would show in the frozen weights
    assert all(erased[n].dtype == torch.float32 for n in erased)
