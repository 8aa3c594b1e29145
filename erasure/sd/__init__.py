"""Stable Diffusion erasure: SalUn, ESD and FMN on any diffusers SD pipeline."""
