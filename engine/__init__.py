"""SVDQuant serving engine: 4-bit weights and activations with a 16-bit low-rank branch."""

__version__ = "0.1.0"
