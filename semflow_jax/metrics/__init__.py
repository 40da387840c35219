"""Evaluation metrics: mIoU, FID, LPIPS and the judges of synthesis (their caches live in semflow_jax.cache)."""
