"""erasure: remove classes and concepts from diffusion models, and measure that it worked."""

__version__ = "0.1.0"
