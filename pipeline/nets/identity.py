"""The face-recognition features of the identity-perceptual loss: a frozen recogniser (dlib's ResNet, or
ArcFace IR-SE50 with the user's weights) behind a differentiable 5-point similarity warp to its input chip.

As in Deep3DFaceRecon_pytorch, the photo and the render are warped by one similarity per face, estimated from
the render's predicted landmarks (eye centres, nose tip, mouth corners) onto the recogniser's template, so that
both images are cut out identically; the similarity itself is detached (the landmark term places the face,
the identity term only compares what is inside the chip).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

IDENTITY_NETS = ("dlib", "arcface", "none")

# a feature function: images (B, 3, S, S) in [0, 1] and their five points (B, 5, 2) px -> (B, D) embeddings
IdentityFeatures = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def five_points_torch(lmk68_px: torch.Tensor) -> torch.Tensor:
    """(B, 68, 2) iBUG landmarks -> (B, 5, 2) alignment points, same dtype: eye centres (mean of each eye's 6
    points), nose tip (30), mouth corners (48, 54), as detect.alignment.five_points (tests hold them equal;
    nets does not import detect, whose package loads dlib and the detectors)."""
    if lmk68_px.ndim != 3 or lmk68_px.shape[1:] != (68, 2):
        raise ValueError(f"lmk68_px: expected (B, 68, 2), got {tuple(lmk68_px.shape)}")
    return torch.stack([lmk68_px[:, 36:42].mean(1), lmk68_px[:, 42:48].mean(1), lmk68_px[:, 30],
                        lmk68_px[:, 48], lmk68_px[:, 54]], dim=1)


def similarity_to_template(points_px: torch.Tensor, template_px: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (no reflection) per face mapping points onto the template.

    points_px: (B, N, 2) px; template_px: (N, 2) px. Returns M (B, 2, 3) with template ~ M @ [x, y, 1], the
    closed form of detect.alignment.fit_similarity (centred points: a + ib = sum conj(p) q / sum |p|^2).
    """
    mu_p, mu_q = points_px.mean(1, keepdim=True), template_px.mean(0)
    p, q = points_px - mu_p, template_px - mu_q
    norm = (p ** 2).sum((1, 2))
    a = (p * q).sum((1, 2)) / norm
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)  # (B, 2, 2)
    shift = mu_q - torch.einsum("bij,bj->bi", rot, mu_p[:, 0])
    return torch.cat([rot, shift[..., None]], dim=2)


def _pixels_to_unit(width: int, height: int, like: torch.Tensor) -> torch.Tensor:
    # grid_sample with align_corners=False puts pixel centre j at (2 j + 1) / size - 1
    return like.new_tensor([[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0],
                            [0.0, 0.0, 1.0]])


def warp_to_template(img: torch.Tensor, points_px: torch.Tensor, template_px: np.ndarray | torch.Tensor,
                     size: int) -> torch.Tensor:
    """Cut out each image's chip: the similarity taking its points onto the template, bilinear, zero outside.

    img: (B, C, H, W) float, pixel centres at integer px (x = column, y = row); points_px: (B, N, 2) px in img;
    template_px: (N, 2) px in the size x size chip. Returns (B, C, size, size), differentiable in img (the similarity is
    computed from detached points).
    """
    if img.ndim != 4 or not img.is_floating_point():
        raise ValueError(f"img: expected a float (B, C, H, W) tensor, got {img.dtype} {tuple(img.shape)}")
    if points_px.ndim != 3 or points_px.shape[0] != img.shape[0] or points_px.shape[2] != 2:
        raise ValueError(f"points_px: expected ({img.shape[0]}, N, 2), got {tuple(points_px.shape)}")
    template = torch.as_tensor(template_px, dtype=img.dtype, device=img.device)
    m = similarity_to_template(points_px.detach().to(img.dtype), template)
    bottom = m.new_tensor([0.0, 0.0, 1.0]).expand(m.shape[0], 1, 3)
    chip_to_img = torch.linalg.inv(torch.cat([m, bottom], 1))
    to_unit = _pixels_to_unit(img.shape[-1], img.shape[-2], img)
    theta = (to_unit @ chip_to_img @ torch.linalg.inv(_pixels_to_unit(size, size, img)))[:, :2]
    grid = F.affine_grid(theta, [img.shape[0], img.shape[1], size, size], align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=4)
def load_identity_features(net: str, weights: str, device: str) -> IdentityFeatures | None:
    """The feature function of `net` (IDENTITY_NETS), loaded once per process and device.

    dlib: its ResNet from `weights` (a dlib_face_recognition_resnet_model_v1.dat; "" = face_recognition_models'
    copy), 128-d descriptors of 150 px chips; arcface: IR-SE50 from `weights` (required), 512-d unit
    embeddings of 112 px chips; none: None (the identity term is off). Raises ValueError for an unknown net or
    arcface without weights, FileNotFoundError / ValueError for a missing or wrong weights file.
    """
    check_identity_net(net, weights)
    if net == "none":
        return None
    if net == "dlib":
        from .dlib_resnet import CHIP_SIZE, DLIB_TEMPLATE_PX, load_dlib_resnet

        model, template, size = load_dlib_resnet(weights or None, device), DLIB_TEMPLATE_PX, CHIP_SIZE
    else:
        from .arcface import ARCFACE_SIZE, ARCFACE_TEMPLATE_PX, load_arcface

        model, template, size = load_arcface(weights, device), ARCFACE_TEMPLATE_PX, ARCFACE_SIZE
    return lambda img, points_px: model(warp_to_template(img, points_px, template, size))


def check_identity_net(net: str, weights: str) -> None:
    """Raise ValueError unless `net` is one of IDENTITY_NETS with usable `weights` (a path or ""; arcface
    needs one; a given path must exist), before any work."""
    if net not in IDENTITY_NETS:
        raise ValueError(f"identity_net must be one of {IDENTITY_NETS}, got {net!r}")
    if not isinstance(weights, str):
        raise ValueError(f"identity_weights must be a path or \"\", got {weights!r}")
    if net == "arcface" and not weights:
        raise ValueError("identity_net arcface needs identity_weights (model_ir_se50.pth)")
    if weights and net != "none" and not Path(weights).is_file():
        raise ValueError(f"identity_weights: no such file: {weights}")
