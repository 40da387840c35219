"""Ahead-of-time compilation for accelerators that are not attached: TPU slices planned from a CPU host."""
