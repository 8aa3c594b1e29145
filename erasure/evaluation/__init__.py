"""Scoring erased models: metrics (accuracy/UA, FID, nudity), prompt files, audits, grids and reports."""
