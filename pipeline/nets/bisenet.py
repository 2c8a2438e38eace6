"""Face parsing BiSeNet of zllrunning/face-parsing.PyTorch (model.py + resnet.py): ResNet-18 context path with
attention refinement, feature fusion and three output heads over the 19 CelebAMask-HQ classes.

Module and parameter names follow the reference exactly (`cp.resnet.*`, `cp.arm16`, `cp.arm32`,
`cp.conv_head32`, `cp.conv_head16`, `cp.conv_avg`, `ffm`, `conv_out`, `conv_out16`, `conv_out32`), so its public
`79999_iter.pth` loads strictly. Unlike the reference, constructing the network downloads nothing: all weights
come from the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from . import load_strictly, read_state_dict

# label order of the reference's CelebAMask-HQ preprocessing (prepropess_data.py): index = class id
CLASS_NAMES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
               "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BN -> ReLU."""

    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BiSeNetOutput(nn.Module):
    """Segmentation head: 3 x 3 ConvBNReLU then a 1 x 1 conv to class logits."""

    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan, ks=3, stride=1, padding=1)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class AttentionRefinementModule(nn.Module):
    """ConvBNReLU features reweighted per channel by a sigmoid of their global average."""

    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan, ks=3, stride=1, padding=1)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ResNet18Features(nn.Module):
    """The reference resnet.py's Resnet18: torchvision's ResNet-18 trunk (same blocks and parameter names, no
    pooling or fc) returning the stride-8, -16 and -32 features."""

    def __init__(self):
        super().__init__()
        trunk = torchvision.models.resnet18(weights=None)
        self.conv1, self.bn1, self.maxpool = trunk.conv1, trunk.bn1, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class ContextPath(nn.Module):
    """ResNet-18 features refined top-down: global context + ARM at stride 32, upsampled into stride 16, then 8."""

    def __init__(self):
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_head16 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        feat32_sum = self.arm32(feat32) + F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    """Fuses spatial (ResNet stride-8) and context features: ConvBNReLU on the concatenation, plus a
    squeeze-excitation reweighting added back (feat * atten + feat)."""

    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, stride=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class BiSeNet(nn.Module):
    """Face parsing network.

    forward(x): x (B, 3, H, W) float RGB, ImageNet-normalised ((x - IMAGENET_MEAN) / IMAGENET_STD per channel;
    the reference was trained at 512 x 512). Returns logits (B, n_classes, H, W) float in eval mode; in train
    mode the main and the two auxiliary logits (stride-8 and stride-16 context heads) as a tuple, as the
    reference trains them. Logits are upsampled bilinearly with align_corners=True, as in the reference.
    """

    def __init__(self, n_classes: int = len(CLASS_NAMES)):
        super().__init__()
        self.cp = ContextPath()
        # the reference replaces the spatial path by the ResNet stride-8 features: no `sp` module
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected (B, 3, H, W), got {tuple(x.shape)}")
        size = x.shape[2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        logits = self._upsample(self.conv_out(self.ffm(feat_res8, feat_cp8)), size)
        if not self.training:
            return logits
        return (logits, self._upsample(self.conv_out16(feat_cp8), size),
                self._upsample(self.conv_out32(feat_cp16), size))

    @staticmethod
    def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size, mode="bilinear", align_corners=True)


def load_bisenet(path: str | Path, device: torch.device | str = "cpu") -> BiSeNet:
    """The 19-class face parser from `79999_iter.pth` (zllrunning/face-parsing.PyTorch), strictly loaded.

    Returns the network on `device` in eval mode with requires_grad False. Raises FileNotFoundError for a
    missing file, ValueError for a file that is not a checkpoint or whose keys/shapes differ (each missing,
    unexpected or mis-shaped key named).
    """
    net = BiSeNet()
    load_strictly(net, read_state_dict(path), str(path))
    net.requires_grad_(False)
    return net.to(device).eval()
