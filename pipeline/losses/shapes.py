"""Shape checks at the losses' public boundary: each function states its inputs as dimension patterns."""
from __future__ import annotations

import torch


def check_shape(name: str, x: torch.Tensor, dims: tuple[int | str, ...], sizes: dict[str, int]) -> None:
    """Raise ValueError unless x.shape matches `dims`.

    dims: one entry per dimension, an int for a fixed size or a symbol ("B", "V", ...) for a size that must
    agree between the tensors of one call; `sizes` holds the symbols bound so far and is updated in place.
    """
    pattern = "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"
    if x.ndim != len(dims):
        raise ValueError(f"{name}: expected {pattern}, got {tuple(x.shape)}")
    for dim, size in zip(dims, x.shape, strict=True):
        expected = dim if isinstance(dim, int) else sizes.setdefault(dim, size)
        if size != expected:
            bound = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise ValueError(f"{name}: expected {pattern} with {bound}, got {tuple(x.shape)}")
