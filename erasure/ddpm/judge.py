"""The classifier that judges generated images: it scores unlearning accuracy (UA), retained
accuracy, and gives features for the fallback FID when no Inception weights exist.

Two architectures (``classifier.arch``): :class:`ConvClassifier`, a small CNN trained from
scratch at the data's resolution (the demo, MNIST), and :class:`ResNetJudge`, the SalUn DDPM
reference's judge (``train_classifier.py``): torchvision's ResNet-34 from ImageNet weights,
fine-tuned on images resized to 224 px. Both take uint8 images and train through the shared loop.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

from erasure.core.batchnorm import synced_batchnorm
from erasure.core.data import EpochSampler, ImageData, random_flip, to_model_range
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, read_json, save_tensors, torchvision_weights, write_json
from erasure.core.loop import LoopSettings, make_accelerator, shard, shard_weight, train
from erasure.ddpm.config import ClassifierConfig


class Judge(nn.Module):
    """What evaluation asks of a judge: logits and penultimate features of uint8 images (N, C, H, W)."""

    arch: dict  # the constructor's arguments, saved as config.json
    predict_batch = 512  # images per forward pass in :meth:`predict`

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of uint8 images."""
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The class scores of penultimate features."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of uint8 images (N, C, H, W)."""
        return self.logits(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Top-1 predicted labels (on the CPU) for uint8 images, in eval mode."""
        self.eval()
        device = next(self.parameters()).device
        size = batch_size or self.predict_batch
        return torch.cat([self(images[i : i + size].to(device)).argmax(1).cpu() for i in range(0, len(images), size)])

    def save(self, folder: str | Path) -> None:
        """``model.safetensors`` + ``config.json`` in ``folder``."""
        save_tensors(Path(folder) / "model.safetensors", self.state_dict())
        write_json(Path(folder) / "config.json", self.arch)

    @staticmethod
    def load(folder: str | Path, device: str | torch.device = "cpu") -> Judge:
        """Load a judge saved by :meth:`save`, in eval mode."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ErasureError(f"'{folder}' holds no classifier (config.json missing); run `erasure train-classifier` first.")
        arch = read_json(folder / "config.json")
        # A CNN's config.json names no arch: the files saved before the ResNet existed load unchanged.
        kind = arch.pop("arch", "cnn")
        classes: dict[str, type[Judge]] = {"cnn": ConvClassifier, "resnet34": ResNetJudge}
        if kind not in classes:
            raise ErasureError(f"'{folder}/config.json' names the judge arch '{kind}'; this version knows cnn and resnet34.")
        model = classes[kind](**arch)
        try:
            model.load_state_dict(load_tensors(folder / "model.safetensors"))
        except RuntimeError as e:
            raise ErasureError(f"the weights in '{folder}' do not fit its config.json ({e}).") from None
        return model.to(device).eval()


class ConvClassifier(Judge):
    """Stages of two 3x3 conv-BN-ReLU layers, halving the resolution between stages."""

    def __init__(self, in_channels: int, num_classes: int, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(channels):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                prev = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(prev, num_classes)
        self.arch = {"in_channels": in_channels, "num_classes": num_classes, "channels": list(channels)}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of uint8 images."""
        return self.body(to_model_range(images))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The class scores of penultimate features."""
        return self.head(features)


RESNET_SIZE = 224  # train_classifier.py and classifier_evaluation.py: transforms.Resize((224, 224))


def reference_input(images: torch.Tensor, size: int = RESNET_SIZE) -> torch.Tensor:
    """uint8 images as the reference's transforms hand them to its ResNet, (N, 3, size, size) in [-1, 1].

    ``Resize((224, 224))`` on a PIL image (bilinear with antialiasing, rounded to uint8),
    ``ToTensor`` and ``Normalize(0.5, 0.5)``; grey images become RGB as PIL's ``convert("RGB")``
    does. torchvision's uint8 resize equals PIL's bit for bit on the CPU; on a GPU it
    interpolates in float and rounds (at most 1/255 apart).
    """
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    x = resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return to_model_range(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


class ResNetJudge(Judge):
    """torchvision's ResNet-34 with a new ``num_classes``-way fc layer, fed uint8 images through :func:`reference_input`.

    The state dict is torchvision's under ``net.`` (``net.fc`` the new layer); ``features``
    are its 512-d average-pooled activations, the fc layer's input.
    """

    predict_batch = 128

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        from torchvision.models import resnet34

        self.net = resnet34(weights=None)
        self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)
        self.arch = {"arch": "resnet34", "in_channels": in_channels, "num_classes": num_classes}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The 512-d average-pooled activations of uint8 images."""
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(reference_input(images)))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The class scores of penultimate features."""
        return self.net.fc(features)


def imagenet_resnet34(weights: str | None) -> dict[str, torch.Tensor]:
    """torchvision's ResNet-34 ImageNet weights (IMAGENET1K_V1, what ``pretrained=True`` gave): ``weights`` is a local
    state dict, None torchvision's download (see :func:`erasure.core.io.torchvision_weights`)."""
    from torchvision.models import ResNet34_Weights

    hint = (
        "Set classifier.weights=/path/to/resnet34-b627a593.pth (a copy of torchvision's IMAGENET1K_V1 file), "
        "or classifier.pretrained=false to start from random weights."
    )
    return torchvision_weights(ResNet34_Weights.IMAGENET1K_V1, weights, "ResNet-34 ImageNet weights", hint)


def build_resnet_judge(config: ClassifierConfig, in_channels: int, num_classes: int) -> ResNetJudge:
    """The reference's start: the ImageNet weights (unless ``pretrained: false``) under a new fc layer, its weight Xavier-uniform."""
    model = ResNetJudge(in_channels, num_classes)
    if config.pretrained:
        state = {k: v for k, v in imagenet_resnet34(config.weights).items() if not k.startswith("fc.")}  # ImageNet's head goes
        what = f"'{config.weights or 'the downloaded weights'}' is not a torchvision ResNet-34 state dict"
        try:
            result = model.net.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise ErasureError(f"{what} ({str(e).splitlines()[-1].strip()}).") from None
        if result.unexpected_keys or set(result.missing_keys) != {"fc.weight", "fc.bias"}:
            raise ErasureError(f"{what} (missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}).")
    nn.init.xavier_uniform_(model.net.fc.weight)  # the bias keeps nn.Linear's default init, as in the reference
    return model


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random shift of up to 2 px per batch; per-image horizontal flips for colour images (digits must not flip)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=g, device=g.device).tolist()
    x = padded[:, :, dy : dy + h, dx : dx + w]
    if c == 3:
        flip = torch.rand(n, generator=g, device=g.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def train_classifier(
    config: ClassifierConfig, data: ImageData, folder: str | Path, device: str = "auto", fingerprint: str = "", log_with: str = "none"
) -> Judge:
    """Train the judge ``config.arch`` on ``data`` with the shared loop (trackers: ``log_with``); returns it in eval mode."""
    accelerator = make_accelerator(device, "no", log_with)
    torch.manual_seed(config.seed)  # the initial weights: without it two identical runs start apart
    if config.arch == "resnet34":
        return _train_resnet(config, data, folder, accelerator, fingerprint)
    model = ConvClassifier(data.shape[0], data.num_classes, config.channels)
    images = data.images.to(accelerator.device)
    labels = data.labels.to(accelerator.device)

    def step_loss(m: nn.Module, g: torch.Generator, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.randint(0, len(labels), (config.batch_size,), generator=g, device=g.device)
        x = _augment(images[idx].float(), g)
        return F.cross_entropy(m(x), labels[idx]), {}

    every = max(1, config.steps // 4)
    settings = LoopSettings.from_config(
        config, lr=config.resolved_lr(), warmup_steps=config.steps // 20, cosine=True, checkpoint_every=every, desc="classifier"
    )
    model, _ = train(model, step_loss, settings, folder, accelerator, fingerprint=fingerprint)
    return model.eval()


def _train_resnet(config: ClassifierConfig, data: ImageData, folder: str | Path, accelerator: Accelerator, fingerprint: str) -> ResNetJudge:
    """The reference's fine-tuning: shuffled epochs (the last batch smaller), each image flipped with p 0.5, cross-entropy;
    Adam at a constant lr with L2 ``weight_decay`` on every weight, the fc layer at ``head_lr_scale`` times the lr; no clipping."""
    model = build_resnet_judge(config, data.shape[0], data.num_classes)
    images = data.images.to(accelerator.device)
    labels = data.labels.to(accelerator.device)
    sampler = EpochSampler(len(labels), config.batch_size, config.seed, accelerator.device)

    # Under `accelerate launch` every process draws the one-process batch and its flips, then trains on its share of
    # it; BatchNorm normalizes with the whole batch's statistics, as the reference's one-device run.
    rank, processes = accelerator.process_index, accelerator.num_processes

    def step_loss(m: nn.Module, g: torch.Generator, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = sampler(step)
        mine = shard(len(idx), rank, processes)
        loss = F.cross_entropy(m(random_flip(images[idx], g)[mine]), labels[idx][mine])
        return loss * shard_weight(mine, len(idx), processes), {}

    settings = LoopSettings(
        steps=config.epochs * sampler.steps_per_epoch,
        lr=config.resolved_lr(),
        seed=config.seed,
        grad_clip=None,
        optimizer="adam",  # torch's Adam: weight decay as an L2 term, not AdamW's decoupled decay
        weight_decay=config.weight_decay,
        lr_scales=(("net.fc.", config.head_lr_scale),),
        global_batches=True,
        checkpoint_every=sampler.steps_per_epoch,
        desc="classifier (resnet34)",
    )
    with synced_batchnorm(model, accelerator):
        model, _ = train(model, step_loss, settings, folder, accelerator, fingerprint=fingerprint)
    return model.eval()
