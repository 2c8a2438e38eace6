"""Gaussian mixtures of 2-D points (chroma pairs), fitted by expectation-maximisation.

The skin model fits two small mixtures per face on ~1000 points; closed-form 2x2 algebra in numpy does that in
about a millisecond, where a general-purpose estimator spends most of its time validating its inputs. The
initialisation is deterministic (equal-count slices along the principal axis), so a crop always gets the same
mixture.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LOG_2PI = np.log(2.0 * np.pi)


@dataclass(frozen=True)
class GaussianMixture2D:
    """weights: (K,) summing to 1; means: (K, 2); covariances: (K, 2, 2) symmetric positive definite."""
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    def component_log_densities(self, points: np.ndarray) -> np.ndarray:
        """log(weight_k N(x | mean_k, cov_k)) per point and component. points: (N, 2). Returns (N, K) float64."""
        points = _check_points(points)
        a, b, d = self.covariances[:, 0, 0], self.covariances[:, 0, 1], self.covariances[:, 1, 1]
        det = a * d - b * b
        dx = points[:, None, 0] - self.means[None, :, 0]
        dy = points[:, None, 1] - self.means[None, :, 1]
        mahalanobis = (d * dx * dx - 2.0 * b * dx * dy + a * dy * dy) / det
        return np.log(self.weights) - 0.5 * (mahalanobis + np.log(det)) - _LOG_2PI

    def log_density(self, points: np.ndarray) -> np.ndarray:
        """log p(x) of the mixture. points: (N, 2). Returns (N,) float64."""
        return _logsumexp(self.component_log_densities(points))


def _check_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points: expected (N, 2), got {points.shape}")
    return points


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=1)
    return top + np.log(np.exp(values - top[:, None]).sum(axis=1))


def _covariances(points: np.ndarray, means: np.ndarray, responsibilities: np.ndarray, totals: np.ndarray,
                 variance_floor: float) -> np.ndarray:
    offsets = points[:, None, :] - means[None]                                  # (N, K, 2)
    scatter = np.einsum("nk,nki,nkj->kij", responsibilities, offsets, offsets)  # (K, 2, 2)
    return scatter / totals[:, None, None] + variance_floor * np.eye(2)


def fit_gaussian_mixture_2d(points: np.ndarray, components: int, variance_floor: float,
                            max_iterations: int = 50, tolerance: float = 1e-4) -> GaussianMixture2D:
    """Maximum-likelihood mixture of `components` full-covariance Gaussians by EM.

    points: (N, 2), N >= components; variance_floor: added to every covariance's diagonal (units of points^2),
    which keeps components from collapsing onto quantised values; stops when the mean log-likelihood gains less
    than `tolerance` or after max_iterations. Returns the mixture.
    """
    points = _check_points(points)
    if not 1 <= components <= len(points):
        raise ValueError(f"need 1 <= components <= {len(points)} points, got {components}")
    centre = points.mean(0)
    _, axes = np.linalg.eigh(np.cov(points - centre, rowvar=False) + 1e-9 * np.eye(2))
    order = np.argsort((points - centre) @ axes[:, -1], kind="stable")
    responsibilities = np.zeros((len(points), components))
    for k, members in enumerate(np.array_split(order, components)):
        responsibilities[members, k] = 1.0
    previous = -np.inf
    for _ in range(max_iterations):
        totals = responsibilities.sum(0) + 1e-12
        means = responsibilities.T @ points / totals[:, None]
        mixture = GaussianMixture2D(totals / totals.sum(), means,
                                    _covariances(points, means, responsibilities, totals, variance_floor))
        joint = mixture.component_log_densities(points)
        log_likelihood = _logsumexp(joint)
        responsibilities = np.exp(joint - log_likelihood[:, None])
        if log_likelihood.mean() - previous < tolerance:
            break
        previous = log_likelihood.mean()
    return mixture
