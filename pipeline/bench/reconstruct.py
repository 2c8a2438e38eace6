"""Reconstruction throughput: the network method against its bound (R-Net forward alone), and fitting time."""
from __future__ import annotations

import time

import pandas as pd
import torch

from ..face_model import FaceDecoder
from ..losses import landmark_weights
from ..reconstruct.batch import reconstruct_batch
from ..reconstruct.fit import FitSettings
from ..reconstruct.outputs import face_rows, faces_to_batch


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, thread pools, lazy inits
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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
        "reconstruct_network_img_s": b / _median_seconds(network_path, repeats),
        "rnet_forward_bound_img_s": b / _median_seconds(forward_only, repeats),
        "fit_s_per_image": _median_seconds(fit_path, 1) / b,
    }
