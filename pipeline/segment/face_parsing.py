"""Face-region masks from a face-parsing network's output (BiSeNet, 19 CelebAMask-HQ classes).

The network itself is pipeline.nets.bisenet (its CLASS_NAMES give the class order); this module turns logits or
label maps into soft masks of the chosen classes and runs the network on aligned crops.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# names accepted in `masks.face_classes` besides the raw class names: left/right pairs
CLASS_GROUPS = {"brows": ("l_brow", "r_brow"), "eyes": ("l_eye", "r_eye"), "ears": ("l_ear", "r_ear"),
                "lips": ("u_lip", "l_lip")}
PARSING_SIZE_PX = 512  # the resolution face-parsing.PyTorch was trained and is evaluated at


def parsing_class_ids(face_classes: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Class ids of the requested classes. face_classes: names from `class_names` or CLASS_GROUPS keys
    (e.g. ["skin", "nose", "brows"]); class_names: the network's classes in id order. Returns sorted unique ids.
    Raises ValueError naming unknown classes and the valid names."""
    ids, unknown = set(), []
    for name in face_classes:
        for member in CLASS_GROUPS.get(name, (name,)):
            if member in class_names:
                ids.add(list(class_names).index(member))
            else:
                unknown.append(name)
    if unknown:
        raise ValueError(f"unknown face classes {sorted(set(unknown))}; valid: {list(class_names)} and groups "
                         f"{sorted(CLASS_GROUPS)}")
    if not ids:
        raise ValueError("face_classes is empty: name at least one class")
    return sorted(ids)


def mask_from_labels(labels: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """Hard mask of a label map. labels: (H, W) integer class ids. Returns (H, W) float32, 1 where the label is
    one of class_ids, else 0."""
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected (H, W) integer class ids, got {labels.shape} {labels.dtype}")
    return np.isin(labels, list(class_ids)).astype(np.float32)


def soft_mask_from_logits(logits: torch.Tensor, class_ids: Sequence[int], size_px: int) -> torch.Tensor:
    """Soft mask: the softmax probability mass of class_ids, resized to size_px.

    logits: (B, C, H, W) float. Returns (B, 1, size_px, size_px) float in [0, 1] on logits' device (area
    averaging when shrinking, bilinear when enlarging)."""
    if logits.ndim != 4:
        raise ValueError(f"logits: expected (B, C, H, W), got {tuple(logits.shape)}")
    if max(class_ids) >= logits.shape[1]:
        raise ValueError(f"class ids {list(class_ids)} out of range for {logits.shape[1]} classes")
    probability = logits.float().softmax(dim=1)[:, list(class_ids)].sum(dim=1, keepdim=True)
    mode = "area" if logits.shape[-1] > size_px else "bilinear"
    return F.interpolate(probability, size=(size_px, size_px), mode=mode).clamp(0.0, 1.0)


def parse_face_masks(net: torch.nn.Module, crops_rgb: np.ndarray, class_ids: Sequence[int],
                     mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Soft masks of aligned crops by a face-parsing network.

    net: (B, 3, 512, 512) normalised RGB -> (B, C, 512, 512) logits, in eval mode (its device is used);
    crops_rgb: (B, S, S, 3) uint8 RGB; mean, std: per-channel normalisation of [0, 1] RGB (ImageNet's for
    BiSeNet). Returns (B, S, S) float32 in [0, 1].
    """
    if crops_rgb.ndim != 4 or crops_rgb.shape[3] != 3 or crops_rgb.shape[1] != crops_rgb.shape[2]:
        raise ValueError(f"crops_rgb: expected (B, S, S, 3), got {crops_rgb.shape}")
    device = next(net.parameters()).device
    x = torch.from_numpy(crops_rgb).to(device).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(PARSING_SIZE_PX, PARSING_SIZE_PX), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(mean, device=device).view(1, 3, 1, 1)) / torch.tensor(std, device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net(x)
    return soft_mask_from_logits(logits, class_ids, crops_rgb.shape[1])[:, 0].cpu().numpy()
