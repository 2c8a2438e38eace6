"""R-Net: a torchvision ResNet regressing the flat coefficient vector (docs/conventions.md) from an aligned crop.

As in Deep3DFaceRecon_pytorch, the crop goes in as RGB in [0, 1] without ImageNet normalisation, and the
regression layer starts at zero so that an untrained network predicts the mean face, frontal, under the
default light.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import load_strictly, read_state_dict

# torchvision's plain ResNets: residual block and blocks per stage
RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class RNet(ResNet):
    """torchvision ResNet whose `fc` outputs the coefficients; parameter names are torchvision's.

    forward(img): img (B, 3, H, W) float RGB in [0, 1], not normalised; 224 x 224 aligned crops as trained
    (other sizes run, through the adaptive pooling) -> (B, n_coeffs) float coefficients, laid out as the
    caller's CoeffLayout.
    """

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"img: expected (B, 3, H, W), got {tuple(img.shape)}")
        return super().forward(img)


def build_rnet(arch: str, n_coeffs: int, init_weights: str | Path | None = None) -> RNet:
    """A fresh R-Net whose output is all-zero coefficients for any input.

    arch: one of RESNETS; n_coeffs: coefficients per image (CoeffLayout.size, e.g. 257 for BFM);
    init_weights: optional torchvision ImageNet state dict of the same arch (e.g. resnet50-0676ba61.pth) for
    the backbone: every key but `fc.*` must be present with the network's shape (the file's `fc` is
    ignored), else ValueError naming the keys. Without it the backbone keeps torchvision's random init.
    """
    if arch not in RESNETS:
        raise ValueError(f"arch: expected one of {sorted(RESNETS)}, got {arch!r}")
    if n_coeffs < 1:
        raise ValueError(f"n_coeffs: expected >= 1, got {n_coeffs}")
    block, layers = RESNETS[arch]
    net = RNet(block, layers, num_classes=n_coeffs)
    if init_weights is not None:
        _load_backbone(net, Path(init_weights), arch)
    nn.init.zeros_(net.fc.weight)
    nn.init.zeros_(net.fc.bias)
    return net


def _load_backbone(net: RNet, path: Path, arch: str) -> None:
    backbone = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    # the regression layer is not in an ImageNet file: complete the state with the network's own
    load_strictly(net, {**backbone, "fc.weight": net.fc.weight.detach(), "fc.bias": net.fc.bias.detach()},
                  f"{path} (as the {arch} backbone)")
