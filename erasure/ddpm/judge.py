"""The CNN that judges generated images: it scores unlearning accuracy (UA), retained
accuracy, and gives features for the fallback FID when no Inception weights exist."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.core.data import ImageData, to_model_range
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, read_json, save_tensors, write_json
from erasure.core.loop import LoopSettings, make_accelerator, train
from erasure.ddpm.config import ClassifierConfig


class ConvClassifier(nn.Module):
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of uint8 images (N, C, H, W)."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels (on the CPU) for uint8 images."""
        self.eval()
        device = next(self.parameters()).device
        return torch.cat([self(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)])

    def save(self, folder: str | Path) -> None:
        """``model.safetensors`` + ``config.json`` in ``folder``."""
        save_tensors(Path(folder) / "model.safetensors", self.state_dict())
        write_json(Path(folder) / "config.json", self.arch)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ConvClassifier:
        """Load a classifier saved by :meth:`save`."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ErasureError(f"'{folder}' holds no classifier (config.json missing); run `erasure train-classifier` first.")
        model = cls(**read_json(folder / "config.json"))
        try:
            model.load_state_dict(load_tensors(folder / "model.safetensors"))
        except RuntimeError as e:
            raise ErasureError(f"the weights in '{folder}' do not fit its config.json ({e}).") from None
        return model.to(device).eval()


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
) -> ConvClassifier:
    """Train a classifier on ``data`` with the shared loop (trackers: ``log_with``); returns it in eval mode."""
    accelerator = make_accelerator(device, "no", log_with)
    torch.manual_seed(config.seed)  # the initial weights: without it two identical runs start apart
    model = ConvClassifier(data.shape[0], data.num_classes, config.channels)
    images = data.images.to(accelerator.device)
    labels = data.labels.to(accelerator.device)

    def step_loss(m: nn.Module, g: torch.Generator, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.randint(0, len(labels), (config.batch_size,), generator=g, device=g.device)
        x = _augment(images[idx].float(), g)
        return F.cross_entropy(m(x), labels[idx]), {}

    every = max(1, config.steps // 4)
    settings = LoopSettings.from_config(
        config, warmup_steps=config.steps // 20, cosine=True, weight_decay=5e-4, checkpoint_every=every, desc="classifier"
    )
    model, _ = train(model, step_loss, settings, folder, accelerator, fingerprint=fingerprint)
    return model.eval()
