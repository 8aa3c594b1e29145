"""The DDPM path's judge as the SalUn DDPM reference's (DDPM/train_classifier.py, classifier_evaluation.py @ d603a37):
torchvision ResNet-34 with a new 10-way fc, inputs resized to 224 px as its PIL transforms, Adam 1e-5 / fc 1e-4 with
L2 5e-4, shuffled epochs with flips; and the CNN judge that the demo keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image

from erasure.cli import main
from erasure.core.data import ImageData
from erasure.core.errors import ErasureError
from erasure.ddpm import judge as judge_module
from erasure.ddpm.config import ClassifierConfig, load
from erasure.ddpm.judge import ConvClassifier, Judge, ResNetJudge, build_resnet_judge, reference_input, train_classifier
from tests.conftest import TINY

OFFLINE = ClassifierConfig(arch="resnet34", pretrained=False)


def pil_reference(images: torch.Tensor) -> torch.Tensor:
    """The reference's evaluation transform of uint8 images, via PIL: Resize((224, 224)), ToTensor, Normalize(0.5, 0.5)."""
    transform = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    return torch.stack([transform(Image.fromarray(im.permute(1, 2, 0).numpy().squeeze()).convert("RGB")) for im in images])


def test_reference_judge_defaults():
    cfg = ClassifierConfig(arch="resnet34")
    assert (cfg.resolved_lr(), cfg.head_lr_scale, cfg.weight_decay) == (1e-5, 10.0, 5e-4)  # Adam lr, fc lr = lr * 10, wd
    assert (cfg.epochs, cfg.batch_size, cfg.pretrained, cfg.weights) == (10, 128, True, None)
    cnn = ClassifierConfig()  # the demo's judge, unchanged
    assert (cnn.arch, cnn.resolved_lr(), cnn.steps, cnn.channels, cnn.weight_decay) == ("cnn", 3e-3, 500, [32, 64, 64], 5e-4)
    with pytest.raises(ErasureError, match="head_lr_scale"):
        ClassifierConfig(head_lr_scale=0.0)
    with pytest.raises(ErasureError, match="pretrained is false"):
        load(None, ["classifier.arch=resnet34", "classifier.pretrained=false", "classifier.weights=/x.pth"])


def test_reference_judge_is_torchvision_resnet34_with_a_new_xavier_fc():
    torch.manual_seed(0)
    model = build_resnet_judge(OFFLINE, 3, 10)
    assert isinstance(model.net, torchvision.models.ResNet) and [len(s) for s in (model.net.layer1, model.net.layer2)] == [3, 4]
    assert [len(model.net.layer3), len(model.net.layer4)] == [6, 3]
    plain = torchvision.models.resnet34(num_classes=10).state_dict()
    assert {f"net.{k}": v.shape for k, v in plain.items()} == {k: v.shape for k, v in model.state_dict().items()}
    fc = model.net.fc
    assert type(fc) is nn.Linear and (fc.in_features, fc.out_features) == (512, 10)
    # xavier_uniform_ bounds |w| by sqrt(6 / (512 + 10)) = 0.107; nn.Linear's own init by 1 / sqrt(512) = 0.044.
    assert 1 / 512**0.5 < fc.weight.abs().max() <= (6 / 522) ** 0.5 and fc.bias.abs().max() <= 1 / 512**0.5


def test_reference_input_is_the_reference_pil_transform():
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=g)
    for images in (rgb, grey):
        ours, theirs = reference_input(images), pil_reference(images)
        assert ours.shape == theirs.shape == (len(images), 3, 224, 224)
        # PIL's bilinear resize to uint8, bit for bit; then (x / 255 - 0.5) / 0.5 up to float rounding.
        assert torch.equal((ours + 1).mul(127.5).round(), (theirs + 1).mul(127.5).round())
        assert torch.allclose(ours, theirs, atol=1e-6)
    flipped = rgb.flip(-1)  # the flip is drawn on the small image: Resize then RandomHorizontalFlip is the same
    assert torch.equal(reference_input(flipped), reference_input(rgb).flip(-1))


def tiny_data(n: int, size: int = 8, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.randint(0, 60, (n, 3, size, size), generator=g) + 19 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    return ImageData(images, labels, [str(c) for c in range(10)])


def reference_steps(
    init: dict, inputs: torch.Tensor, labels: torch.Tensor, lr: float, steps: int, head: float = 10, adam: type = torch.optim.Adam
) -> dict[str, torch.Tensor]:
    """train_classifier.py's loop on one full batch of ``inputs``: Adam, the fc at ``head`` x lr, weight_decay 5e-4."""
    model = torchvision.models.resnet34()
    model.fc = nn.Linear(512, 10)
    model.load_state_dict(init)
    body = [p for name, p in model.named_parameters() if "fc" not in str(name)]
    optimizer = adam([{"params": body}, {"params": model.fc.parameters(), "lr": lr * head}], lr=lr, weight_decay=5e-4)
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.state_dict()


@pytest.fixture
def float64(monkeypatch):
    """Judge and replay in float64: in float32 a ResNet's near-zero gradients are rounding noise, whose signs
    Adam's first steps turn into whole steps of lr, so two correct implementations would differ there."""
    monkeypatch.setattr(judge_module, "to_model_range", lambda x: x.double().div(127.5).sub(1))
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_training_steps_are_the_reference_adam_with_its_param_groups(tmp_path, monkeypatch, float64):
    # One batch holds every image, so each step sees the whole set; flips are pinned by the next test and
    # off here, so that the reference's loop can be replayed on the same inputs.
    monkeypatch.setattr(judge_module, "random_flip", lambda x, g: x)
    data = tiny_data(2, size=32)
    cfg = ClassifierConfig(arch="resnet34", pretrained=False, epochs=2, batch_size=2)
    torch.manual_seed(cfg.seed)
    init = {k.removeprefix("net."): v for k, v in build_resnet_judge(cfg, 3, 10).state_dict().items()}
    judge = train_classifier(cfg, data, tmp_path / "judge", device="cpu")
    assert not judge.training and type(judge.net.fc) is nn.Linear  # saved as a plain torchvision fc
    ours, inputs, lr = judge.net.state_dict(), reference_input(data.images), cfg.resolved_lr()
    reference = reference_steps(init, inputs, data.labels, lr, steps=2)
    assert (reference["fc.weight"] - init["fc.weight"]).abs().max() > 10 * lr  # both groups moved
    assert (reference["conv1.weight"] - init["conv1.weight"]).abs().max() > lr
    for k, v in reference.items():
        assert torch.allclose(ours[k], v, rtol=1e-6, atol=1e-9), k
    # The replay tells the recipe apart: the fc at the body's lr, or AdamW's decoupled decay instead of Adam's L2.
    for wrong in ({"head": 1}, {"adam": torch.optim.AdamW}):
        other = reference_steps(init, inputs, data.labels, lr, steps=2, **wrong)
        assert any(not torch.allclose(ours[k], v, rtol=1e-6, atol=1e-9) for k, v in other.items()), wrong


def test_training_draws_shuffled_epochs_with_per_image_flips(tmp_path, monkeypatch):
    seen: list[torch.Tensor] = []
    flip = judge_module.random_flip

    def spy(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        seen.append(x.clone())
        return flip(x, g)

    monkeypatch.setattr(judge_module, "random_flip", spy)
    data = tiny_data(5)
    data.images[:, :, :, 4:] = 255  # the right half bright: a flipped image is recognisable
    cfg = ClassifierConfig(arch="resnet34", pretrained=False, epochs=2, batch_size=2)
    train_classifier(cfg, data, tmp_path / "judge", device="cpu")
    assert [len(x) for x in seen] == [2, 2, 1] * 2  # each epoch covers the 5 images once, the last batch smaller
    key = {tuple(im.flatten().tolist()): i for i, im in enumerate(data.images)}
    for epoch in (seen[:3], seen[3:]):
        assert sorted(key[tuple(im.flatten().tolist())] for im in torch.cat(epoch)) == list(range(5))
    assert all(x.dtype == torch.uint8 for x in seen)  # flipped on the small uint8 image, then resized in the forward pass


def test_evaluation_is_top1_in_eval_mode_and_features_are_512d():
    torch.manual_seed(0)
    model = build_resnet_judge(OFFLINE, 3, 10)
    images = tiny_data(4).images
    predicted = model.predict(images)
    assert not model.training
    with torch.no_grad():
        expected = torchvision.models.resnet34(num_classes=10)
        expected.load_state_dict(model.net.state_dict())
        assert torch.equal(predicted, expected.eval()(pil_reference(images)).argmax(1))
        assert model.features(images).shape == (4, 512)  # the fallback FID's features: the fc layer's input


def test_pretrained_weights_come_from_a_local_file_loaded_weights_only(tmp_path):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet34().state_dict()  # stands in for the IMAGENET1K_V1 file
    torch.save(imagenet, tmp_path / "resnet34.pth")
    model = build_resnet_judge(ClassifierConfig(arch="resnet34", weights=str(tmp_path / "resnet34.pth")), 3, 10)
    state = model.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in imagenet.items() if not k.startswith("fc."))
    assert state["fc.weight"].shape == (10, 512)
    with pytest.raises(ErasureError, match="does not exist.*pretrained=false"):
        build_resnet_judge(ClassifierConfig(arch="resnet34", weights=str(tmp_path / "missing.pth")), 3, 10)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ErasureError, match="not a torchvision ResNet-34 state dict"):
        build_resnet_judge(ClassifierConfig(arch="resnet34", weights=str(tmp_path / "resnet18.pth")), 3, 10)
    torch.save({"fn": print}, tmp_path / "code.pth")  # a pickle that would call code: refused, never run
    with pytest.raises(ErasureError, match="refusing to load it"):
        build_resnet_judge(ClassifierConfig(arch="resnet34", weights=str(tmp_path / "code.pth")), 3, 10)


def test_saved_judges_load_as_their_arch(tmp_path):
    torch.manual_seed(0)
    resnet = build_resnet_judge(OFFLINE, 1, 10)
    resnet.save(tmp_path / "resnet")
    assert json.loads((tmp_path / "resnet" / "config.json").read_text())["arch"] == "resnet34"
    loaded = Judge.load(tmp_path / "resnet")
    assert type(loaded) is ResNetJudge and all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), resnet.state_dict().values())
    )
    cnn = ConvClassifier(1, 10, [8, 16])
    cnn.save(tmp_path / "cnn")
    assert "arch" not in json.loads((tmp_path / "cnn" / "config.json").read_text())  # the CNN's files as before
    assert type(Judge.load(tmp_path / "cnn")) is ConvClassifier
    (tmp_path / "cnn" / "config.json").write_text(json.dumps({"arch": "vit", "in_channels": 1, "num_classes": 10}))
    with pytest.raises(ErasureError, match="judge arch 'vit'"):
        Judge.load(tmp_path / "cnn")


def test_resnet_judge_end_to_end_scores_ua(tmp_path):
    """A tiny CIFAR-shaped set (8 px): base DDPM, the ResNet judge at 224 px, SalUn, and the evaluation's UA and FID."""
    data, test = tiny_data(20), tiny_data(10, seed=1)
    path = tmp_path / "tiny.npz"
    hwc = {k: v.images.permute(0, 2, 3, 1).numpy() for k, v in (("x_train", data), ("x_test", test))}
    np.savez(path, **hwc, y_train=data.labels.numpy(), y_test=test.labels.numpy())
    args = [*TINY, f"workdir={tmp_path / 'run'}", "data.name=cifar10", f"data.path={path}", "unlearn.mask.batches=1"]
    args += ["classifier.arch=resnet34", "classifier.pretrained=false", "classifier.epochs=1", "classifier.batch_size=10"]
    args += ["eval.samples_per_class=2", "eval.fid.features=classifier"]
    for command in (["train-ddpm"], ["train-classifier"], ["erase", "--method", "salun"], ["evaluate", "--method", "salun"]):
        assert main([*command, *args]) == 0
    judge = tmp_path / "run" / "classifier"
    assert json.loads((judge / "config.json").read_text()) == {"arch": "resnet34", "in_channels": 3, "num_classes": 10}
    assert len((judge / "log.csv").read_text().splitlines()) == 1 + 2  # one epoch of 20 images in batches of 10
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["fid_features"] == "classifier-features"
    for row in report["models"].values():
        assert 0 <= row["ua"] <= 1 and 0 <= row["retained_accuracy"] <= 1 and np.isfinite(row["fid_retained"])
