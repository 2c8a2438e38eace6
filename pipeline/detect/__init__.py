"""Per-photo preprocessing: safe decoding, dlib face detection and 68 landmarks, 5-point similarity alignment to
the 224 x 224 crop template, and the crop and landmarks stages (docs/conventions.md: spaces and units).

preprocess_photo(s), which also compute masks, are imported on first use: the mask model's scikit-learn import
would otherwise slow every process that only crops.
"""
from ..shards.accounting import Rejected
from .alignment import (CROP_SIZE_PX, TEMPLATE_5PT_PX, box_to_crop, fit_similarity, five_points, invert_transform,
                        transform_points, warp_to_crop)
from .crop import CropSettings, crop_photo, run_crop
from .dlib_faces import Detection, detect_faces, fit_landmarks
from .landmarks import LandmarkSettings, crop_landmarks, run_landmarks, template_error_px
from .photo_io import list_photos, read_photo

__all__ = ["CROP_SIZE_PX", "CropSettings", "Detection", "LandmarkSettings", "Rejected", "TEMPLATE_5PT_PX",
           "box_to_crop", "crop_landmarks", "crop_photo", "detect_faces", "fit_landmarks", "fit_similarity",
           "five_points", "invert_transform", "list_photos", "preprocess_photo", "preprocess_photos", "read_photo",
           "run_crop", "run_landmarks", "template_error_px", "transform_points", "warp_to_crop"]


def __getattr__(name: str):
    if name in ("preprocess_photo", "preprocess_photos"):
        from . import preprocess
        return getattr(preprocess, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
