"""Morphable face models: the .npz format, converters (SFM, BFM09), the MediaPipe 468-point correspondence
(mediapipe_mesh) and the coefficient decoder."""
from .decode import (Camera, CoeffLayout, Coeffs, Decoded, FaceDecoder, MM_TO_WORLD, euler_to_rotation,
                     project, sh_shading, vertex_normals)
from .format import (N_MESH468, FaceModel, FaceModelError, load_face_model, no_mesh468, save_face_model,
                     validate_face_model)

__all__ = ["Camera", "CoeffLayout", "Coeffs", "Decoded", "FaceDecoder", "FaceModel", "FaceModelError", "MM_TO_WORLD",
           "N_MESH468", "euler_to_rotation", "load_face_model", "no_mesh468", "project", "save_face_model",
           "sh_shading", "validate_face_model", "vertex_normals"]
