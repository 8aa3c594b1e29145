"""Classification-unlearning metrics: UA, RA, TA, MIA-efficacy, RTE, and the gap table.

- UA = 100 - accuracy on the forget set; RA / TA = accuracy on the retain / test set (%).
- MIA-efficacy (the SalUn / Unlearn-Sparse protocol): an RBF SVC (C = 3, gamma = "auto")
  on one feature, the softmax confidence of the true label, is fit with retain samples
  (as many as the test set, seeded) as members and the test set as non-members, then
  applied to the forget set; efficacy = 100 * (1 - the fraction predicted member).
  Confidences come from fp32 forward passes (the reference evaluates in fp32; bf16 logits
  would quantize confidences near 1, exactly where members and non-members differ).
- RTE = wall-clock minutes of the unlearning run itself (evaluation excluded).
Each method's gap to Retrain is |metric - Retrain's metric| for UA, RA, TA and MIA, and
the average gap is their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from erasure.classification.data import to_input
from erasure.core.errors import ErasureError

METRICS = ("UA", "RA", "TA", "MIA")


@dataclass
class Predictions:
    """Per-image results on one set (CPU tensors)."""

    correct: torch.Tensor  # bool
    confidence: torch.Tensor  # softmax probability of the true label

    @property
    def accuracy(self) -> float:
        """Accuracy in percent."""
        return 100.0 * self.correct.float().mean().item()


@torch.no_grad()
def predict(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, accelerator: Accelerator, autocast: bool = False
) -> Predictions:
    """Run ``model`` (eval mode) over uint8 images already on the device; in fp32 unless ``autocast``."""
    model.eval()
    correct, confidence = [], []
    for i in range(0, len(labels), batch_size):
        y = labels[i : i + batch_size]
        # An explicit fp32 region: the caller may sit inside an autocast context (e.g. the training loop's).
        precision = accelerator.autocast() if autocast else torch.autocast(images.device.type, enabled=False)
        with precision:
            logits = model(to_input(images[i : i + batch_size]))
        probs = logits.float().softmax(1)
        correct.append((probs.argmax(1) == y).cpu())
        confidence.append(probs.gather(1, y[:, None]).squeeze(1).cpu())
    return Predictions(torch.cat(correct), torch.cat(confidence))


def mia_efficacy(
    retain_conf: torch.Tensor, test_conf: torch.Tensor, forget_conf: torch.Tensor, seed: int = 0, members: str = "first"
) -> float:
    """MIA-efficacy in percent: how much of the forget set a confidence-based attack calls non-member.

    The attack learns members from as many retain images as there are test images: the first
    ones in dataset order (``members="first"``, the reference's ``Subset(retain, range(len(test)))``)
    or a seeded random draw (``"random"``).
    """
    from sklearn.svm import SVC

    if members == "first":
        chosen = torch.arange(min(len(retain_conf), len(test_conf)))
    else:
        chosen = torch.randperm(len(retain_conf), generator=torch.Generator().manual_seed(seed))[: len(test_conf)]
    x = torch.cat([retain_conf[chosen], test_conf]).double().numpy()[:, None]
    y = np.concatenate([np.ones(len(chosen)), np.zeros(len(test_conf))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    predicted_member = clf.predict(forget_conf.double().numpy()[:, None])
    return 100.0 * (1.0 - float(predicted_member.mean()))


def score(
    model: torch.nn.Module,
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    accelerator: Accelerator,
    seed: int = 0,
    autocast: bool = False,
    mia_members: str = "first",
) -> dict[str, float]:
    """UA, RA, TA, MIA (percent) of ``model``; class-wise runs add the forgotten class's test accuracy."""
    p = {name: predict(model, x, y, batch_size, accelerator, autocast) for name, (x, y) in sets.items() if len(y)}
    if any(not torch.isfinite(r.confidence).all() for r in p.values()):
        raise ErasureError("the model outputs NaN or inf; the method diverged (lower its lr, or unlearn.iu.alpha for IU).")
    out = {
        "UA": 100.0 - p["forget"].accuracy,
        "RA": p["retain"].accuracy,
        "TA": p["test"].accuracy,
        "MIA": mia_efficacy(p["retain"].confidence, p["test"].confidence, p["forget"].confidence, seed, mia_members),
    }
    if "test_forget" in p:
        out["TA_forget_class"] = p["test_forget"].accuracy
    return out


def make_table(rows: dict[str, dict[str, float]], reference: str = "retrain") -> list[dict[str, float | str | None]]:
    """One row per model with each metric's gap to ``reference`` and the average gap (None without a reference)."""
    ref = rows.get(reference)
    table = []
    for name, row in rows.items():
        entry: dict[str, float | str | None] = {"method": name, **row}
        gaps = [abs(row[m] - ref[m]) for m in METRICS] if ref else None
        for m, gap in zip(METRICS, gaps or [None] * len(METRICS)):
            entry[f"gap_{m}"] = gap
        entry["avg_gap"] = sum(gaps) / len(gaps) if gaps else None
        table.append(entry)
    return table


def markdown(table: list[dict[str, float | str | None]]) -> str:
    """The table as Markdown: each metric with its gap to Retrain in parentheses."""
    class_wise = any("TA_forget_class" in row for row in table)
    head = ["method", *METRICS, *(["TA forget class"] if class_wise else []), "avg gap", "RTE (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [str(row["method"])]
        for m in METRICS:
            gap = row[f"gap_{m}"]
            cells.append(f"{row[m]:.2f}" + (f" ({gap:.2f})" if gap is not None else ""))
        if class_wise:
            cells.append(f"{row['TA_forget_class']:.2f}" if "TA_forget_class" in row else "")
        cells.append(f"{row['avg_gap']:.2f}" if row["avg_gap"] is not None else "")
        cells.append(f"{row['RTE']:.2f}" if row.get("RTE") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
