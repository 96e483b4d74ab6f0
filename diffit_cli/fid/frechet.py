"""The Fréchet distance between Gaussians fitted to features: FID (Inception pool_3), sFID (Inception's spatial
`mixed_6/conv` features) and any other feature space, in a form that stays real on rank-deficient covariances."""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics

from diffit_cli.errors import DiffitError


def feature_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{mu, sigma} of (N, D) features in float64 (the unbiased covariance, as EDM's and ADM's tools compute it)."""
    s = fid_features_to_statistics(features.double())
    return {"mu": np.asarray(s["mu"], np.float64), "sigma": np.atleast_2d(np.asarray(s["sigma"], np.float64))}


def check_feature_size(samples: int, reference: int, what: str, reference_name: str = "the reference") -> None:
    """The one check that sample and reference features can be compared: the same number of dimensions."""
    if samples != reference:
        usual = "Inception mixed_6/conv, 2023" if what == "sFID" else "Inception pool_3, 2048"
        raise DiffitError(
            f"{what}: {reference_name} holds {reference}-dimensional features (EDM/ADM statistics files: {usual}) "
            f"but the samples' have {samples}; use the feature extractor the reference was made with"
        )


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance ‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1Σ2)^½ between two Gaussians, in float64.

    tr (Σ1Σ2)^½ is the sum of the square roots of the eigenvalues of Σ1Σ2, which are those of
    Σ1^½ Σ2 Σ1^½ (AB and BA share their eigenvalues): a symmetric positive semi-definite matrix, so `eigh` gives
    real eigenvalues and real square roots. Eigenvalues below the numerical-rank cutoff D·ε·λmax (numpy's
    `matrix_rank` rule) are rounding noise of a (near-)singular matrix and count as 0: their square roots, ~1e-8
    each, would otherwise add up over the ~2000 null directions of a covariance from fewer images than dimensions.
    A general matrix square root of the non-symmetric Σ1Σ2 (`scipy.linalg.sqrtm` in ADM's evaluator; complex
    eigenvalues of Σ1Σ2 in torch-fidelity) can return complex values or fail on such rank-deficient 2048- or
    2023-dimensional covariances; this form stays real and finite for any symmetric PSD input and equals the
    textbook value on well-conditioned ones.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(_above_rank_cutoff(w))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(_above_rank_cutoff(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _above_rank_cutoff(eigenvalues: np.ndarray) -> np.ndarray:
    """Symmetric eigenvalues with those below D·ε·max|λ| (negative ones included) set to 0."""
    cutoff = len(eigenvalues) * np.finfo(np.float64).eps * np.abs(eigenvalues).max(initial=0.0)
    return np.where(eigenvalues > cutoff, eigenvalues, 0.0)


def fid_distance(a: dict, b: dict, reference_name: str = "the reference", what: str = "FID") -> float:
    """The Fréchet distance between sample statistics `a` and reference statistics `b` ({mu, sigma})."""
    check_feature_size(a["mu"].shape[0], b["mu"].shape[0], what, reference_name)
    return frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
