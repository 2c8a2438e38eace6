"""ArcFace IR-SE50 (TreB1eN/InsightFace_Pytorch `Backbone(50, 0.6, 'ir_se')`), the frozen face recogniser of
the identity loss, and the fixed warp from our 224 crop to its 112 x 112 input.

Module and parameter names follow the reference model.py exactly, so its public `model_ir_se50.pth` loads
strictly: `input_layer`, `body.<i>.shortcut_layer`, `body.<i>.res_layer` (with the SE block at index 5),
`output_layer`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import load_strictly, read_state_dict
from .identity import warp_to_template

ARCFACE_SIZE = 112
CROP_SIZE = 224
EMBEDDING_SIZE = 512

# five points (eye centres, nose tip, mouth corners; image left first) in pixels, x = column, y = row
DENG_TEMPLATE_PX = np.array([[80.23, 82.38], [143.60, 82.45], [112.33, 116.71], [86.28, 150.90],
                             [137.34, 150.89]])  # docs/conventions.md, 224 crop
ARCFACE_TEMPLATE_PX = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                                [70.7299, 92.2041]])  # insightface, 112 crop

# IR-SE50: (input channels, output channels, units) of the four stages; each stage's first unit has stride 2
_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
_SE_REDUCTION = 16
_DROP_RATIO = 0.6


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src onto dst.

    src, dst: (N, 2) float points in pixels, N >= 2. Returns M (2, 3) float64 with dst ~ src @ M[:, :2].T + M[:, 2].
    """
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"src, dst: expected two (N, 2) arrays with N >= 2, got {src.shape} and {dst.shape}")
    x, y = src[:, 0], src[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    # unknowns (a, b, tx, ty) of [[a, -b, tx], [b, a, ty]]: u = a x - b y + tx, v = b x + a y + ty
    rows = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    a, b, tx, ty = np.linalg.lstsq(rows, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


CROP_TO_ARCFACE = fit_similarity(DENG_TEMPLATE_PX, ARCFACE_TEMPLATE_PX)  # (2, 3): 224-crop px -> 112-crop px


def crop_to_arcface(img: torch.Tensor) -> torch.Tensor:
    """Warp our aligned crops to ArcFace's 5-point template with one fixed similarity (CROP_TO_ARCFACE), the
    case of identity.warp_to_template whose five points are the crop template's (DENG_TEMPLATE_PX).

    img: (B, C, 224, 224) float, any range. Returns (B, C, 112, 112) of the same dtype and device, bilinear,
    zero outside the crop; differentiable with respect to img.
    """
    if img.ndim != 4 or img.shape[-2:] != (CROP_SIZE, CROP_SIZE) or not img.is_floating_point():
        raise ValueError(f"img: expected a float (B, C, {CROP_SIZE}, {CROP_SIZE}) tensor, "
                         f"got {img.dtype} {tuple(img.shape)}")
    points = torch.as_tensor(DENG_TEMPLATE_PX, dtype=img.dtype, device=img.device).expand(img.shape[0], 5, 2)
    return warp_to_template(img, points, ARCFACE_TEMPLATE_PX, ARCFACE_SIZE)


class SqueezeExcitation(nn.Module):
    """Channel attention of the reference SEModule: x * sigmoid(fc2(relu(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(scale)


class BottleneckIRSE(nn.Module):
    """The reference bottleneck_IR_SE unit: pre-activation residual branch with an SE block, and a shortcut
    that is a strided 1 x 1 max-pool (same width; no parameters) or a strided 1 x 1 conv + BN."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SqueezeExcitation(depth, _SE_REDUCTION))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class ArcFaceIRSE50(nn.Module):
    """ArcFace IR-SE50 embedding network.

    forward(img): img (B, 3, 112, 112) float RGB in [0, 1], aligned to the ArcFace template (crop_to_arcface)
    -> (B, 512) unit-length embeddings. The input is normalised to [-1, 1] as in the reference's training.
    """

    def __init__(self):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        final = ARCFACE_SIZE // 16  # four stride-2 stages
        # declared before `body`, as in the reference, so that the state dicts list keys in the same order
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(_DROP_RATIO), nn.Flatten(),
            nn.Linear(512 * final * final, EMBEDDING_SIZE), nn.BatchNorm1d(EMBEDDING_SIZE))
        self.body = nn.Sequential(*[
            BottleneckIRSE(in_channels if unit == 0 else depth, depth, 2 if unit == 0 else 1)
            for in_channels, depth, units in _STAGES for unit in range(units)])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4 or img.shape[1:] != (3, ARCFACE_SIZE, ARCFACE_SIZE):
            raise ValueError(f"img: expected (B, 3, {ARCFACE_SIZE}, {ARCFACE_SIZE}), got {tuple(img.shape)}")
        x = self.output_layer(self.body(self.input_layer((img - 0.5) / 0.5)))
        return F.normalize(x, p=2, dim=1)


def load_arcface(path: str | Path, device: torch.device | str = "cpu") -> ArcFaceIRSE50:
    """The frozen recogniser from `model_ir_se50.pth` (TreB1eN/InsightFace_Pytorch), strictly loaded.

    Returns the network on `device` in eval mode with requires_grad False on every parameter (gradients still
    flow to its input). Raises FileNotFoundError for a missing file, ValueError for a file that is not a
    checkpoint or whose keys/shapes differ (each missing, unexpected or mis-shaped key named).
    """
    net = ArcFaceIRSE50()
    load_strictly(net, read_state_dict(path), str(path))
    net.requires_grad_(False)
    return net.to(device).eval()
