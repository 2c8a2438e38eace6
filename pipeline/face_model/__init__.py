"""Morphable face models: the .npz format, converters (SFM, BFM09), the MediaPipe 468-point correspondence
(mediapipe_mesh) and the coefficient decoder."""
from .format import (N_MESH468, FaceModel, FaceModelError, load_face_model, no_mesh468, save_face_model,
                     validate_face_model)

_DECODE = ("Camera", "CoeffLayout", "Coeffs", "Decoded", "FaceDecoder", "MM_TO_WORLD", "euler_to_rotation",
           "project", "sh_shading", "vertex_normals")

__all__ = sorted([*_DECODE, "N_MESH468", "FaceModel", "FaceModelError", "load_face_model", "no_mesh468",
                  "save_face_model", "validate_face_model"])


def __getattr__(name: str):
    # The decoder (torch) is imported on first use: the format, the converters and the canonical mesh's reader
    # load without torch, so the mesh-mask workers, which only read MediaPipe's triangulation, never import it
    # (~2-5 s per worker process on 2 cores: the masks stage and preprocess_vs_landmark_bound paid it).
    if name in _DECODE:
        from . import decode
        return getattr(decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
