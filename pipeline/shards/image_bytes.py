"""Image <-> bytes for the table columns: crops as JPEG, masks as PNG (OpenCV codecs, RGB channel order)."""
from __future__ import annotations

import cv2
import numpy as np


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes at `quality` (1..100)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def encode_png(grey: np.ndarray) -> bytes:
    """(H, W) uint8 -> lossless PNG bytes."""
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"grey: expected (H, W) uint8, got {grey.shape} {grey.dtype}")
    ok, data = cv2.imencode(".png", grey)
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG/PNG) -> (H, W, 3) uint8 RGB. Raises ValueError if undecodable."""
    # decoded straight to RGB: no cvtColor, whose thread pool keeps spinning after each call and slowed a
    # concurrent R-Net forward pass by ~7 %
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if rgb is None:
        raise ValueError("undecodable image bytes")
    return rgb


def decode_grey(data: bytes) -> np.ndarray:
    """Encoded greyscale image bytes (PNG) -> (H, W) uint8. Raises ValueError if undecodable."""
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError("undecodable image bytes")
    return grey
