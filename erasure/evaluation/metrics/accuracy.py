"""Unlearning accuracy and retained accuracy of generated images, judged by a classifier.

UA = 1 - (fraction of images generated for the forgotten class that the classifier
assigns to that class). Retained accuracy is the same fraction over all other classes.
"""

from __future__ import annotations

import torch


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Fraction of images of each requested class that were classified as that class."""
    return [float((predicted[labels == c] == c).float().mean()) if (labels == c).any() else float("nan") for c in range(num_classes)]


def unlearning_scores(predicted: torch.Tensor, labels: torch.Tensor, forget_class: int) -> dict[str, float]:
    """``ua``, ``forget_accuracy`` and ``retained_accuracy`` (fractions in [0, 1])."""
    forget = labels == forget_class
    forget_acc = float((predicted[forget] == forget_class).float().mean())
    retained_acc = float((predicted[~forget] == labels[~forget]).float().mean())
    return {"ua": 1.0 - forget_acc, "forget_accuracy": forget_acc, "retained_accuracy": retained_acc}
