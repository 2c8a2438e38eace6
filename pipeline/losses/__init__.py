"""The terms of Deng et al.'s hybrid-level weak supervision as pure functions of tensors (after
Deep3DFaceRecon_pytorch models/losses.py); `hybrid` composes them. Each returns a scalar and stays finite
on empty batches, empty coefficient groups and empty masks."""
from .identity import identity_distance, identity_loss
from .landmarks import landmark_loss, landmark_weights
from .photometric import photometric_loss
from .regularizers import coefficient_regularizer, lighting_regularizer, reflectance_loss

__all__ = ["coefficient_regularizer", "identity_distance", "identity_loss", "landmark_loss", "landmark_weights", "lighting_regularizer",
           "photometric_loss", "reflectance_loss"]
