"""Reconstruction throughput: the network method against its bound (R-Net forward alone), and fitting time."""
from __future__ import annotations

import pandas as pd
import torch

from ..face_model import FaceDecoder
from ..reconstruct.batch import reconstruct_batch
from ..reconstruct.fit import FitSettings
from ..reconstruct.outputs import faces_to_batch
from ..reconstruct.stream import reconstruct_faces
from .timing import interleaved_median_seconds, median_seconds


def reconstruct_throughput(decoder: FaceDecoder, network: torch.nn.Module, faces: pd.DataFrame, batch_size: int,
                           fit: FitSettings, repeats: int) -> dict[str, float]:
    """faces: a table of N faces (crop/mask/landmarks bytes as in the shards), N a multiple of batch_size.
    Returns reconstruct_network_img_s (reconstruct_faces with method 'network' over the N faces: decode + R-Net
    + one scoring render for the loss terms and PSNR + table rows, no files), rnet_forward_bound_img_s (R-Net
    forward alone on the same decoded batches) and fit_s_per_image (method 'fit' at `fit` settings on the first
    batch, whole batch / batch_size)."""
    device = decoder.triangles.device
    n = len(faces)
    if n == 0 or n % batch_size:
        raise ValueError(f"faces: expected a positive multiple of batch_size={batch_size} rows, got {n}")
    batches = [faces_to_batch(faces.iloc[lo:lo + batch_size], device) for lo in range(0, n, batch_size)]

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def network_path():
        reconstruct_faces(decoder, faces, "network", fit, network, batch_size=batch_size)
        synchronize()

    def forward_only():
        with torch.no_grad():
            for batch in batches:
                network(batch.photo)
        synchronize()

    def fit_path():
        reconstruct_batch(decoder, batches[0], "fit", fit)
        synchronize()

    seconds = interleaved_median_seconds({"network": network_path, "forward": forward_only}, repeats, warmup=1)
    return {
        "reconstruct_network_img_s": n / seconds["network"],
        "rnet_forward_bound_img_s": n / seconds["forward"],
        "fit_s_per_image": median_seconds(fit_path, 1, warmup=0) / len(batches[0].photo),  # a fit is tens of s
    }
