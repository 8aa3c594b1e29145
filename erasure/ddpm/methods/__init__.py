"""Erasure methods for the class-conditional DDPM, by name.

Each method is a small module: an optional mask and a loss per step. They share one
training loop (:func:`erasure.core.loop.train`) through :func:`erasure.ddpm.pipeline.erase`.
"""

from erasure.ddpm.methods import esd, ga, random_mask, rl, salun  # noqa: F401  (registers them)
from erasure.ddpm.methods.base import METHODS, EraseContext, Method, get_method

__all__ = ["METHODS", "EraseContext", "Method", "get_method"]
