"""Evaluation metrics, and the cache folder their converted weights, statistics and segmenters share."""

import os


def cache_root() -> str:
    """$SEMFLOW_CACHE, or ~/.cache/semflow_jax: converted Inception weights, FID statistics, segmenters."""
    return os.environ.get("SEMFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "semflow_jax")
