"""SalUn on Stable Diffusion uses its data as the reference does (OPTML-Group/Unlearn-Saliency ``SD/``).

The mask takes one pass over the forget set in dataset order and sums raw gradients
(``generate_mask.py``); training reads the forget set in order, one pass per epoch, beside a
retain iterator restarted every epoch (``random_label.py`` / ``nsfw_removal.py`` before their
last rewrite); ``train.epochs`` counts such passes; the Imagenette class folders are its wnids.
Each earlier behaviour stays one named option away, and is pinned here too.
"""

import csv

import pytest
import torch

from erasure.core.config import load_config
from erasure.core.errors import ErasureError
from erasure.core.saliency import Mask
from erasure.sd.config import ConceptConfig, ConceptSpec, SDConfig, load_concept
from erasure.sd.methods.base import EpochOrder, LatentSet
from erasure.sd.pipeline import erase, method_stage, training_steps
from tests.conftest import DEVICE
from tests.test_sd import sd_config

FORGET, RETAIN = 7, 5  # sizes that leave a smaller last batch at batch size 3


def salun_method(tiny_model, overrides: list[str] = ()):
    """SalUn on the tiny pipeline with FORGET forget and RETAIN retain latents; item i's latents start with the number i."""
    from erasure.sd.methods import SD_METHODS, SDContext
    from erasure.sd.model import encode_conditioning, load_pipeline, noise_scheduler

    config = load_config("configs/sd/nudity_salun.yaml", ["method=salun", *overrides], schema=SDConfig)
    concept, device = load_concept(config.concept), torch.device(DEVICE)
    pipe = load_pipeline(str(tiny_model)).to(device)
    size = pipe.unet.config.sample_size
    g = torch.Generator(device).manual_seed(1)
    sets = {}
    for name, n in (("forget", FORGET), ("retain", RETAIN)):
        latents = torch.randn(n, 4, size, size, device=device, generator=g)
        latents[:, 0, 0, 0] = torch.arange(n, device=device)  # the item's id, read back by ids()
        prompts = getattr(concept, name)
        embeddings = encode_conditioning(pipe, prompts).float().to(device)
        sets[name] = LatentSet(latents, torch.arange(n, device=device) % len(prompts), embeddings, prompts)
    uncond = encode_conditioning(pipe, [""]).float().to(device)
    method = SD_METHODS.get("salun")(SDContext(config, concept, pipe, noise_scheduler(pipe), sets, uncond, device))
    method.prepare(pipe.unet)
    return method, pipe.unet


def record(method) -> list[torch.Tensor]:
    """The clean latents of every batch the method noises, in call order."""
    seen, noise = [], method.ctx.noise

    def spy(latents, g):
        seen.append(latents.detach().clone())
        return noise(latents, g)

    method.ctx.noise = spy
    return seen


def ids(latents: torch.Tensor) -> list[int]:
    return latents[:, 0, 0, 0].round().long().tolist()


def test_defaults_follow_the_reference_and_the_earlier_behaviour_is_an_option():
    cfg = SDConfig()
    assert cfg.mask.batches is None and cfg.mask.clip_norm is None  # one ordered pass, raw gradients
    assert cfg.train.data_order == "epochs" and cfg.train.epochs is None
    assert cfg.train.latents == "sample"  # a fresh posterior sample per read, not the mean
    for path in ("configs/sd/nudity_salun.yaml", "configs/sd/nudity_salun_sdxl.yaml", "configs/sd/multi_concept.yaml"):
        c = load_config(path, schema=SDConfig)
        assert (c.mask.batches, c.mask.clip_norm, c.train.data_order, c.train.steps) == (None, None, "epochs", 100), path
    imagenette = load_config("configs/sd/imagenette_salun.yaml", schema=SDConfig)
    assert (imagenette.train.epochs, imagenette.mask.batches, imagenette.train.alpha) == (5, None, 0.5)
    earlier = load_config(None, ["mask.batches=100", "mask.clip_norm=1.0", "train.data_order=random"], schema=SDConfig)
    assert (earlier.mask.batches, earlier.mask.clip_norm, earlier.train.data_order) == (100, 1.0, "random")


def test_imagenette_class_folders_are_the_imagenette_wnids():
    """Parachute is n03888257 (n03888605 is ImageNet's parallel bars): a wrong id breaks class_images for every class."""
    spec = load_config("configs/sd/concepts/imagenette.yaml", schema=ConceptSpec)
    folder_of = dict(zip(spec.classes, spec.class_folders))
    assert folder_of["parachute"] == "n03888257"
    from torchvision.datasets.imagenette import Imagenette

    assert {wnid: names[0] for wnid, names in Imagenette._WNID_TO_CLASS.items()} == {w: c for c, w in folder_of.items()}


def test_imagenette_class_images_resolve_against_an_imagenette_train_folder(tmp_path):
    from torchvision.datasets.imagenette import Imagenette

    for wnid in Imagenette._WNID_TO_CLASS:
        (tmp_path / "train" / wnid).mkdir(parents=True)
    spec = tmp_path / "imagenette.yaml"
    text = open("configs/sd/concepts/imagenette.yaml").read().replace("class_images: null", f"class_images: {tmp_path / 'train'}")
    spec.write_text(text)
    concept = load_concept(ConceptConfig(spec=str(spec), forget="golf ball"))
    assert concept.images["target"] == [str(tmp_path / "train" / "n03888257")]  # the next class: parachute
    assert len(concept.images["retain"]) == 9


def test_the_mask_sees_every_forget_image_once_in_dataset_order(tiny_model):
    method, model = salun_method(tiny_model, ["mask.batch_size=3"])
    seen = record(method)
    mask = method.make_mask(model)
    assert [ids(b) for b in seen] == [[0, 1, 2], [3, 4, 5], [6]]  # the last batch holds the rest, as an unshuffled loader
    assert (mask.info["batches"], mask.info["order"], mask.info["clip_norm"]) == (3, "one pass", None)


def test_mask_batches_draws_that_many_random_batches_as_before(tiny_model):
    method, model = salun_method(tiny_model, ["mask.batch_size=3", "mask.batches=4"])
    seen = record(method)
    mask = method.make_mask(model)
    assert [len(b) for b in seen] == [3, 3, 3, 3] and mask.info["order"] == "random"
    # the first batch is the first draw of the mask's generator, with replacement (our earlier default)
    g = torch.Generator(DEVICE).manual_seed(method.ctx.config.train.seed + 7919)
    assert ids(seen[0]) == torch.randint(0, FORGET, (3,), generator=g, device=DEVICE).tolist()


def expected_mask(method, model, clip: float | None, ratio: float = 0.5) -> tuple[Mask, list[float]]:
    """The mask from the signed sum of per-batch gradients over the ordered pass, each clipped to ``clip`` if given."""
    g = torch.Generator(DEVICE).manual_seed(method.ctx.config.train.seed + 7919)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    norms = []
    for idx in method.ctx.sets["forget"].in_order(method.ctx.config.mask.batch_size):
        model.zero_grad(set_to_none=True)
        method.saliency_loss(model, g, idx).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        for n, p in model.named_parameters():
            total[n] += p.grad.float()
    model.zero_grad(set_to_none=True)
    return Mask.from_scores(model, {n: v.abs() for n, v in total.items()}, ratio), norms


def same(a: Mask, b: Mask) -> bool:
    return all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def test_the_mask_sums_unclipped_gradients_unless_clip_norm_is_set(tiny_model):
    method, model = salun_method(tiny_model, ["mask.batch_size=3"])
    unclipped, norms = expected_mask(method, model, None)
    assert same(method.make_mask(model), unclipped)

    clip = 1e-4  # below every batch's gradient norm, so each batch is rescaled
    clipped_method, clipped_model = salun_method(tiny_model, ["mask.batch_size=3", f"mask.clip_norm={clip}"])
    clipped, _ = expected_mask(clipped_method, clipped_model, clip)
    assert min(norms) > clip and len(set(norms)) == len(norms)
    mask = clipped_method.make_mask(clipped_model)
    assert same(mask, clipped) and mask.info["clip_norm"] == clip
    assert not same(clipped, unclipped)  # unit-norm batches weigh the batches differently: another set of weights


def test_training_reads_the_forget_set_in_order_once_per_epoch_beside_restarted_retain_passes(tiny_model):
    method, model = salun_method(tiny_model, ["train.batch_size=3"])
    seen = record(method)
    g = torch.Generator(DEVICE).manual_seed(0)
    for step in range(6):  # two epochs of ceil(7 / 3) = 3 steps
        method.step = step
        with torch.no_grad():
            method.loss(model, g)
    forget, retain = [ids(b) for b in seen[0::2]], [ids(b) for b in seen[1::2]]
    assert forget == [[0, 1, 2], [3, 4, 5], [6]] * 2
    assert [len(r) for r in retain] == [3, 2, 3] * 2  # 5 retain items: a pass of 3 + 2, then the iterator restarts
    for epoch in range(2):
        first, second, restarted = retain[3 * epoch : 3 * epoch + 3]
        assert sorted(first + second) == list(range(RETAIN))  # each pass: every retain item once
        assert len(set(restarted)) == 3
    assert retain[0] + retain[1] != retain[3] + retain[4]  # a new random order every epoch
    assert retain[0] + retain[1] != list(range(RETAIN)) or retain[3] + retain[4] != list(range(RETAIN))  # shuffled


def test_the_data_order_is_a_function_of_the_step(tiny_model):
    """A resumed run reads the batches the uninterrupted one would: the indices depend on the step, not on earlier calls."""
    method, model = salun_method(tiny_model, ["train.batch_size=3"])
    seen = record(method)
    for step in (4, 1, 4):
        method.step = step
        with torch.no_grad():
            method.loss(model, torch.Generator(DEVICE).manual_seed(step))
    assert ids(seen[0]) == ids(seen[4]) == [3, 4, 5] and ids(seen[1]) == ids(seen[5])
    assert ids(seen[2]) == [3, 4, 5]


def test_random_data_order_draws_both_batches_from_the_step_generator_as_before(tiny_model):
    method, model = salun_method(tiny_model, ["train.batch_size=3", "train.data_order=random"])
    seen = record(method)
    for step in (0, 5):
        method.step = step
        with torch.no_grad():
            method.loss(model, torch.Generator(DEVICE).manual_seed(11))
    assert ids(seen[0]) == ids(seen[2]) and ids(seen[1]) == ids(seen[3])  # the step plays no part
    g = torch.Generator(DEVICE).manual_seed(11)
    assert ids(seen[0]) == torch.randint(0, FORGET, (3,), generator=g, device=DEVICE).tolist()  # the generator's first draw


@pytest.mark.parametrize(("items", "batch", "processes"), [(13, 3, 2), (7, 1, 4), (8, 2, 2), (5, 8, 3)])
def test_several_processes_share_each_global_batch_and_cover_the_forget_set_once(items, batch, processes):
    orders = [EpochOrder(items, items + 2, batch, r, processes, seed=3) for r in range(processes)]
    per_epoch = orders[0].steps_per_epoch
    assert per_epoch == -(-items // (batch * processes))
    cpu = torch.device("cpu")
    forget = [[o.forget_indices(s, cpu).tolist() for o in orders] for s in range(per_epoch)]
    assert all(share for step in forget for share in step)  # no process ever gets an empty batch
    assert all(len(share) <= batch for step in forget for share in step)
    assert {i for step in forget for share in step for i in share} == set(range(items))
    if items - (per_epoch - 1) * batch * processes >= processes:  # no step short of items: each once, in order
        assert [i for step in forget for share in step for i in share] == list(range(items))
    retain_items = items + 2
    retain_pass = -(-retain_items // (batch * processes))
    if retain_pass <= per_epoch:  # a whole retain pass fits in the epoch: every retain item once
        got = [i for s in range(retain_pass) for o in orders for i in o.retain_indices(s, cpu).tolist()]
        assert set(got) == set(range(retain_items))


def test_train_epochs_sets_the_step_count_from_the_forget_set(tiny_model, tmp_path):
    sets = {"forget": LatentSet(torch.zeros(941, 1), torch.zeros(941, dtype=torch.long), None, ["x"])}  # type: ignore[arg-type]
    five = load_config("configs/sd/imagenette_salun.yaml", schema=SDConfig).train
    assert training_steps(five, sets) == 5 * 118  # 117 full batches of 8 and one of 5, per epoch
    assert training_steps(five, sets, processes=2) == 5 * 59
    assert training_steps(SDConfig().train, sets) == 100  # train.steps when no epochs are set

    folder = erase(sd_config(tiny_model, tmp_path, "train.epochs=2", "mask.batches=null"))
    with open(folder / "log.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["step"]) == 2 * 3 - 1  # 6 forget images at batch 2, twice
    info = Mask.load(folder / "mask.safetensors").info
    assert (info["order"], info["batches"], info["clip_norm"]) == ("one pass", 3, None)


def test_train_epochs_needs_a_method_with_a_forget_set():
    with pytest.raises(ErasureError, match="train.epochs"):
        load_config("configs/sd/nudity_esd.yaml", ["train.epochs=1"], schema=SDConfig)


@pytest.mark.parametrize(
    "override", ["mask.clip_norm=1.0", "mask.batches=100", "train.data_order=random", "train.epochs=1", "train.latents=mean"]
)
def test_each_new_setting_is_part_of_the_run_fingerprint(override):
    """A finished run or mask is never reused under another of these settings."""
    base = load_config("configs/sd/nudity_salun.yaml", schema=SDConfig)
    other = load_config("configs/sd/nudity_salun.yaml", [override], schema=SDConfig)
    concept = load_concept(base.concept)
    assert method_stage(base, concept).fingerprint != method_stage(other, concept).fingerprint


def test_a_read_draws_a_fresh_sample_of_the_vae_posterior_as_latent_dist_sample(tiny_model):
    """train.latents=sample: the references encode each batch anew (get_input, latent_dist.sample())."""
    from erasure.sd.model import encode_posterior, load_pipeline

    pipe = load_pipeline(str(tiny_model))
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = encode_posterior(pipe, images, batch_size=2)
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        dist = pipe.vae.encode(images.float() / 127.5 - 1).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(5)) * scale
    torch.testing.assert_close((mean, std), (dist.mean * scale, dist.std * scale))
    assert std.min() > 0

    sampled = LatentSet(mean, torch.zeros(3, dtype=torch.long), None, ["x"], std)  # type: ignore[arg-type]
    idx = torch.arange(3)
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(sampled.sample(idx, g), expected)
    assert not torch.equal(sampled.sample(idx, g), expected)  # every read is a new draw

    fixed = LatentSet(mean, torch.zeros(3, dtype=torch.long), None, ["x"])  # type: ignore[arg-type]
    state = g.get_state()
    assert torch.equal(fixed.sample(idx, g), mean) and torch.equal(g.get_state(), state)  # train.latents=mean draws nothing


@pytest.mark.parametrize("latents", ["sample", "mean"])
def test_salun_noises_a_second_posterior_sample_for_the_target_with_the_same_noise_and_t(tiny_model, latents):
    """nsfw_removal.py / random_label.py: get_input twice (two posterior samples), one noise and one t for both."""
    method, model = salun_method(tiny_model, ["train.batch_size=3"])
    forget, ctx = method.ctx.sets["forget"], method.ctx
    if latents == "sample":
        forget.std = torch.full_like(forget.latents, 0.5)
    samples, draws, calls = [], [], []
    sample, noise = forget.sample, ctx.noise
    forget.sample = lambda idx, g: samples.append(sample(idx, g)) or samples[-1]
    ctx.noise = lambda z, g: draws.append(noise(z, g)) or draws[-1]
    model.register_forward_pre_hook(lambda m, args: calls.append((args[0].detach().clone(), args[1].clone())))
    method.loss(model, torch.Generator(DEVICE).manual_seed(3))

    (n, t), forget_x_t = draws[0], calls[1][0][:3]  # calls: the target (no grad), then forget + retain in one batch
    assert torch.equal(calls[0][1], t) and torch.equal(calls[1][1][:3], t)
    torch.testing.assert_close(forget_x_t, ctx.scheduler.add_noise(samples[0], n, t))
    if latents == "sample":
        assert len(samples) == 2  # the forget input, and the target's input from the same images
        assert not torch.equal(samples[0], samples[1])
        torch.testing.assert_close(calls[0][0], ctx.scheduler.add_noise(samples[1], n, t))
        assert not torch.equal(calls[0][0], forget_x_t)
    else:
        assert torch.equal(calls[0][0], forget_x_t)  # one x_t for both, as before
