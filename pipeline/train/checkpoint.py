"""Checkpoints: the final network (`models/rnet.pt`, what reconstruction loads) and the resumable training
state (written atomically every few steps). Everything is tensors and plain types, so both load with
torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..face_model import CoeffLayout, FaceModel, load_face_model
from ..nets import build_rnet


def face_model_digest(model: FaceModel) -> str:
    """sha256 over the face model's arrays and strings (independent of the .npz container's timestamps)."""
    h = hashlib.sha256()
    for f in fields(model):
        value = getattr(model, f.name)
        h.update(f.name.encode())
        h.update(value.encode() if isinstance(value, str) else np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain types."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def rnet_record(net: nn.Module, arch: str, layout: CoeffLayout, face_model: FaceModel, face_model_file: str,
                image_size: int, config: dict) -> dict:
    """What `models/rnet.pt` holds: weights plus all that is needed to rebuild the network and decode its
    output (coefficient layout, the face model's identity and file), and the training config."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "arch": arch, "n_coeffs": layout.size,
        "layout": {"k_id": layout.k_id, "k_exp": layout.k_exp, "k_alb": layout.k_alb},
        "face_model": {"name": face_model.name, "version": face_model.version,
                       "sha256": face_model_digest(face_model), "file": face_model_file},
        "image_size": image_size, "config": config,
    }


def load_rnet_record(path: str | Path) -> dict:
    """What models/rnet.pt says about its network, without the weights: arch, n_coeffs, layout {k_id, k_exp,
    k_alb}, face_model {name, version, sha256 (face_model_digest), file (next to rnet.pt)}, image_size, config."""
    record = load_checkpoint(path)
    record.pop("state_dict")
    return record


def load_rnet(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """models/rnet.pt -> the network in eval mode on `device`: (B, 3, 224, 224) crops in [0, 1] ->
    (B, n_coeffs) coefficients for the face model named in its record (load_rnet_record)."""
    record = load_checkpoint(path, "cpu")
    net = build_rnet(record["arch"], record["n_coeffs"], None)
    net.load_state_dict(record["state_dict"])
    return net.to(device).eval()


def decoding_face_model(checkpoint: str | Path, candidate: str | Path) -> tuple[Path, FaceModel]:
    """(path, model) of the face model that decodes the network's coefficients: the `candidate` file when it is
    the one the record names (same face_model_digest), else the copy training saved next to the checkpoint (with
    `train.trainable` the arrays change during training). ValueError, naming both, when neither is that model."""
    named = load_rnet_record(checkpoint)["face_model"]
    for path in (Path(candidate), Path(checkpoint).parent / named["file"]):
        if path.exists():
            model = load_face_model(path)
            if face_model_digest(model) == named["sha256"]:
                return path, model
    raise ValueError(f"{checkpoint} was trained with face model {named['name']!r} {named['version']!r} "
                     f"(sha256 {named['sha256'][:12]}...), which is neither {candidate} nor "
                     f"{Path(checkpoint).parent / named['file']}")
