"""Safe photo decoding: every way a file can fail becomes a Rejected with a short reason.

Decoding goes through Pillow because it reads the size from the header without decoding (decompression
bombs are refused before any pixel is allocated), applies EXIF orientation and knows CMYK and 16-bit modes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..shards.accounting import Rejected

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_MAX_PIXELS = 40_000_000

# reject reasons (the `reason` column of the rejects tables)
EMPTY_FILE = "empty file"
UNREADABLE_FILE = "unreadable file"
NOT_AN_IMAGE = "not an image"
TOO_MANY_PIXELS = "too many pixels"
CORRUPT_IMAGE = "truncated or corrupt image"
UNSUPPORTED_MODE = "unsupported image mode"
IMAGE_TOO_SMALL = "image too small"


def list_photos(folder: str | Path) -> list[Path]:
    """Photo files under `folder`, recursively, sorted: extensions in PHOTO_EXTENSIONS, any case."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"photo folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS)


def _open_header(path: Path, max_pixels: int) -> Image.Image:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise Rejected(UNREADABLE_FILE, str(error)) from error
    if size == 0:
        raise Rejected(EMPTY_FILE, "0 bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours (max_pixels) is checked right below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise Rejected(TOO_MANY_PIXELS, str(error)) from error
    except UnidentifiedImageError as error:
        raise Rejected(NOT_AN_IMAGE, str(error)) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise Rejected(CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise Rejected(TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels} pixels")
    return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the high byte (Pillow's convert("RGB") would clip everything above 255 to white)
        grey = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels would otherwise show whatever colour they happen to store: put them on white
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if image.mode in ("RGB", "L", "P", "CMYK", "YCbCr", "1"):
        return np.asarray(image.convert("RGB"))
    raise Rejected(UNSUPPORTED_MODE, f"Pillow mode {image.mode}")


def read_photo(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_side_px: int = 1) -> np.ndarray:
    """Decode a photo file as it should be seen: EXIF orientation applied, any mode converted to RGB.

    path: image file (JPEG, PNG, BMP, WebP; greyscale, RGBA, palette, CMYK, 16-bit PNG).
    max_pixels: refuse images with more pixels than this, from the header, before decoding.
    min_side_px: refuse images whose shorter side is below this (no face of interest can fit).
    Returns (H, W, 3) uint8 RGB, C-contiguous. Raises Rejected (a ValueError) whose str() is the reason:
    empty file, unreadable file, not an image, too many pixels, truncated or corrupt image, unsupported image
    mode, image too small.
    """
    path = Path(path)
    with _open_header(path, max_pixels) as image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            rgb = _to_rgb(upright)
        except Rejected:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise Rejected(CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from error
    height, width = rgb.shape[:2]
    if min(height, width) < min_side_px:
        raise Rejected(IMAGE_TOO_SMALL, f"{width}x{height}, shorter side < {min_side_px} px")
    return np.ascontiguousarray(rgb)

