"""Mesh export: Wavefront OBJ with per-vertex colours and binary PLY, each written atomically.

A reader never sees a half-written file: the mesh goes to a temporary file in the target's folder, which
then replaces the target in one `os.replace`.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import trimesh


def _mesh_arrays(verts, tris, colors) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate and convert to (V, 3) float64, (F, 3) int64 and optional (V, 3) float64 colours in [0, 1]."""
    verts = np.asarray(verts, dtype=np.float64)
    tris = np.asarray(tris)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ValueError(f"verts: expected (V, 3), got {verts.shape}")
    if not np.isfinite(verts).all():
        raise ValueError("verts: contains non-finite coordinates")
    if tris.ndim != 2 or tris.shape[1] != 3 or not np.issubdtype(tris.dtype, np.integer):
        raise ValueError(f"tris: expected (F, 3) integer indices, got {tris.shape} {tris.dtype}")
    if tris.size and (tris.min() < 0 or tris.max() >= len(verts)):
        raise ValueError(f"tris: indices must lie in [0, {len(verts)}), got [{tris.min()}, {tris.max()}]")
    if colors is None:
        return verts, tris.astype(np.int64), None
    colors = np.asarray(colors, dtype=np.float64)
    if colors.shape != verts.shape:
        raise ValueError(f"colors: expected {verts.shape} like verts, got {colors.shape}")
    # Shaded model colours can leave [0, 1] (unclamped albedo x light); mesh viewers expect [0, 1].
    return verts, tris.astype(np.int64), np.clip(np.nan_to_num(colors), 0.0, 1.0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: str | Path, payload: bytes) -> Path:
    """Write payload to path via a temporary sibling file and os.replace."""
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give, as for the images
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(payload)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_obj(path: str | Path, verts, tris, colors=None) -> Path:
    """Write a Wavefront OBJ: `v x y z [r g b]` lines then 1-based `f a b c` lines.

    verts: (V, 3) float, any unit (the pipeline writes model-space mm); tris: (F, 3) integer, 0-based;
    colors: optional (V, 3) float RGB in [0, 1] (values outside are clipped). Numpy arrays or CPU tensors.
    Returns the path written. The parent folder must exist.
    """
    verts, tris, colors = _mesh_arrays(verts, tris, colors)
    rows = verts if colors is None else np.concatenate([verts, colors], axis=1)
    text = io.StringIO()
    # 9 significant digits round-trip float32 positions; colours need far fewer.
    np.savetxt(text, rows, fmt="v %.9g %.9g %.9g" + " %.6g" * (rows.shape[1] - 3))
    np.savetxt(text, tris + 1, fmt="f %d %d %d")
    return _write_atomic(path, text.getvalue().encode("ascii"))


def write_ply(path: str | Path, verts, tris, colors=None) -> Path:
    """Write a binary little-endian PLY with float vertices and, if given, uint8 RGB vertex colours.

    verts: (V, 3) float; tris: (F, 3) integer, 0-based; colors: optional (V, 3) float RGB in [0, 1]
    (clipped, then rounded to 0..255). Returns the path written. The parent folder must exist.
    """
    verts, tris, colors = _mesh_arrays(verts, tris, colors)
    rgba = None if colors is None else np.concatenate(
        [np.round(colors * 255).astype(np.uint8), np.full((len(verts), 1), 255, np.uint8)], axis=1)
    mesh = trimesh.Trimesh(vertices=verts, faces=tris, vertex_colors=rgba, process=False, validate=False)
    return _write_atomic(path, mesh.export(file_type="ply", encoding="binary"))
