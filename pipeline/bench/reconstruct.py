"""Reconstruction throughput: the network method against its bound (R-Net forward alone), and fitting time."""
from __future__ import annotations

import pandas as pd
import torch

from ..face_model import FaceDecoder
from ..losses import landmark_weights
from ..reconstruct.batch import reconstruct_batch
from ..reconstruct.fit import FitSettings
from ..reconstruct.outputs import face_rows, faces_to_batch
from .timing import median_seconds


def reconstruct_throughput(decoder: FaceDecoder, network: torch.nn.Module, faces: pd.DataFrame, fit: FitSettings,
                           repeats: int) -> dict[str, float]:
    """faces: a table of B faces (crop/mask/landmarks bytes as in the shards). Returns
    reconstruct_network_img_s (decode + R-Net + one render for the loss terms and PSNR + table rows), rnet_forward_bound_img_s (R-Net forward on
    the same decoded batch), fit_s_per_image (method 'fit' at `fit` settings, whole batch / B)."""
    device = decoder.triangles.device
    lmk_w = landmark_weights().to(device)
    b = len(faces)

    def network_path():
        batch = faces_to_batch(faces, device)
        coeffs = reconstruct_batch(decoder, batch, "network", fit, lmk_w, network)
        face_rows(decoder, coeffs, batch, faces, "network", lmk_w, fit.weights)

    batch = faces_to_batch(faces, device)

    def forward_only():
        with torch.no_grad():
            network(batch.photo)

    def fit_path():
        reconstruct_batch(decoder, batch, "fit", fit, lmk_w)

    return {
        "reconstruct_network_img_s": b / median_seconds(network_path, repeats, warmup=1),
        "rnet_forward_bound_img_s": b / median_seconds(forward_only, repeats, warmup=1),
        "fit_s_per_image": median_seconds(fit_path, 1, warmup=0) / b,  # one fit is tens of seconds
    }
