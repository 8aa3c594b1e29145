"""Machinery every path shares: config loading, io, stages, registry, saliency masks, the training loop, deltas."""
