"""Networks: R-Net (coefficient regressor), dlib's face-recognition ResNet and ArcFace IR-SE50 (identity
features), BiSeNet (face parsing), with strict loading of the public checkpoints they are published with.

Every loader checks a file's keys and shapes against the network before loading it and names what differs,
so a wrong or truncated download fails with a readable ValueError instead of a silent partial load.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_LISTED = 10  # keys named per kind of mismatch; the count of the rest follows


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint that holds a flat state dict.

    path: a file written by torch.save(module.state_dict()). Returns {key: tensor} on the CPU.
    Raises FileNotFoundError for a missing file and ValueError for anything that is not a flat
    {str: Tensor} mapping loadable with torch.load(weights_only=True).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises unpickling, zip and runtime errors alike for a foreign file
        raise ValueError(f"{path} is not a PyTorch checkpoint: {type(error).__name__}: {error}") from error
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict ({{name: tensor}}), got {type(state).__name__}")
    return dict(state)


def _is_optional(key: str) -> bool:
    # checkpoints saved before PyTorch 0.4.1 have no BatchNorm step counter; it is not used in eval mode
    return key.endswith("num_batches_tracked")


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def state_dict_mismatches(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `found` from loading strictly in place of `expected`, one line per kind of mismatch
    (missing keys, unexpected keys, wrong shapes); empty when it loads. BatchNorm `num_batches_tracked`
    counters may be absent from `found`."""
    missing = [k for k in expected if k not in found and not _is_optional(k)]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} [file {tuple(found[k].shape)} vs network {tuple(expected[k].shape)}]"
              for k in expected if k in found and found[k].shape != expected[k].shape]
    return [_listing(title, items) for title, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if items]


def load_strictly(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module` after checking that its keys and shapes are exactly the module's.

    module: the network to fill (in place); state: {key: tensor}; source: what the state came from, for the
    message. Raises ValueError counting the missing, unexpected and mis-shaped keys and naming them (the
    first ten of each kind). BatchNorm `num_batches_tracked` counters absent from `state` keep their value.
    """
    expected = module.state_dict()
    problems = state_dict_mismatches(expected, state)
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict({**{k: v for k, v in expected.items() if _is_optional(k)}, **state})


# the networks use the checkpoint checks above, so they are imported after them
from .arcface import ArcFaceIRSE50, crop_to_arcface, load_arcface  # noqa: E402
from .bisenet import BiSeNet, load_bisenet  # noqa: E402
from .dlib_resnet import DlibFaceResNet, DlibFormatError, load_dlib_resnet  # noqa: E402
from .rnet import build_rnet  # noqa: E402

__all__ = ["ArcFaceIRSE50", "BiSeNet", "DlibFaceResNet", "DlibFormatError", "build_rnet", "crop_to_arcface",
           "load_arcface", "load_bisenet", "load_dlib_resnet", "load_strictly", "read_state_dict",
           "state_dict_mismatches"]
