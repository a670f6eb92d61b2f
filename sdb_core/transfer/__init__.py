"""Transferability: which pre-trained model, and which of its layers, to transfer from (DEPARA).

This package imports no torch on import: its names and settings live in the torch-free ``config``."""
from .config import DEFAULT_PROBE, METHODS

__all__ = ["DEFAULT_PROBE", "METHODS"]
