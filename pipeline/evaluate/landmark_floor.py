"""How close the face model's own landmarks can get to annotated ones: an estimate of the floor under any fit's
landmark NME.

A reconstruction's landmarks are the projections of fixed model points (sliding along the jaw contour), so
their NME cannot go below what the model reaches when fitted to the ground truth itself. The fit here is a local
optimum from the frontal mean face, so its NME estimates that floor from above. Comparing it with the detector's
NME says whether beating the detector is possible with this face model at all.
"""
from __future__ import annotations

import numpy as np
import torch

from ..face_model import FaceDecoder
from ..reconstruct.export import crop_to_photo_px
from ..reconstruct.fit import fit_to_landmarks

N_LANDMARKS = 68


def model_landmark_floor(decoder: FaceDecoder, gt_px: np.ndarray, transform: np.ndarray, steps: int = 2000,
                         lr: float = 5.0e-2) -> np.ndarray:
    """The model's landmarks fitted to ground truth: pose, identity and expression by Adam against the
    landmarks alone, equal point weights, no coefficient prior (the model's reach, not a plausible face).

    gt_px: (N, 68, 2) ground-truth landmarks, photo px; transform: (N, 6) or (N, 2, 3) photo -> crop px of each
    face's crop (the reconstruction rows' `transform`). Returns (N, 68, 2) float64 photo px.
    """
    gt_px = np.asarray(gt_px, np.float64)
    transform = np.asarray(transform, np.float64).reshape(-1, 2, 3)
    if gt_px.ndim != 3 or gt_px.shape[1:] != (N_LANDMARKS, 2) or len(transform) != len(gt_px):
        raise ValueError(f"gt_px: expected (N, 68, 2) with N transforms, got {gt_px.shape} and {len(transform)}")
    if len(gt_px) == 0:
        return gt_px.copy()
    device = decoder.triangles.device
    # detect.alignment.transform_points, inline: importing pipeline.detect would load dlib into evaluation
    gt_crop = torch.tensor(gt_px @ transform[:, :, :2].transpose(0, 2, 1) + transform[:, None, :, 2],
                           dtype=torch.float32, device=device)
    coeffs = fit_to_landmarks(decoder, decoder.layout.zeros(len(gt_px), device), gt_crop,
                              torch.ones(N_LANDMARKS, device=device), steps, lr, landmark_weight=1.0,
                              coefficient_weight=0.0)
    with torch.no_grad():
        lmk_crop = decoder.landmark_px(decoder.layout.split(coeffs)).double().cpu().numpy()
    return np.stack([crop_to_photo_px(p, m) for p, m in zip(lmk_crop, transform)])
