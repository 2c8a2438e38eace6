"""Ground-truth 68-point landmark files: iBUG / 300-W `.pts` and AFLW2000-3D `.mat`, matched to their images.

Both formats store 1-based pixel coordinates (the centre of the top-left pixel is (1, 1)):
- `.pts` (300-W, iBUG): annotated with MATLAB-based tools, 1-based (docs/conventions.md, shared/README.md).
- AFLW2000-3D `pt3d_68` (3 x 68: x, y, z): produced by the 3DDFA authors' MATLAB fitting; their own Python
  code maps model points into this image frame with `y = size + 1 - y`, i.e. the MATLAB 1-based frame.
The readers subtract 1 so that every landmark is in the project's 0-based frame (docs/conventions.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.io import loadmat

N_LANDMARKS = 68
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ANNOTATION_SUFFIXES = (".pts", ".mat")


class Annotation(NamedTuple):
    """One face's ground truth and the convention it follows, which decides the landmarks it is compared with."""
    lmk_px: np.ndarray  # (68, 2) float64, 0-based photo px
    format: str         # "pts": iBUG / 300-W, jaw on the 2D silhouette; "mat": AFLW2000-3D, fixed 3D points projected


def read_pts(path: str | Path) -> np.ndarray:
    """An iBUG `.pts` file -> (n_points, 2) float64 landmarks in 0-based pixels (x, y).

    Format: `version: 1`, `n_points: N`, `{`, N lines `x y` (1-based px), `}`. ValueError names the line at fault.
    """
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    header = {}
    for line in lines[:2]:
        key, _, value = line.partition(":")
        header[key.strip()] = value.strip()
    if set(header) != {"version", "n_points"} or not header["n_points"].isdigit():
        raise ValueError(f"{path}: expected 'version:' and 'n_points:' header lines, got {lines[:2]}")
    n = int(header["n_points"])
    if len(lines) != n + 4 or lines[2] != "{" or lines[-1] != "}":
        raise ValueError(f"{path}: expected '{{', {n} point lines and '}}' after the header, "
                         f"got {len(lines) - 2} lines")
    try:
        points = np.array([[float(v) for v in line.split()] for line in lines[3:-1]])
    except ValueError as err:
        raise ValueError(f"{path}: a point line is not two numbers ({err})") from None
    if points.shape != (n, 2):
        raise ValueError(f"{path}: expected {n} lines of 'x y', got shape {points.shape}")
    return points - 1.0


def read_aflw2000_mat(path: str | Path) -> np.ndarray:
    """An AFLW2000-3D `.mat` file -> (68, 2) float64 landmarks in 0-based pixels, from `pt3d_68` (3 x 68, 1-based)."""
    path = Path(path)
    data = loadmat(str(path))
    if "pt3d_68" not in data:
        raise ValueError(f"{path}: no 'pt3d_68' array (keys: {sorted(k for k in data if not k.startswith('__'))})")
    pts = np.asarray(data["pt3d_68"], np.float64)
    if pts.shape != (3, N_LANDMARKS):
        raise ValueError(f"{path}: pt3d_68: expected shape (3, {N_LANDMARKS}), got {pts.shape}")
    return pts[:2].T - 1.0


def read_annotation(path: str | Path) -> Annotation:
    """`.pts` or `.mat` -> Annotation ((68, 2) float64 0-based px, format "pts" or "mat"); ValueError for any other
    suffix or point count."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ANNOTATION_SUFFIXES:
        raise ValueError(f"{path}: unknown annotation format (expected one of {ANNOTATION_SUFFIXES})")
    points = read_pts(path) if suffix == ".pts" else read_aflw2000_mat(path)
    if points.shape != (N_LANDMARKS, 2):
        raise ValueError(f"{path}: expected {N_LANDMARKS} landmarks, got {points.shape[0]}")
    return Annotation(points, suffix[1:])


def find_annotations(images_dir: str | Path, annotations_dir: str | Path) -> dict[Path, Annotation]:
    """{image path: Annotation (68 points, 0-based px, and its format)} for every image in `images_dir`
    (recursive) whose stem has a NAME.pts or NAME.mat in `annotations_dir` (recursive). Images without an
    annotation are left out; a stem annotated twice, or an image stem that two images share, raises ValueError
    (the match would be ambiguous)."""
    notes: dict[str, Path] = {}
    for path in sorted(Path(annotations_dir).rglob("*")):
        if path.is_file() and path.suffix.lower() in ANNOTATION_SUFFIXES:
            if path.stem in notes:
                raise ValueError(f"{path.stem}: annotated twice ({notes[path.stem]}, {path})")
            notes[path.stem] = path
    images: dict[str, Path] = {}
    for path in sorted(Path(images_dir).rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.stem in notes:
            if path.stem in images:
                raise ValueError(f"{path.stem}: two images share this annotation ({images[path.stem]}, {path})")
            images[path.stem] = path
    return {image: read_annotation(notes[stem]) for stem, image in images.items()}
