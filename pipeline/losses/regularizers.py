"""Priors on the coefficients and the albedo: plausible shapes, near-white light, flat skin reflectance."""
from __future__ import annotations

import torch

from .shapes import check_shape

N_SH_BANDS = 9


def coefficient_regularizer(id: torch.Tensor, exp: torch.Tensor, alb: torch.Tensor, w_id: float = 1.0,
                            w_exp: float = 0.8, w_alb: float = 1.7e-2) -> torch.Tensor:
    """Weighted squared norm of the morphable-model coefficients, per image.

    id: (B, K_id), exp: (B, K_exp), alb: (B, K_alb) float, any K including 0 (a model without that group).
    Returns the scalar (w_id |id|^2 + w_exp |exp|^2 + w_alb |alb|^2) summed over the batch / B, as
    Deep3DFaceRecon's reg_loss (defaults are its training options' weights); 0 for B = 0.
    """
    sizes: dict[str, int] = {}
    for name, x in (("id", id), ("exp", exp), ("alb", alb)):
        check_shape(name, x, ("B", f"K_{name}"), sizes)
    total = w_id * (id ** 2).sum() + w_exp * (exp ** 2).sum() + w_alb * (alb ** 2).sum()
    return total / max(sizes["B"], 1)


def lighting_regularizer(sh: torch.Tensor) -> torch.Tensor:
    """Variance of the SH lighting across colour channels, so that the light stays nearly monochrome.

    sh: (B, 27) float, channel-major (r0..r8, g0..g8, b0..b8) as CoeffLayout. Returns the scalar mean over
    images, channels and bands of (sh[b, c, k] - mean_c sh[b, c, k])^2 (Deep3DFaceRecon's gamma loss);
    0 for B = 0.
    """
    check_shape("sh", sh, ("B", 3 * N_SH_BANDS), {})
    gamma = sh.reshape(-1, 3, N_SH_BANDS)
    deviation = (gamma - gamma.mean(dim=1, keepdim=True)) ** 2
    return deviation.sum() / max(deviation.numel(), 1)


def reflectance_loss(albedo: torch.Tensor, skin_weight: torch.Tensor) -> torch.Tensor:
    """Spread of the albedo over the skin region around its skin-weighted mean colour.

    albedo: (B, V, 3) float per-vertex reflectance; skin_weight: (V,) float >= 0 (1 on skin, 0 elsewhere).
    Returns the scalar sum_b,v,c (w_v (albedo - mean_b))^2 / (B sum_v w_v) with mean_b the per-image
    w-weighted mean colour, as Deep3DFaceRecon's reflectance_loss; 0 when the weights or the batch are empty.
    """
    sizes: dict[str, int] = {}
    check_shape("albedo", albedo, ("B", "V", 3), sizes)
    check_shape("skin_weight", skin_weight, ("V",), sizes)
    w = skin_weight.reshape(1, -1, 1)
    total = skin_weight.sum()
    # where there is no skin the numerator is 0 too; any positive denominator gives the right 0
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    mean = (w * albedo).sum(dim=1, keepdim=True) / safe_total
    return (((albedo - mean) * w) ** 2).sum() / (max(sizes["B"], 1) * safe_total)
