"""Kernels: PyTorch references (the truth for tests) and the faster backends beside them."""
