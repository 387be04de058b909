"""Kernels behind plain functions: a pure-torch reference next to each fast path."""
