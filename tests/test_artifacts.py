"""Damaged masks and deltas are clear errors; artifacts of the same inputs are byte-identical."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from erasure.core.delta import apply_delta, make_delta
from erasure.core.errors import ErasureError
from erasure.core.io import save_tensors
from erasure.core.saliency import Mask, pack_bits


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))


def mask_file(tmp_path, tensors, **metadata) -> str:
    meta = {"format": "erasure-mask/1", "fingerprint": "f", "shapes": "{}", "info": "{}", **metadata}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})
    return str(path)


def test_mask_with_damaged_metadata_or_sizes_is_a_clear_error(tmp_path):
    bits = pack_bits(torch.ones(7, 5, dtype=torch.bool))
    shapes = json.dumps({"0.weight": [7, 5]})
    cases = [
        ({"0.weight": bits}, dict(shapes=None), "no 'shapes'"),
        ({"0.weight": bits}, dict(shapes="{not json"), "not valid JSON"),
        ({"0.weight": bits}, dict(shapes="[1, 2]"), "not a dict"),
        ({"0.weight": bits}, dict(shapes=shapes, fingerprint=None), "no 'fingerprint'"),
        ({"0.weight": bits[:3]}, dict(shapes=shapes), "needs 5 packed bytes"),
        ({"0.weight": bits.to(torch.int32)}, dict(shapes=shapes), "needs 5 packed bytes"),
        ({"0.wieght": bits}, dict(shapes=shapes), "missing"),
        ({"0.weight": bits, "x": bits.clone()}, dict(shapes=shapes), "not listed"),
        ({"0.weight": bits}, dict(shapes=json.dumps({"0.weight": "7x5"})), "not a list of sizes"),
    ]
    for tensors, metadata, message in cases:
        with pytest.raises(ErasureError, match=message):
            Mask.load(mask_file(tmp_path, tensors, **metadata))


def test_delta_with_wrong_names_or_sizes_is_a_clear_error(tmp_path):
    base = small_net().state_dict()
    new = {k: v.clone() for k, v in base.items()}
    new["0.weight"][0, 0] += 1  # sparse: one entry
    new["1.bias"] += 1  # whole tensor
    good = tmp_path / "good.safetensors"
    make_delta(base, new, good)
    merged = apply_delta(base, good)
    assert all(torch.equal(merged[k], new[k]) for k in base)

    from erasure.core.io import load_tensors, read_metadata

    tensors, metadata = load_tensors(good), read_metadata(good)

    def variant(name: str, edit) -> str:
        t, m = dict(tensors), dict(metadata)
        edit(t, m)
        path = tmp_path / f"{name}.safetensors"
        save_file(t, str(path), metadata=m)
        return str(path)

    cases = {
        "no_sparse": (lambda t, m: m.pop("sparse"), "no 'sparse'"),
        "no_checksum": (lambda t, m: m.pop("base_checksum"), "no 'base_checksum'"),
        "short_bits": (lambda t, m: t.update({"0.weight::changed": t["0.weight::changed"][:2]}), "packed bytes"),
        "extra_values": (lambda t, m: t.update({"0.weight::values": torch.zeros(4)}), "marks 1 changed entries"),
        "lonely_values": (lambda t, m: t.pop("0.weight::changed"), "only one of"),
        "wrong_name": (lambda t, m: t.update({"2.bias": t.pop("1.bias")}), "does not have"),
        "wrong_shape": (lambda t, m: t.update({"1.bias": torch.zeros(4)}), "in shape"),
        "odd_part": (lambda t, m: t.update({"1.bias::other": torch.zeros(1)}), "not part of the delta format"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(ErasureError, match=message):
            apply_delta(base, variant(name, edit))


def test_safetensors_metadata_is_written_in_a_fixed_order(tmp_path):
    # safetensors keeps metadata in a hash map whose order changes per process, so the same
    # mask saved twice differed byte for byte; erasure writes its own sorted header.
    code = (
        "import sys, torch; from erasure.core.io import save_tensors; "
        "save_tensors(sys.argv[1], {'b': torch.arange(5.0), 'a': torch.ones(3, dtype=torch.bfloat16)}, "
        "{'format': 'x', 'shapes': 'y', 'info': 'z', 'fingerprint': 'w', 'seed': '1'})"
    )
    blobs = []
    for i in range(3):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        blobs.append(path.read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]


def test_saved_tensors_round_trip_in_every_dtype(tmp_path):
    from erasure.core.io import load_tensors, read_metadata

    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(7),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6)[:, ::2],
    }
    save_tensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    back = load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert read_metadata(tmp_path / "t.safetensors") == {"k": "v"}
