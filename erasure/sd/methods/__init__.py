"""Stable Diffusion erasure methods; importing this package registers them all."""

from erasure.sd.methods import esd, fmn, salun, uce  # noqa: F401
from erasure.sd.methods.base import SD_METHODS, SDContext, SDMethod

__all__ = ["SD_METHODS", "SDContext", "SDMethod"]
