"""Numba kernels. Nothing here validates arguments: ``nbgn.api`` does, then calls these."""
