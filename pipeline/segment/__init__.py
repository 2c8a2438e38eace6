"""Face-region masks of aligned crops: BiSeNet face parsing (face_parsing.py, needs torch and the weights) or
the landmark-guided skin colour model (skin_model.py), and the masks stage."""
from .masks import DEFAULT_FACE_CLASSES, MaskSettings, face_mask, load_mask_model, run_masks
from .skin_model import face_outline_px, face_regions, skin_mask, skin_posterior

__all__ = ["DEFAULT_FACE_CLASSES", "MaskSettings", "face_mask", "face_outline_px", "face_regions", "load_mask_model",
           "run_masks", "skin_mask", "skin_posterior"]
