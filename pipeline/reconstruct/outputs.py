"""Faces table <-> tensors, and the reconstruction's outputs: table rows and per-face files."""
from __future__ import annotations

import functools
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..face_model import FaceDecoder
from ..render.face import FaceRender, render_face
from ..shards.image_bytes import decode_grey, decode_rgb
from ..render.mesh_io import write_obj
from ..evaluate.metrics import masked_psnr
from .batch import FaceBatch, visible_vertices
from .fit import FitSettings, per_face_terms
from .export import crop_to_photo_px, draw_landmarks, overlay_on_photo, photo_vertex_colors, write_png


@dataclass(frozen=True)
class FaceOutputs:
    """Which per-face files to write."""
    meshes: bool = True
    overlays: bool = True
    crops: bool = True


_DECODE_THREADS = os.cpu_count() or 1


@functools.cache
def _decode_pool() -> ThreadPoolExecutor:
    # OpenCV's codecs release the GIL, so a batch of crops decodes on all cores
    return ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="decode")


def _decode_all(decode, data: pd.Series) -> np.ndarray:
    """decode (bytes -> uint8 image) over a column of encoded images -> (B, ...) uint8, decoded in threads."""
    if len(data) < 2 or _DECODE_THREADS == 1:
        return np.stack([decode(b) for b in data])
    return np.stack(list(_decode_pool().map(decode, data)))


def _unit_float(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (x / 255, exactly as numpy's astype(float32) / 255.0), with torch's threads."""
    return torch.from_numpy(images_u8).to(torch.float32).div_(255.0)


def _points(column: pd.Series, shape: tuple[int, int]) -> np.ndarray:
    """A column of flat float lists -> (rows, *shape) float32."""
    return np.stack([np.asarray(x, np.float32).reshape(shape) for x in column])


def faces_to_batch(faces: pd.DataFrame, device: torch.device) -> FaceBatch:
    """Rows with `crop` (JPEG), `mask` (PNG), `landmarks` (68x2 crop px) and `mesh` (468x3 crop px) -> FaceBatch
    on `device`."""
    photo = _unit_float(_decode_all(decode_rgb, faces["crop"]))
    mask = _unit_float(_decode_all(decode_grey, faces["mask"]))
    return FaceBatch(photo.permute(0, 3, 1, 2).to(device), mask[:, None].to(device),
                     torch.from_numpy(_points(faces["landmarks"], (68, 2))).to(device),
                     torch.from_numpy(_points(faces["mesh"], (468, 3))).to(device))


STEM_PREFIX_CHARS = 64  # readable part of a stem; with its hash and the longest suffix it stays < 100 bytes


def file_stem(face_id: str) -> str:
    """A face id ('photos/a b.jpg#0') -> a safe, bounded, unique file stem ('photos_a_b.jpg_0-3f1c2a9b0d').

    The readable part is the id with every run of characters outside [A-Za-z0-9._-] as '_', never hidden (the
    leading dots of a relative id '../x.jpg#0' go too) and cut to its last STEM_PREFIX_CHARS characters (the
    file name and face index are at the end); '-' and 10 hex digits of the id's SHA-1 follow, so ids that read
    the same ('a b.jpg' and 'a_b.jpg', 'é.jpg' and 'ü.jpg') get their own files and no name is too long."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", face_id).lstrip("._").rstrip("_")
    readable = readable[-STEM_PREFIX_CHARS:].lstrip("._-") or "face"
    digest = hashlib.sha1(face_id.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{readable}-{digest}"


def face_rows(decoder: FaceDecoder, coeffs: torch.Tensor, batch: FaceBatch, faces: pd.DataFrame, method: str,
              fit: FitSettings) -> tuple[list[dict], FaceRender]:
    """One table row per face: ids, the crop's 2x3 photo -> crop transform (6 values, row-major), coefficient
    groups, Euler angles in degrees, landmarks, the identity+expression mesh (mm), masked PSNR and the loss terms.
    Landmarks, (68, 2) flattened, ORIGINAL-photo px unless named crop: `lmk_px` / `lmk_crop_px` ours with the jaw
    on the 2D silhouette (iBUG / 300-W .pts convention), `lmk3d_px` ours at the fixed 3D landmark vertices
    (AFLW2000-3D convention), `input_lmk_px` the points the fit used (landmarks.source; `landmarks_source` says
    which), `dlib_lmk_px` dlib's, `mesh_lmk_px` the face mesh's 68 (pipeline.detect.mesh68).
    Returns the rows and the render (B faces) they were measured on."""
    from ..detect.mesh68 import mesh_to_ibug68  # numpy only; pipeline.detect's package import would load dlib

    with torch.no_grad():
        face = render_face(decoder, coeffs)
        terms = per_face_terms(decoder, face, coeffs, batch.photo, batch.face_mask, batch.lmk_px,
                               fit.point_weights(coeffs.device), fit.weights, batch.mesh_px[..., :2])
        psnr = masked_psnr(face.image, batch.photo, batch.face_mask * face.mask)
        lmk3d_crop = decoder.landmark3d_px(decoder.layout.split(coeffs)).cpu().numpy()
    # whole-batch arrays once; each row takes its face's slice
    c = decoder.layout.split(coeffs.detach())
    coeff_groups = {f"coeff_{name}": getattr(c, name).cpu().numpy().astype(np.float32) for name in c._fields}
    angles_deg = np.degrees(c.rot.cpu().numpy())
    lmk_crop = face.decoded.lmk_px.cpu().numpy()
    lmk_input = batch.lmk_px.cpu().numpy()
    mesh_crop = batch.mesh_px.cpu().numpy()
    verts_model = face.decoded.verts_model.cpu().numpy().astype(np.float32).reshape(len(coeffs), -1)
    loss_terms = {f"loss_{k}": v.cpu().numpy() for k, v in terms.items()}
    rows = []
    # plain lists per column: itertuples costs ~1 ms per call, Python time that holds the GIL
    meta = {name: faces[name].tolist() for name in ("id", "source", "face_index", "transform", "dlib_landmarks",
                                                    "landmarks_source")}
    for i in range(len(faces)):
        transform = np.asarray(meta["transform"][i], np.float64).reshape(2, 3)
        pitch, yaw, roll = angles_deg[i]
        sets = [lmk_crop[i], lmk3d_crop[i], lmk_input[i], np.asarray(meta["dlib_landmarks"][i]).reshape(68, 2),
                mesh_to_ibug68(mesh_crop[i])]
        lmk_photo, lmk3d_photo, input_photo, dlib_photo, mesh_photo = np.split(
            crop_to_photo_px(np.concatenate(sets), transform), len(sets))
        row = {"id": meta["id"][i], "source": meta["source"][i], "face_index": int(meta["face_index"][i]),
               "method": method, "files_stem": file_stem(meta["id"][i]), "transform": transform.reshape(-1)}
        row.update({name: group[i] for name, group in coeff_groups.items()})
        row.update(
            pitch_deg=float(pitch), yaw_deg=float(yaw), roll_deg=float(roll),
            lmk_crop_px=lmk_crop[i].astype(np.float32).reshape(-1),
            lmk_px=lmk_photo.astype(np.float32).reshape(-1),
            lmk3d_px=lmk3d_photo.astype(np.float32).reshape(-1),
            input_lmk_px=input_photo.astype(np.float32).reshape(-1),
            landmarks_source=meta["landmarks_source"][i],
            dlib_lmk_px=dlib_photo.astype(np.float32).reshape(-1),
            mesh_lmk_px=mesh_photo.astype(np.float32).reshape(-1),
            verts_model=verts_model[i],
            masked_psnr=float(psnr[i]))
        row.update({name: float(values[i]) for name, values in loss_terms.items()})
        rows.append(row)
    return rows, face


FACE_FILE_SUFFIXES = (".obj", "_overlay.png", "_crop.png")


def write_face_files(folder: Path, faces: pd.DataFrame, rows: list[dict], face: FaceRender, photo: torch.Tensor,
                     decoder: FaceDecoder, which: FaceOutputs) -> list[tuple[int, OSError]]:
    """Per face: `<stem>.obj` (identity+expression mesh in mm, photo-textured where visible), `<stem>_overlay.png`
    (the render on the ORIGINAL photo) and `<stem>_crop.png` (aligned crop, the fitted landmarks green, model red).

    A face whose files cannot be written (OSError: disk full, permissions, ...) loses the files it got and is
    returned as (its index in `faces`, the error); the other faces are still written."""
    failed: list[tuple[int, OSError]] = []
    if not (which.meshes or which.overlays or which.crops):
        return failed
    visible = visible_vertices(face, decoder.triangles, decoder.mean_shape.shape[0]).cpu().numpy()
    tris = decoder.triangles.cpu().numpy()
    folder.mkdir(parents=True, exist_ok=True)
    for i, (meta, row) in enumerate(zip(faces.itertuples(index=False), rows)):
        stem = folder / row["files_stem"]
        try:
            _write_one_face(stem, i, meta, row, faces, face, photo, visible, tris, which)
        except OSError as error:
            for suffix in FACE_FILE_SUFFIXES:
                stem.with_name(stem.name + suffix).unlink(missing_ok=True)
            failed.append((i, error))
    return failed


def _write_one_face(stem: Path, i: int, meta, row: dict, faces: pd.DataFrame, face: FaceRender,
                    photo: torch.Tensor, visible: np.ndarray, tris: np.ndarray, which: FaceOutputs) -> None:
    crop = (photo[i].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    if which.meshes:
        colors = photo_vertex_colors(crop, face.decoded.verts_px[i].cpu().numpy(), visible[i],
                                     face.decoded.colors[i].cpu().numpy())
        write_obj(stem.parent / f"{stem.name}.obj", face.decoded.verts_model[i].cpu().numpy(), tris, colors)
    if which.overlays:
        original = read_source_photo(meta.source)
        if original is not None:
            render = face.image[i].permute(1, 2, 0).cpu().numpy()
            write_png(stem.parent / f"{stem.name}_overlay.png",
                      overlay_on_photo(original, render, face.mask[i, 0].cpu().numpy(), meta.transform))
    if which.crops:
        lmk_fit = np.asarray(row["lmk_crop_px"]).reshape(68, 2)
        lmk_input = np.asarray(faces["landmarks"].iloc[i], np.float32).reshape(68, 2)
        write_png(stem.parent / f"{stem.name}_crop.png", draw_landmarks(crop, lmk_input, lmk_fit))


def read_source_photo(path: str) -> np.ndarray | None:
    """The original photo as (H, W, 3) uint8 RGB with EXIF orientation applied, or None if it is gone."""
    from ..detect import read_photo
    try:
        return read_photo(path)
    except (OSError, ValueError):
        return None
