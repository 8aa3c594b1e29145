"""ResNet-18 for 32x32 images: torchvision's network with the CIFAR stem.

The ImageNet stem (7x7 stride-2 conv + max-pool) shrinks a 32x32 image to 8x8 before the
first block; CIFAR models use a 3x3 stride-1 conv and no pool instead. ``width`` scales
every stage (64 is the standard network); narrower ones are for CPU-sized runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models.resnet import BasicBlock

from erasure.core.errors import ErasureError

# Per-channel (mean, std) of the reference's input normalization, by dataset (its setup_model_dataset).
CHANNEL_STATS = {"cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])}


def resnet18(
    num_classes: int, in_channels: int = 3, width: int = 64, channel_stats: tuple[list[float], list[float]] | None = None
) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem, no max-pool, and stage widths ``width * [1, 2, 4, 8]``.

    It takes pixels in [-1, 1] (:func:`erasure.classification.data.to_input`). With
    ``channel_stats`` = (mean, std) of pixels in [0, 1], it first normalizes them per channel,
    as the reference's models do; the statistics are fixed buffers left out of the state
    dict, so weights, masks and checkpoints keep the same keys either way.
    """
    if width < 1:
        raise ErasureError(f"model.width must be positive, got {width}.")
    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    if width != 64:
        # torchvision fixes the widths at 64..512; rebuild the stages with its own block builder.
        model.bn1 = nn.BatchNorm2d(width)
        model.inplanes = width
        model.layer1 = model._make_layer(BasicBlock, width, 2)
        model.layer2 = model._make_layer(BasicBlock, 2 * width, 2, stride=2)
        model.layer3 = model._make_layer(BasicBlock, 4 * width, 2, stride=2)
        model.layer4 = model._make_layer(BasicBlock, 8 * width, 2, stride=2)
        model.fc = nn.Linear(8 * width, num_classes)
    for m in model.modules():  # torchvision's initialization, redone for the swapped layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if channel_stats is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in channel_stats)
        # x in [-1, 1] is (2 p - 1) for p in [0, 1]: (p - mean) / std = x / (2 std) + (0.5 - mean) / std.
        model.register_buffer("input_scale", 1 / (2 * std), persistent=False)
        model.register_buffer("input_shift", (0.5 - mean) / std, persistent=False)
        model.register_forward_pre_hook(_normalize_input)
    return model


def _normalize_input(model: nn.Module, args: tuple) -> tuple:
    return (args[0] * model.input_scale + model.input_shift, *args[1:])
