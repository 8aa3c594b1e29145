"""What the JPEG-q75 copy of CIFAR-10 costs: pixel error, and test accuracy of models trained on it.

    python benchmarks/classification_jpeg.py ../shared/data/cifar10                       # pixel error only
    python benchmarks/classification_jpeg.py ../shared/data/cifar10 --train --label cpu   # + training, JSON in results/

``cifar10_full_jpeg_q75.npz`` holds all 60k images as quality-75 JPEGs; ``cifar10_exact_subset.npz``
holds 6,102 of them with exact pixels (5,085 train, 1,017 test), matched by ``index_in_split``.
The pixel part prints, per split, the PSNR over the set, the per-image PSNR (lowest, median)
and the mean absolute error per channel value.

``--train`` trains the same ResNet-18 (erasure's recipe and training loop) on the 5,085 train
images twice, once with exact pixels and once with their JPEG copies, for each seed, and
scores each model on the 1,017 test images in both forms. Trained-on-JPEG / tested-on-JPEG
against exact / exact is the cost of the JPEG copy at this scale. ``--reference-loop`` also
trains with a plain torch loop (torchvision's crop and flip on each image, ``LambdaLR``): the
same recipe written independently of erasure, as a check of our training pipeline.
The full 45k-image table cannot be repeated on exact pixels here (only 5,085 are known).

``--score CONFIG MODEL`` scores a model trained by a full run on the 1,017 test images in
both forms: how much of its test accuracy the JPEG copy of the test set costs. CONFIG builds
the network (the run's own ``config.yaml`` beside the model will do); the folder then needs
only the test images of ``cifar10_exact_subset.npz``.

    python benchmarks/classification_jpeg.py FOLDER --score runs/classification/cifar10_random10_fast/original/config.yaml \
        runs/classification/cifar10_random10_fast/original/model.safetensors --label h100-fast
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESULTS = Path(__file__).parent / "results"


def load_pairs(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per split: the exact images, their JPEG copies (decoded, HWC uint8) and the labels."""
    exact = np.load(folder / "cifar10_exact_subset.npz")
    jpeg = dict(np.load(folder / "cifar10_full_jpeg_q75.npz"))  # read once: indexing an NpzFile re-reads the array
    pairs = {}
    for split in ("train", "test"):
        sel = exact["split"] == split
        if not sel.any():  # a copy trimmed to the test images is enough for --score
            continue
        index = exact["index_in_split"][sel]
        blob, offsets = jpeg[f"{split}_jpeg"], jpeg[f"{split}_offsets"]
        assert (jpeg[f"{split}_labels"][index] == exact["labels"][sel]).all(), "the two files disagree on labels"
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")) for i in index])
        pairs[split] = {"exact": exact["images"][sel], "jpeg": decoded, "labels": exact["labels"][sel]}
    return pairs


def as_batch(images: np.ndarray) -> torch.Tensor:
    """HWC uint8 images -> an NCHW uint8 tensor, the layout erasure's models take."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def pixel_error(pairs: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    out = {}
    for split, p in pairs.items():
        true, got = p["exact"].astype(np.float64), p["jpeg"].astype(np.float64)
        mse = ((true - got) ** 2).mean(axis=(1, 2, 3))
        psnr = 10 * np.log10(255**2 / mse)
        out[split] = {
            "images": len(mse),
            "psnr_db": round(float(10 * np.log10(255**2 / mse.mean())), 2),
            "psnr_lowest_db": round(float(psnr.min()), 2),
            "psnr_median_db": round(float(np.median(psnr)), 2),
            "mean_abs_error": round(float(np.abs(true - got).mean()), 2),
        }
        print(
            f"{split}: {len(mse)} images, PSNR {out[split]['psnr_db']:.2f} dB over the set, per image lowest "
            f"{out[split]['psnr_lowest_db']:.2f} median {out[split]['psnr_median_db']:.2f} dB, "
            f"mean |error| {out[split]['mean_abs_error']:.2f} / 255"
        )
    return out


def reference_loop(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe) -> torch.nn.Module:
    """The recipe as a plain torch loop: torchvision crop + flip per image, SGD, warm-up then cosine via LambdaLR."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    per_epoch = math.ceil(len(labels) / recipe.batch_size)
    total, warmup = recipe.epochs * per_epoch, recipe.warmup_epochs * per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)  # torchvision's transforms draw from the global generator
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(labels), generator=g)
        for i in range(per_epoch):
            idx = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            x = torch.stack([transform(img) for img in images[idx]]).float() / 127.5 - 1  # erasure's input range
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def train_and_score(pairs, args: argparse.Namespace) -> list[dict[str, object]]:
    from erasure.classification.config import ClassificationConfig, RecipeConfig
    from erasure.classification.metrics import predict
    from erasure.classification.train import build_model, fit
    from erasure.core.loop import make_accelerator

    config = ClassificationConfig()
    config.model.width = args.width
    accelerator = make_accelerator(args.device, "auto")
    dev = accelerator.device

    y_train, y_test = torch.from_numpy(pairs["train"]["labels"]), torch.from_numpy(pairs["test"]["labels"])
    loops = ["erasure", "reference"] if args.reference_loop else ["erasure"]
    rows = []
    for seed in range(args.seeds):
        recipe = RecipeConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="cosine", warmup_epochs=1, augment=True, seed=seed
        )
        for loop in loops:
            for trained_on in ("exact", "jpeg"):
                start = time.time()
                model = build_model(config, 3, 10, seed).to(dev)
                x = as_batch(pairs["train"][trained_on])
                if loop == "erasure":
                    folder = Path(args.workdir) / f"{trained_on}-seed{seed}"
                    model = fit(model, x.to(dev), y_train.to(dev), recipe, folder, accelerator, "jpeg-cost", desc=f"{trained_on} s{seed}")
                else:
                    model = reference_loop(model.cpu(), x, y_train, recipe).to(dev)
                acc = {
                    kind: predict(model, as_batch(pairs["test"][kind]).to(dev), y_test.to(dev), 512, accelerator).accuracy
                    for kind in ("exact", "jpeg")
                }
                row = {"loop": loop, "seed": seed, "trained_on": trained_on, "test_exact": round(acc["exact"], 2)}
                row |= {"test_jpeg": round(acc["jpeg"], 2), "seconds": round(time.time() - start, 1)}
                print(row, flush=True)
                rows.append(row)
    return rows


def score(pairs, config_path: Path, model_path: Path, device: str) -> dict[str, object]:
    """Test accuracy of a trained model on the exact and the JPEG form of the same test images."""
    from erasure.classification.config import ClassificationConfig
    from erasure.classification.metrics import predict
    from erasure.classification.train import build_model, load_weights
    from erasure.core.config import load_config
    from erasure.core.loop import make_accelerator

    config = load_config(config_path, schema=ClassificationConfig)
    accelerator = make_accelerator(device, "no")
    dev = accelerator.device
    model = load_weights(build_model(config, 3, 10, 0), model_path).to(dev)
    labels = torch.from_numpy(pairs["test"]["labels"]).to(dev)
    row: dict[str, object] = {"config": str(config_path), "model": str(model_path), "images": len(labels)}
    for kind in ("exact", "jpeg"):
        images = as_batch(pairs["test"][kind]).to(dev)
        row[f"test_{kind}"] = round(predict(model, images, labels, 512, accelerator).accuracy, 2)
    row["jpeg_cost"] = round(row["test_exact"] - row["test_jpeg"], 2)
    print(row, flush=True)
    return row


def summarize(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Mean test accuracy per (loop, trained on, tested on) over seeds."""
    out: dict[str, dict[str, float]] = {}
    for loop in sorted({r["loop"] for r in rows}):
        for trained in ("exact", "jpeg"):
            sel = [r for r in rows if r["loop"] == loop and r["trained_on"] == trained]
            out[f"{loop}/trained_{trained}"] = {
                f"test_{k}": round(statistics.mean(r[f"test_{k}"] for r in sel), 2) for k in ("exact", "jpeg")
            }
    for loop in sorted({r["loop"] for r in rows}):  # exact/exact minus JPEG/JPEG: what training and testing on the copy costs
        out[f"{loop}/jpeg_cost"] = {
            "points": round(out[f"{loop}/trained_exact"]["test_exact"] - out[f"{loop}/trained_jpeg"]["test_jpeg"], 2)
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=Path("../shared/data/cifar10"))
    parser.add_argument("--train", action="store_true", help="also train on exact vs JPEG pixels and compare test accuracy")
    parser.add_argument("--reference-loop", action="store_true", help="also train with a plain torch loop (checks erasure's)")
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 width (64: the standard network)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--score", nargs=2, type=Path, metavar=("CONFIG", "MODEL"), help="score a trained model (see above)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", default="runs/jpeg-cost")
    parser.add_argument("--label", default=None, help="results/classification_jpeg_{label}.json (default: no file)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON file (default: benchmarks/results)")
    args = parser.parse_args()

    pairs = load_pairs(args.folder)
    result: dict[str, object] = {"benchmark": "classification_jpeg", "pixel_error": pixel_error(pairs)}
    if args.score:
        result["scored"] = score(pairs, *args.score, args.device)
    if args.train:
        start = time.time()
        rows = train_and_score(pairs, args)
        result |= {"rows": rows, "summary": summarize(rows), "train_seconds": round(time.time() - start, 1)}
        for key, value in result["summary"].items():
            print(key, value)
    if args.label:
        from common import machine  # benchmarks/ is on sys.path when a script runs

        from erasure.core.io import write_json

        keys = ("width", "epochs", "batch_size", "lr", "seeds", "reference_loop")
        result |= {"label": args.label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        result |= {"machine": machine(("torch", "torchvision")), "settings": {k: getattr(args, k) for k in keys}}
        write_json(args.out / f"classification_jpeg_{args.label}.json", result)
        print(f"wrote {args.out / f'classification_jpeg_{args.label}.json'}")


if __name__ == "__main__":
    main()
