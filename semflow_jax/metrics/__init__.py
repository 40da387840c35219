"""Evaluation metrics: mIoU, FID, LPIPS and the judges of synthesis (their caches live in semflow_jax.cache)."""

from semflow_jax.cache import cache_root

__all__ = ["cache_root"]
