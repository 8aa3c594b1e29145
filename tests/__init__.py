import os

# Idle OpenMP threads sleep instead of spinning, so tests on shared cores do not starve each
# other (see erasure/__init__.py). Set here, in the package pytest imports before conftest.py
# imports torch, because OpenMP reads it once when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
