"""Classification-unlearning methods, by name.

Each method is a small module that turns the original model into an unlearned one,
training (if at all) through the shared loop (:func:`erasure.core.loop.train`).
"""

from erasure.classification.methods import ft, ga, iu, l1, retrain, rl, salun  # noqa: F401  (registers them)
from erasure.classification.methods.base import METHODS, Method, UnlearnContext, get_method, register

__all__ = ["METHODS", "Method", "UnlearnContext", "get_method", "register"]
