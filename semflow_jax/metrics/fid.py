"""Fréchet Inception Distance: streaming feature statistics, the distance between two Gaussians, .npz stats.

Statistics follow pytorch-fid and clean-fid: the mean and the unbiased (N - 1) covariance of the pool3
features, here accumulated batch by batch in float64 (count, sum, sum of outer products) so that no feature
matrix of the whole set is ever held. The stats files hold `mu` and `sigma` like theirs, so precomputed
reference statistics of those tools load here too.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np

from semflow_jax.errors import SemFlowError, atomic_write_bytes

# Eigenvalues of a covariance (or of sqrt(sigma1) sigma2 sqrt(sigma1)) below zero by less than this fraction
# of the largest are round-off (float32 statistics give ~1e-7) and count as zero; anything more negative
# means the input is not a covariance, and we say so rather than return a number.
NEGATIVE_TOLERANCE = 1e-5


class FeatureSums(NamedTuple):
    """Running sums of features: count, sum [D] and sum of outer products [D, D], all float64 but count."""

    count: int
    total: np.ndarray
    outer: np.ndarray


def empty_sums(dim: int = 2048) -> FeatureSums:
    """Sums of no features of dimension `dim`."""
    return FeatureSums(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))


def add_features(sums: FeatureSums, features, valid=None) -> FeatureSums:
    """New sums with the rows of features [N, D] added; `valid` [N] bool drops padded rows."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != sums.total.shape[0]:
        raise SemFlowError(f"features must be [N, {sums.total.shape[0]}], got {list(x.shape)}")
    if valid is not None:
        x = x[np.asarray(valid, bool)]
    return FeatureSums(sums.count + len(x), sums.total + x.sum(0), sums.outer + x.T @ x)


def merge_sums(a: FeatureSums, b: FeatureSums) -> FeatureSums:
    """The sums of two disjoint sets of features (e.g. from two hosts)."""
    return FeatureSums(a.count + b.count, a.total + b.total, a.outer + b.outer)


def mean_and_covariance(sums: FeatureSums) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64: the mean and the unbiased covariance, as np.mean and np.cov give."""
    n = sums.count
    if n < 2:
        raise SemFlowError(f"a covariance needs at least 2 feature vectors, got {n}")
    mu = sums.total / n
    # sum (x - mu)(x - mu)^T = sum x x^T - n mu mu^T. Float64 keeps the cancellation harmless for Inception
    # features (non-negative, mean and spread of the same order): the error is ~1e-16 relative.
    sigma = (sums.outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2


def _check_gaussian(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    """mu [D] and sigma [D, D] as float64, validated."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise SemFlowError(
            f"{which}: need mu [D] and sigma [D, D], got {list(mu.shape)} and {list(sigma.shape)}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise SemFlowError(f"{which}: statistics contain NaN or infinity")
    return mu, (sigma + sigma.T) / 2  # stored covariances can be asymmetric at round-off level


def _clipped_eigenvalues(values: np.ndarray, what: str) -> np.ndarray:
    """Eigenvalues of a symmetric positive semidefinite matrix with round-off negatives set to 0."""
    scale = max(float(np.max(np.abs(values))), np.finfo(np.float64).tiny)
    if values.min() < -NEGATIVE_TOLERANCE * scale:
        raise SemFlowError(
            f"{what} is not positive semidefinite: eigenvalue {values.min():.3g} (largest {values.max():.3g})"
        )
    return np.clip(values, 0.0, None)


def _psd_sqrt(sigma: np.ndarray, which: str) -> np.ndarray:
    """The symmetric square root of a covariance."""
    values, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(_clipped_eigenvalues(values, f"{which} sigma"))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) between two Gaussians.

    tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of sigma1 sigma2, which are
    those of the symmetric positive semidefinite sqrt(sigma1) sigma2 sqrt(sigma1): two symmetric
    eigendecompositions, real throughout, instead of a general matrix square root whose round-off shows up
    as imaginary parts (what scipy.linalg.sqrtm users discard). Negative eigenvalues beyond round-off raise.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise SemFlowError(f"statistics of different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    root1 = _psd_sqrt(sigma1, "first")
    _clipped_eigenvalues(np.linalg.eigvalsh(sigma2), "second sigma")
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2
    trace_sqrt = np.sum(
        np.sqrt(_clipped_eigenvalues(np.linalg.eigvalsh(middle), "sqrt(sigma1) sigma2 sqrt(sigma1)"))
    )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def save_stats(path: str, mu, sigma, count: int | None = None) -> None:
    """Writes mu [D] and sigma [D, D] (and the number of images, if given) to a .npz, atomically."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if count is not None:
        arrays["count"] = np.int64(count)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64 from a .npz with `mu` and `sigma` (ours, pytorch-fid's, clean-fid's)."""
    try:
        stats = np.load(path)  # allow_pickle stays False: a stats file is data, never objects
    except (OSError, ValueError) as e:
        raise SemFlowError(f"cannot read FID statistics {path}: {e}") from None
    if not isinstance(stats, np.lib.npyio.NpzFile):
        raise SemFlowError(f"{path}: expected a .npz with arrays mu and sigma, found a single array")
    with stats:
        if "mu" not in stats.files or "sigma" not in stats.files:
            raise SemFlowError(f"{path}: expected arrays mu and sigma, found {sorted(stats.files)}")
        mu, sigma = stats["mu"], stats["sigma"]
    return _check_gaussian(mu, sigma, path)
