"""Triton kernels of abd_fast (installed as abd_fast.kernels). Run on CPU tensors under TRITON_INTERPRET=1."""
