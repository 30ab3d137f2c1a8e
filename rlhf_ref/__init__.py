"""rlhf_ref: the reference implementation of RLHF for language models (NumPy only)."""

__version__ = "0.1.0"
