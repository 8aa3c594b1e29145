import os
from pathlib import Path

import pytest
import torch

from erasure.core.errors import ErasureError
from erasure.ddpm.config import FidConfig
from erasure.evaluation.metrics.accuracy import per_class_accuracy, unlearning_scores
from erasure.evaluation.metrics.fid import feature_fid, fid, inception_fid

SHARED_FID = Path(
    os.environ.get("ERASURE_FID_WEIGHTS", Path(__file__).parents[2] / "shared/data/fid/weights-inception-2015-12-05-torch-fidelity.pth")
)


def test_unlearning_scores():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 5, 5, 5, 1, 0, 2, 2])
    scores = unlearning_scores(predicted, labels, forget_class=0)
    assert scores == {"ua": 0.75, "forget_accuracy": 0.25, "retained_accuracy": 0.75}
    assert per_class_accuracy(predicted, labels, 3) == [0.25, 0.5, 1.0]


def test_feature_fid_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert feature_fid(a, b) == pytest.approx(0.0, abs=0.02)
    # Same covariance, means 2 apart along one axis: FID = |mu1 - mu2|^2 = 4.
    shifted = b + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    assert feature_fid(a, shifted) == pytest.approx(4.0, abs=0.1)


def test_classifier_feature_fid_is_named():
    class Judge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.eye(4))

        def features(self, images):
            return images.float().flatten(1)[:, :4] @ self.w

    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (300, 1, 2, 2), generator=g, dtype=torch.uint8)
    value, name = fid(real, real, FidConfig(features="classifier"), Judge())
    assert name == "classifier-features" and value == pytest.approx(0.0, abs=1e-6)


def test_tampered_inception_weights_are_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"not": Path("a pickled object")}, path)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ErasureError, match="refusing to load"):
        inception_fid(images, images, str(path))
    with pytest.raises(ErasureError, match="do not exist"):
        fid(images, images, FidConfig(features="inception", weights=str(tmp_path / "missing.pth")))


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_FID.is_file(), reason="no local Inception weights (set ERASURE_FID_WEIGHTS)")
def test_inception_fid_with_local_weights():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 256, (24, 1, 8, 8), generator=g, dtype=torch.uint8)
    value, name = fid(a, a.clone(), FidConfig(features="auto", weights=str(SHARED_FID)))
    assert name == "inception-2048" and abs(value) < 1e-3
    noise = torch.randint(0, 256, (24, 1, 8, 8), generator=g, dtype=torch.uint8)
    flat = torch.full((24, 1, 8, 8), 128, dtype=torch.uint8) + (noise // 16)
    ours = fid(a, flat, FidConfig(weights=str(SHARED_FID)))[0]
    assert ours > 1.0
    # The same number torch-fidelity's own one-call API gives.
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i].expand(3, -1, -1).contiguous()

    reference = torch_fidelity.calculate_metrics(
        input1=Images(a), input2=Images(flat), fid=True, feature_extractor_weights_path=str(SHARED_FID), cuda=False, verbose=False
    )["frechet_inception_distance"]
    assert ours == pytest.approx(reference, rel=1e-3)
