"""The Stable Diffusion methods follow their reference protocols: FMN, ESD, clipping, defaults."""

from types import SimpleNamespace

import pytest
import torch

from erasure.core.config import load_config
from erasure.core.errors import ErasureError
from erasure.sd.config import SDConfig
from erasure.sd.methods import SD_METHODS
from erasure.sd.methods.fmn import attention_loss, concept_positions
from erasure.sd.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tok"))


def method(name: str, pipe, *overrides: str):
    config = load_config(None, list(overrides), schema=SDConfig)
    return SD_METHODS.get(name)(SimpleNamespace(config=config, pipe=pipe))


def test_defaults_are_the_reference_values():
    cfg = SDConfig()
    assert cfg.train.grad_clip is None  # neither the SalUn SD scripts nor the original ESD clip
    assert (cfg.esd.eta, cfg.esd.ddim_steps, cfg.esd.start_guidance) == (1.0, 50, 3.0)
    assert cfg.esd.params == "compvis" and cfg.esd.trajectory == "trained" and cfg.esd.timestep == "original"
    assert cfg.esd.anchor == "uncond" and cfg.esd.sampler == "ddim" and cfg.esd.resolution is None
    assert (cfg.fmn.eot_positions, cfg.fmn.reduction, cfg.fmn.params) == ("all", "global", "unet")
    fmn = load_config("configs/sd/nudity_fmn.yaml", schema=SDConfig)
    # no clip: train_attn.py's clip gets the parameter generator AdamW has already consumed
    assert (fmn.train.lr, fmn.train.steps, fmn.train.batch_size, fmn.train.grad_clip, fmn.train.weight_decay) == (2e-6, 35, 1, None, 0.01)
    esd = load_config("configs/sd/nudity_esd.yaml", schema=SDConfig)
    assert (esd.train.lr, esd.train.steps, esd.train.batch_size, esd.train.grad_clip, esd.esd.eta) == (1e-5, 1000, 1, None, 1.0)
    new = load_config("configs/sd/nudity_esd_diffusers.yaml", schema=SDConfig)
    assert (new.train.lr, new.train.steps, new.esd.eta, new.esd.params, new.esd.trajectory) == (5e-5, 200, 2.0, "linear", "frozen")
    assert new.esd.timestep == "matched" and new.esd.anchor == "concept" and new.esd.sampler == "pndm" and new.esd.resolution == 1024
    assert new.train.weights_dtype == "bf16" and esd.train.weights_dtype == "fp32"  # esd_sd.py updates bf16 weights
    for salun in ("configs/sd/nudity_salun.yaml", "configs/sd/imagenette_salun.yaml"):
        assert load_config(salun, schema=SDConfig).train.grad_clip is None


def test_fmn_marks_every_concept_occurrence_and_every_eot_position(pipe):
    prompt = "a nude photo of a nude person"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    nude = pipe.tokenizer("nude", add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids)) if ids[i : i + len(nude)] == nude]
    assert len(starts) == 2
    concept = {i + k for i in starts for k in range(len(nude))}
    eot = {i for i, t in enumerate(ids) if t == pipe.tokenizer.eos_token_id}
    assert len(eot) > 1  # the SD 1.x tokenizer pads with its end-of-text token

    marked = lambda mode: set(concept_positions(pipe.tokenizer, prompt, "nude", mode).nonzero().flatten().tolist())  # noqa: E731
    assert marked("all") == concept | eot
    assert marked("first") == concept | {min(eot)}
    assert marked("none") == concept


def test_fmn_refuses_prompts_without_the_concept(pipe):

    with pytest.raises(ErasureError, match="does not occur"):
        concept_positions(pipe.tokenizer, "a photo of a person", "nude")


def fmn_method(tiny_model, *overrides: str):
    """FMN (nudity_fmn.yaml) on the tiny pipeline folder, with three forget latents of the forget prompt."""
    from erasure.sd.config import load_concept
    from erasure.sd.methods.base import LatentSet, SDContext
    from erasure.sd.model import encode_conditioning, load_pipeline, noise_scheduler
    from tests.conftest import DEVICE

    config = load_config("configs/sd/nudity_fmn.yaml", [f"device={DEVICE}", f"model.pretrained={tiny_model}", *overrides], schema=SDConfig)
    concept, device = load_concept(config.concept), torch.device(DEVICE)
    pipe = load_pipeline(str(tiny_model)).to(device)
    size = pipe.unet.config.sample_size
    latents = torch.randn(3, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    embeddings = encode_conditioning(pipe, concept.forget).float().to(device)
    forget = LatentSet(latents, torch.zeros(3, dtype=torch.long, device=device), embeddings, concept.forget, torch.full_like(latents, 0.1))
    uncond = encode_conditioning(pipe, [""]).float().to(device)
    ctx = SDContext(config, concept, pipe, noise_scheduler(pipe), {"forget": forget}, uncond, device)
    return SD_METHODS.get("fmn")(ctx), pipe


def marked_tokens(tokenizer, prompt: str, positions: torch.Tensor) -> list[int]:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    return [t for t, m in zip(ids, positions.tolist()) if m and t != tokenizer.eos_token_id]


def test_fmn_prompts_every_image_with_the_template_and_marks_its_snippet(tiny_model):
    """train_attn.py: "a photo of {snippet}" for every image, the snippet's tokens marked (use_ti: false: the concept's name)."""
    fmn, pipe = fmn_method(tiny_model, "fmn.textual_inversion=false")
    fmn.prepare(pipe.unet)
    nudity = pipe.tokenizer("nudity", add_special_tokens=False).input_ids
    assert marked_tokens(pipe.tokenizer, "a photo of nudity", fmn.positions[0]) == nudity
    torch.testing.assert_close(fmn.conditioning.hidden, fmn.ctx.encode(["a photo of nudity"]).hidden)
    earlier, pipe = fmn_method(tiny_model, "fmn.textual_inversion=false", "fmn.prompts=forget")
    earlier.prepare(pipe.unet)  # the forget prompt's own conditioning, "nude" marked in it
    nude = pipe.tokenizer("nude", add_special_tokens=False).input_ids
    assert earlier.conditioning is None and marked_tokens(pipe.tokenizer, "a photo of a nude person", earlier.positions[0]) == nude
    with pytest.raises(ErasureError, match="fmn.prompts=template"):
        load_config("configs/sd/nudity_fmn.yaml", ["fmn.prompts=forget"], schema=SDConfig)
    with pytest.raises(ErasureError, match="fmn.template"):
        load_config("configs/sd/nudity_fmn.yaml", ["fmn.template=a photo"], schema=SDConfig)


def test_pull_norms_moves_each_norm_a_tenth_of_the_way_to_0_4_at_lr_1e_3():
    """train_ti.py's clip_ti_decay: normalize(w) * (|w| + min(1, 100 lr) (0.4 - |w|))."""
    from erasure.sd.textual_inversion import pull_norms

    rows = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.06, 0.08]])
    pulled = pull_norms(rows, 1e-3)
    torch.testing.assert_close(pulled.norm(dim=-1), torch.tensor([1.84, 0.13]))
    torch.testing.assert_close(pulled / pulled.norm(dim=-1, keepdim=True), rows / rows.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(pull_norms(rows, 0.02).norm(dim=-1), torch.tensor([0.4, 0.4]))  # lambda capped at 1


def test_textual_inversion_learns_only_its_new_rows_and_fmn_prompts_with_them(tiny_model):
    """train_ti.py: placeholders <s1>..<s4> from the concept's tokens then random, only their rows trained; attn stage uses them."""
    from transformers import CLIPTextModel

    from erasure.sd.textual_inversion import learn_tokens
    from tests.conftest import DEVICE

    # beside the inversion's encoder, which learns on the training device
    fresh = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder").get_input_embeddings().weight.to(DEVICE)
    start, pipe = fmn_method(tiny_model, "fmn.ti_steps=0")
    pipe.text_encoder.to(torch.bfloat16)  # model.frozen_dtype on a GPU: the inversion reloads the fp32 weights
    begun = learn_tokens(start.ctx, pipe.unet, start.ctx.config.fmn, seed=0)
    vocab = len(pipe.tokenizer)
    assert torch.equal(begun.text_encoder.get_input_embeddings().weight[:vocab], fresh)
    own = pipe.tokenizer("nudity", add_special_tokens=False).input_ids[:4]
    rows = begun.text_encoder.get_input_embeddings().weight
    assert begun.snippets == ["<s1><s2><s3><s4>"] and len(begun.tokenizer) == vocab + 4 and len(pipe.tokenizer) == vocab
    torch.testing.assert_close(rows[vocab : vocab + len(own)], fresh[own])  # the concept's own tokens first

    fmn, pipe = fmn_method(tiny_model, "fmn.ti_steps=3")
    fmn.prepare(pipe.unet)
    learned = learn_tokens(fmn.ctx, pipe.unet, fmn.ctx.config.fmn, seed=fmn.ctx.config.train.seed)
    table = learned.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[:vocab], fresh)  # every other row exactly the encoder's own
    assert not torch.equal(table[vocab:], rows[vocab:])  # the new ones learned
    snippet_ids = learned.tokenizer("<s1><s2><s3><s4>", add_special_tokens=False).input_ids
    assert marked_tokens(learned.tokenizer, "a photo of <s1><s2><s3><s4>", fmn.positions[0]) == snippet_ids
    torch.testing.assert_close(fmn.conditioning.hidden, learned.encode(["a photo of <s1><s2><s3><s4>"]).hidden.to(fmn.ctx.device))
    loss, _ = fmn.loss(pipe.unet, torch.Generator(fmn.ctx.device).manual_seed(0))
    assert torch.isfinite(loss) and loss > 0


def test_the_learned_tokens_are_kept_in_the_run_folder_and_a_resumed_run_reads_them(tiny_model, tmp_path):
    import dataclasses

    first, pipe = fmn_method(tiny_model, "fmn.ti_steps=3")
    first.ctx = dataclasses.replace(first.ctx, folder=tmp_path)
    first.prepare(pipe.unet)
    assert (tmp_path / "textual_inversion.safetensors").is_file()
    again, pipe = fmn_method(tiny_model, "fmn.ti_steps=3")
    again.ctx = dataclasses.replace(again.ctx, folder=tmp_path)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    again.prepare(pipe.unet)
    assert not calls  # read back, not learned again
    assert torch.equal(again.conditioning.hidden, first.conditioning.hidden)


def test_fmn_loss_is_one_norm_over_all_layers():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, 2, 16, 8, generator=g).softmax(-1), torch.rand(1, 2, 4, 8, generator=g).softmax(-1)]
    positions = torch.zeros(1, 8, dtype=torch.bool)
    positions[0, [2, 3, 5, 6, 7]] = True
    # the reference: masked_select per layer, concatenate, one .norm()
    selected = torch.cat([m.reshape(-1, 8).masked_select(positions.expand(m.shape[1] * m.shape[2], 8)) for m in maps])
    assert torch.allclose(attention_loss(maps, positions), selected.norm())
    per_layer = sum(m[..., positions[0]].norm() for m in maps)
    assert torch.allclose(attention_loss(maps, positions, "per_layer"), per_layer)
    assert not torch.allclose(per_layer, selected.norm())


def test_fmn_loss_handles_a_batch_with_different_positions():
    maps = [torch.ones(2, 1, 3, 4)]
    positions = torch.tensor([[True, False, False, False], [True, True, False, False]])
    assert torch.allclose(attention_loss(maps, positions), torch.tensor(9.0).sqrt())  # 3 + 6 ones


def test_fmn_trains_the_whole_unet_unless_asked_for_attn2(pipe):
    names = [n for n, _ in pipe.unet.named_parameters()]
    assert all(method("fmn", pipe).trainable(n) for n in names)
    only = method("fmn", pipe, "fmn.params=attn2")
    assert {n for n in names if only.trainable(n)} == {n for n in names if ".attn2." in n}


def test_esd_u_parameter_sets(pipe):
    names = [n for n, _ in pipe.unet.named_parameters()]
    compvis = {n for n in names if method("esd-u", pipe).trainable(n)}
    # original ESD-u ("noxattn"): all but attn2, time_embed.* and out.* (norm_out, conv_out)
    expected = {n for n in names if ".attn2." not in n and not n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))}
    assert compvis == expected
    assert "down_blocks.0.resnets.0.norm1.weight" in compvis and "conv_in.weight" in compvis

    linear_esd = method("esd-u", pipe, "esd.params=linear")
    linear = {n for n in names if linear_esd.trainable(n)}
    modules = dict(pipe.unet.named_modules())
    is_linear = {n for n in names if isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.Linear | torch.nn.Conv2d)}
    assert linear == {n for n in is_linear if ".attn2." not in n}
    assert "time_embedding.linear_1.weight" in linear and "conv_out.weight" in linear
    assert not any("norm" in n for n in linear)


def test_esd_all_and_x_parameter_sets(pipe):
    names = [n for n, _ in pipe.unet.named_parameters()]
    assert all(method("esd-all", pipe).trainable(n) for n in names)
    assert not any(method("esd-all", pipe, "esd.params=linear").trainable(n) for n in names if "norm" in n)
    x = method("esd-x", pipe)
    assert {n for n in names if x.trainable(n)} == {n for n in names if ".attn2." in n}


def three_classes(tmp_path):
    """A class set of real images: 3 cats, 2 dogs and 4 fish (``train/n01..n03``), with 'dog' forgotten."""
    import numpy as np
    from PIL import Image

    from erasure.sd.config import ConceptConfig, load_concept

    counts = {"n01": 3, "n02": 2, "n03": 4}
    for folder, n in counts.items():
        (tmp_path / "train" / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / "train" / folder / f"{i}.png")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: three\nclasses: [cat, dog, fish]\nclass_images: train\nclass_folders: [n01, n02, n03]\n")
    return load_concept(ConceptConfig(spec=str(spec), forget="dog")), spec


def test_class_sets_can_train_on_real_images_per_class(pipe, tmp_path):
    from erasure.sd.config import ConceptConfig, load_concept
    from erasure.sd.pipeline import training_sets

    concept, spec = three_classes(tmp_path)
    assert concept.images["forget"] == [str(tmp_path / "train" / "n02")]
    assert concept.images["target"] == [str(tmp_path / "train" / "n03")]
    assert concept.images["retain"] == [str(tmp_path / "train" / "n01"), str(tmp_path / "train" / "n03")]
    assert concept.retain == ["an image of a cat", "an image of a fish"]

    config = load_config(None, [f"workdir={tmp_path / 'run'}", "device=cpu"], schema=SDConfig)
    sets = training_sets(config, concept, pipe, ("forget", "retain"), torch.device("cpu"))
    assert len(sets["forget"].latents) == 2 and sets["forget"].prompt_index.tolist() == [0, 0]
    assert sets["retain"].prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 1]  # 3 cats, then 4 fish, each with its own prompt

    spec.write_text("name: three\nclasses: [cat, dog, fish]\nclass_images: train\n")  # folders default to class names

    with pytest.raises(ErasureError, match="no folder"):
        load_concept(ConceptConfig(spec=str(spec), forget="dog"))


def test_latents_cached_before_posterior_sampling_are_refused_with_the_fix(pipe, tmp_path):
    """A data folder from an earlier version holds only the posterior mean: train.latents=sample names both ways out."""
    from erasure.core.io import load_tensors, save_tensors
    from erasure.sd.pipeline import training_sets

    concept, _ = three_classes(tmp_path)
    config = load_config(None, [f"workdir={tmp_path / 'run'}", "device=cpu"], schema=SDConfig)
    sets = training_sets(config, concept, pipe, ("forget",), torch.device("cpu"))
    assert config.train.latents == "sample" and sets["forget"].std.shape == sets["forget"].latents.shape
    folder = tmp_path / "run" / "data" / "forget"
    old = {k: v for k, v in load_tensors(folder / "latents.safetensors").items() if k != "std"}
    save_tensors(folder / "latents.safetensors", old)

    with pytest.raises(ErasureError, match=r"delete .*done.json to encode the images kept there again, or set train.latents=mean"):
        training_sets(config, concept, pipe, ("forget",), torch.device("cpu"))
    mean = load_config(None, [f"workdir={tmp_path / 'run'}", "device=cpu", "train.latents=mean"], schema=SDConfig)
    assert training_sets(mean, concept, pipe, ("forget",), torch.device("cpu"))["forget"].std is None
    (folder / "done.json").unlink()  # the fix the message names
    again = training_sets(config, concept, pipe, ("forget",), torch.device("cpu"))["forget"]
    assert torch.equal(again.std, sets["forget"].std) and torch.equal(again.latents, sets["forget"].latents)


def test_class_sets_without_real_images_generate_them():
    from erasure.sd.config import ConceptConfig, load_concept

    concept = load_concept(ConceptConfig(spec="configs/sd/concepts/imagenette.yaml", forget="church"))
    assert concept.images == {"forget": None, "target": None, "retain": None}


def test_esd_trajectory_length_and_timestep_follow_train_esd(pipe):
    """train-esd.py: t_enc ~ U{0..49}; the sampler runs 50 - t_enc + 1 steps (50 for t_enc 0, 1); fed t ~ U[20 t_enc, 20 t_enc + 20)."""
    from erasure.sd.model import ddim_scheduler, noise_scheduler

    def esd(*overrides):
        m = method("esd-x", pipe, *overrides)
        m.ctx.scheduler = noise_scheduler(pipe)
        m.sampler = ddim_scheduler(pipe)
        m.sampler.set_timesteps(m.ctx.config.esd.ddim_steps)
        m.timesteps = m.sampler.timesteps.tolist()
        return m

    host = torch.Generator().manual_seed(0)
    reference = esd()
    original = [reference.draw_step(host) for _ in range(2000)]
    for stop, t in original:
        t_enc = t // 20
        assert stop == min(50, 51 - t_enc)
    assert {t // 20 for _, t in original} == set(range(50)) and {t % 20 for _, t in original} == set(range(20))
    assert max(stop for stop, _ in original) == 50  # finished samples are trained on (t_enc 0 and 1), pure noise never
    matched = esd("esd.timestep=matched")
    for stop, t in [matched.draw_step(host) for _ in range(200)]:
        assert t == matched.timesteps[stop] and 0 <= stop < 50  # x_t fed the DDIM timestep it is at
