"""Derive MESH_TO_IBUG68 (pipeline/detect/mesh68.py): the MediaPipe mesh vertex that best stands for each iBUG point.

Measured on the sample photos (../shared/samples/faces, near-frontal: dlib's own error there is ~2 % NME), never on
the annotated evaluation photos: each photo's largest BlazeFace face gets its 468-point mesh and dlib's 68 points
(shape predictor in the HOG box nearest the BlazeFace box). For each mirror pair of iBUG points (i, i') the pair
of mirror mesh vertices (v, v') with the least mean NME over both points is chosen, so the map is left-right
symmetric like both landmark schemes. Jaw points get candidate rows of mesh vertices (as the face model's jaw
does, pipeline.face_model.decode.jaw_contour_candidates) to slide along the 2D silhouette. Prints the tables to paste into mesh68.py and the NME it reaches.

    .venv/bin/python scripts/derive_mesh68.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.detect.dlib_faces import detect_faces, fit_landmarks
from pipeline.detect.mediapipe import detect_blazeface, face_mesh, roi_around
from pipeline.detect.photo_io import list_photos, read_photo
from pipeline.face_model.decode import jaw_contour_candidates
from pipeline.face_model.mediapipe_mesh import read_canonical_obj

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "samples" / "faces"
CANONICAL_OBJ = SHARED / "face_models" / "mediapipe" / "canonical_face_model.obj"
# iBUG-68 point -> its mirror image (0-based): jaw, brows, nose, eyes, outer and inner lips
IBUG_MIRROR = np.array(list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
                       + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40] + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57,
                                                                              56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])


def mesh_mirror(verts: np.ndarray) -> np.ndarray:
    """(468,) the vertex nearest each vertex's mirror image x -> -x (the canonical mesh is symmetric)."""
    mirrored = verts * np.array([-1.0, 1.0, 1.0])
    return np.linalg.norm(verts[None] - mirrored[:, None], axis=-1).argmin(1)


def sample_pairs() -> tuple[np.ndarray, np.ndarray]:
    """(mesh (N, 468, 2), dlib (N, 68, 2)) photo px over the sample photos where both found the face."""
    meshes, dlibs = [], []
    for path in list_photos(SAMPLES):
        rgb = read_photo(path)
        faces, boxes = detect_blazeface(rgb), detect_faces(rgb)
        if not faces or not boxes:
            continue
        centre = (faces[0].box_px[:2] + faces[0].box_px[2:]) / 2
        box = min(boxes, key=lambda d: np.linalg.norm((d.box_px[:2] + d.box_px[2:]) / 2 - centre)).box_px
        meshes.append(face_mesh(rgb, roi_around(faces[0].box_px, *faces[0].keypoints_px[:2]))[0][:, :2])
        dlibs.append(fit_landmarks(rgb, box))
    return np.stack(meshes), np.stack(dlibs)


def main() -> None:
    mesh, dlib = sample_pairs()
    extent = dlib.max(1) - dlib.min(1)
    size = np.sqrt(extent[:, 0] * extent[:, 1])
    # err[i, v]: mean over faces of |mesh vertex v - dlib point i| / face size
    err = (np.linalg.norm(mesh[:, None] - dlib[:, :, None], axis=-1) / size[:, None, None]).mean(0)
    mirror_v = mesh_mirror(read_canonical_obj(CANONICAL_OBJ)[0])
    table = np.zeros(68, np.int64)
    for i, j in enumerate(IBUG_MIRROR):
        pair = err[i] + err[j][mirror_v]  # vertex v for point i, its mirror for point j
        table[i] = int(np.argmin(pair))
        table[j] = mirror_v[table[i]]
    print(f"{len(mesh)} faces; NME of the mapped mesh against dlib: {err[np.arange(68), table].mean():.4f}")
    print("MESH_TO_IBUG68 = (" + ", ".join(map(str, table)) + ")")
    # jaw points slide along rows of the canonical mesh on their side (the face model's jaw convention)
    rows = jaw_contour_candidates(read_canonical_obj(CANONICAL_OBJ)[0], table)
    print("MESH_JAW_CANDIDATES = (" + ",\n    ".join(str(tuple(int(v) for v in r if v >= 0)) for r in rows) + ")")


if __name__ == "__main__":
    main()
