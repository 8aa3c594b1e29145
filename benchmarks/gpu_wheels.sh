#!/bin/sh
# Prepare a GPU run with the `device` tool. Its CUDA image (Python 3.12, torch, transformers,
# accelerate, onnxruntime, opencv) lacks diffusers, torch-fidelity and nudenet, and ../shared
# does not travel, so this fills two git-ignored folders to name in the run's `carry`:
#   .whl/        the missing wheels (17 MB; NudeNet ships its detector)
#   .gpu-data/   the CLIP tokenizer, plus with `cifar10` the folder .gpu-data/cifar10/: the JPEG
#                copy (54 MB) and the exact-pixel test images (3 MB, for classification_jpeg.py --score)
# A run carries at most 64 MiB, so the FID Inception weights (84 MB) cannot travel.
# On the device, start the command with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl*/*.whl && export PYTHONPATH=/tmp/site:$PWD
# then e.g.
#   python3 benchmarks/sd_training.py --tokenizer .gpu-data/clip_tokenizer --label h100
#   python3 benchmarks/classification.py --config configs/classification/cifar10_random10_fast.yaml \
#       --data-path .gpu-data/cifar10/cifar10_full_jpeg_q75.npz --label h100-fast
set -e
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 torch-fidelity==0.4.0 nudenet==3.4.2 importlib-metadata  # diffusers needs it; the image has zipp
mkdir -p .gpu-data
cp -r ../shared/data/clip_tokenizer .gpu-data/
if [ "$1" = cifar10 ]; then
    # CIFAR-10 and the wheels pass the 64 MiB a run carries together; the classification path
    # needs none of them (torch, accelerate and Pillow are in the image): carry .gpu-data/cifar10 alone.
    mkdir -p .gpu-data/cifar10
    cp ../shared/data/cifar10/cifar10_full_jpeg_q75.npz .gpu-data/cifar10/
    ${PYTHON:-python3} -c "
import numpy as np
z = np.load('../shared/data/cifar10/cifar10_exact_subset.npz')
test = z['split'] == 'test'
np.savez_compressed('.gpu-data/cifar10/cifar10_exact_subset.npz', class_names=z['class_names'],
                    **{k: z[k][test] for k in ('images', 'labels', 'split', 'index_in_split', 'source_batch')})"
fi
du -sh .whl* .gpu-data
