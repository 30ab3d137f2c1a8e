"""Compiled twins of the reference (Cython, Numba, Numba CUDA). Import through rlhf_ref.backends."""
