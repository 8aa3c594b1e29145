"""How far the JPEG-q75 copy of CIFAR-10 is from the exact pixels, on the images both files hold.

    python benchmarks/classification_jpeg.py ../shared/data/cifar10

Compares ``cifar10_full_jpeg_q75.npz`` (all 60k images, each a quality-75 JPEG) with the
6,102 exact-pixel images of ``cifar10_exact_subset.npz`` (matched by ``index_in_split``) and
prints, per split, the PSNR over the set, the per-image PSNR (lowest, median) and the mean
absolute error per channel value.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10")
    exact = np.load(folder / "cifar10_exact_subset.npz")
    jpeg = dict(np.load(folder / "cifar10_full_jpeg_q75.npz"))  # read once: indexing an NpzFile re-reads the array
    for split in ("train", "test"):
        sel = exact["split"] == split
        index = exact["index_in_split"][sel]
        blob, offsets = jpeg[f"{split}_jpeg"], jpeg[f"{split}_offsets"]
        assert (jpeg[f"{split}_labels"][index] == exact["labels"][sel]).all(), "the two files disagree on labels"
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")) for i in index])
        true, got = exact["images"][sel].astype(np.float64), decoded.astype(np.float64)
        mse = ((true - got) ** 2).mean(axis=(1, 2, 3))
        psnr = 10 * np.log10(255**2 / mse)
        print(
            f"{split}: {len(index)} images, PSNR {10 * np.log10(255**2 / mse.mean()):.2f} dB over the set, "
            f"per image lowest {psnr.min():.2f} median {np.median(psnr):.2f} dB, mean |error| {np.abs(true - got).mean():.2f} / 255"
        )


if __name__ == "__main__":
    main()
