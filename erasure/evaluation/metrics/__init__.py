"""Metrics, one per module: classifier accuracy (UA) and FID."""
