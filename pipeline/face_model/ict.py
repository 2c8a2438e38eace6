"""Convert the ICT-FaceKit "Light" face model (MIT) into the face model format.

Input: ICT-FaceKit-FaceXModel.tar.xz (members FaceXModel/*.obj, FaceXModel/vertex_indices.json, README.md) or a
clone of github.com/ICT-VGL/ICT-FaceKit (the same relative paths). The tar is read as one xz stream, keeping only
the face-area vertices of each OBJ, so nothing is unpacked.

- Units cm -> mm; the frame is already that of model space (+x subject's left, +y up, +z out of the face).
- Face area: the README's geometry #0, vertices 0..9408, 9230 quads -> 18,460 triangles, one manifold piece with
  two eye holes, a mouth opening and the outer border. `area="narrow"` keeps the front face (NARROW_* below:
  no ears, scalp or neck); "full" keeps all of #0.
- Eye holes are closed by a fan around one added vertex per hole (the mean of its boundary loop, in the mean
  and in every basis column, so it follows every deformation linearly): the Light model's eyeballs are separate
  rigid meshes that its blendshapes do not move, and a closed surface lets the renderer paint the eye region
  (the photo shows eyes there, not the background; MediaPipe's eye points get a surface to land on). The mouth
  opening stays open: it is anatomy, the inner lips meet across it when the mouth closes.
- Identity: 100 PCA modes, each OBJ = neutral + one standard deviation (ICT's identity weights are unit-variance),
  so displacement = OBJ - generic_neutral_mesh and coefficients are N(0, 1) as the format wants (checked: the
  per-vertex standard deviation is of SFM's order, tests/test_ict.py).
- Expression: the 53 ARKit-named shapes of vertex_indices.json minus the 8 eyeLook* ones, weights in [0, 1]
  (the model's exp_range). The eyeLook* shapes only drag the eyelids with the gaze (<= 3.5 mm, measured) of eyes
  this model does not carry, which the 68 landmarks cannot tell from eyeBlink / eyeWide / eyeSquint.
  mouthClose is kept: it is a corrective for jawOpen (the lips close over an open jaw).
- Landmarks: the README's Multi-PIE 68 vertices with its alternative jawline for iBUG 0-7 and 9-16 (chosen by
  `jaw_template_residual`: the fixed 3D jaw points against the BFM mean 68-landmark template, mean 16.4 mm off
  against 24.5 mm for the Multi-PIE jaw, which sits too far forward). The silhouette jaw points slide along rows
  cut at the jawline (jaw_rows_inside_jawline), stored as the model's jaw_candidates. By default
  (`landmarks="fitted"`) the inner points (iBUG 17-67) are FITTED_INNER_LANDMARKS instead, re-chosen on the sample
  photos against dlib's predictor (trained on 300-W) as for the SFM (scripts/derive_landmarks.py --model ict);
  `"model_file"` keeps the README's. The mesh (area, eye holes) is cut at the README's points either way.
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np

from .decode import jaw_contour_candidates
from .format import LANDMARK_CHOICES, N_LANDMARKS, FaceModel, FaceModelError, no_mesh468, outward_winding
from .sfm import similarity_fit, skin_region

ICT_LICENCE = ("ICT-FaceKit (ICT Face Model Light): MIT licence, Copyright (c) 2020 USC Institute for Creative "
               "Technologies; github.com/ICT-VGL/ICT-FaceKit.")
CM_TO_MM = 10.0
FACE_VERTS = 9409          # README geometry #0 "Face": vertices [0:9408], polygons [0:9229]
FACE_QUADS = 9230
N_IDENTITY = 100
DROPPED_EXPRESSIONS = re.compile(r"eyeLook")
AREAS = ("full", "narrow")
# narrow: in front of the coronal plane NARROW_BEHIND_EYES_MM behind the outer eye corners (on the mean: the ears
# end 12 mm behind it, the alternative jawline's top points lie 6 mm in front) and above NARROW_BELOW_CHIN_MM
# under the chin landmark (drops the neck) and below NARROW_ABOVE_BROWS_MM over the brow landmarks (a hairline's
# height; drops the scalp)
NARROW_BEHIND_EYES_MM = 65.0
NARROW_BELOW_CHIN_MM = 5.0
NARROW_ABOVE_BROWS_MM = 60.0
JAW = list(range(0, 8)) + list(range(9, 17))
JAW_ROW_TOL_MM = 1.0
# iBUG 17-67 (0-based) -> read_ict vertex (geometry #0): scripts/derive_landmarks.py --model ict --face-model
# models/face_model_ict.npz on the 28 sample faces (narrow area, 8 mm search radius, under the reconstruct stage's
# fit with the ungated mesh masks): 45 of 51 moved (mean 2.99 mm, max 6.69 mm); the output landmarks' inner
# residual against dlib 4.62 -> 4.40 px RMS, per-landmark bias 2.85 -> 0.89 px. Held-out annotated photos, the
# reconstruct stage's fit of this model as converted: inner NME 2.83 % with the table chosen under the skin masks,
# 2.55 % with this one (each photo lower)
FITTED_INNER_LANDMARKS = (
    258, 1009, 1032, 2040, 2028, 4225, 4236, 3252, 3229, 2499,  # brows 17-26
    977, 4522, 4942, 4857, 4583, 4987, 5, 5441, 5048,           # nose 27-35
    569, 1576, 1536, 659, 1518, 1552, 2900, 3750, 3790, 2810, 3766, 3732,  # eyes 36-47
    142, 143, 2082, 2, 4276, 2384, 2383, 6346, 6480, 5520, 5976, 5841,  # outer lips 48-59
    6659, 5737, 5523, 6242, 6695, 6484, 5515, 5980)              # inner lips 60-67


def _vertices(text: str, n: int) -> np.ndarray:
    """The first n `v` records of an OBJ's text -> (n, 3) float64 (OBJs list all vertices before faces)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("v "):
            rows.append(line.split()[1:4])
            if len(rows) == n:
                break
    if len(rows) < n:
        raise FaceModelError(f"OBJ has {len(rows)} vertices, the ICT face area needs {n}")
    return np.asarray(rows, np.float64)


def _quads(text: str) -> np.ndarray:
    """The first FACE_QUADS `f` records (0-based vertex ids, `v/vt` corners) -> (FACE_QUADS, 4) int64."""
    quads = []
    for line in text.splitlines():
        if line.startswith("f "):
            quads.append([int(w.split("/")[0]) - 1 for w in line.split()[1:]])
            if len(quads) == FACE_QUADS:
                break
    quads = np.asarray(quads, np.int64)
    if quads.shape != (FACE_QUADS, 4) or quads.max() >= FACE_VERTS:
        raise FaceModelError(f"generic_neutral_mesh.obj: expected {FACE_QUADS} face-area quads over vertices "
                             f"< {FACE_VERTS}, got {quads.shape}")
    return quads


def _readme_indices(readme: str, heading: str) -> np.ndarray:
    """The indented comma-separated index list after the README line starting with `heading`."""
    match = re.search(re.escape(heading) + r"[^\n]*\n\s*\n\s+([0-9,\s]+)", readme)
    if not match:
        raise FaceModelError(f"README.md: no index list after {heading!r}")
    return np.asarray([int(w) for w in match.group(1).replace(",", " ").split()], np.int64)


def read_ict(source: str | Path) -> dict:
    """Read the face-area data of ICT-FaceKit from the .tar.xz or a clone directory.

    Returns {"neutral": (9409, 3) cm, "quads": (9230, 4), "shapes": {OBJ stem: (9409, 3) cm}, "expressions":
    [53 names], "landmarks": (68,), "jaw_right": (8,), "jaw_left": (8,)}.
    """
    source = Path(source)
    texts: dict[str, str] = {}
    shapes: dict[str, np.ndarray] = {}

    def take(name: str, data: bytes) -> None:
        stem = Path(name).stem
        if name.endswith(".obj"):
            text = data.decode()
            shapes[stem] = _vertices(text, FACE_VERTS)
            if stem == "generic_neutral_mesh":
                texts["quads"] = text
        elif name.endswith(("vertex_indices.json", "README.md")):
            texts[Path(name).name] = data.decode()

    if source.is_dir():
        for path in sorted((source / "FaceXModel").glob("*.obj")) + [source / "FaceXModel/vertex_indices.json",
                                                                     source / "README.md"]:
            if path.exists():
                take(path.name, path.read_bytes())
    elif source.is_file():
        with tarfile.open(source, "r:*") as archive:
            for member in archive:  # one pass: an xz stream has no random access
                if member.isfile() and member.name.endswith((".obj", "vertex_indices.json", "README.md")):
                    take(member.name, archive.extractfile(member).read())
    else:
        raise FaceModelError(f"{source}: no ICT-FaceKit archive or clone there")
    missing = [k for k in ("quads", "vertex_indices.json", "README.md") if k not in texts]
    if missing:
        raise FaceModelError(f"{source}: missing {missing} (generic_neutral_mesh.obj, vertex_indices.json, README.md)")
    expressions = json.loads(texts["vertex_indices.json"])["expressions"]
    needed = [f"identity{i:03d}" for i in range(N_IDENTITY)] + expressions
    absent = [n for n in needed if n not in shapes]
    if absent:
        raise FaceModelError(f"{source}: missing shape OBJs {absent[:5]}{' ...' if len(absent) > 5 else ''}")
    readme = texts["README.md"]
    landmarks = _readme_indices(readme, "Multi-PIE 68 point facial landmarks indices")
    jaw_right, jaw_left = (_readme_indices(readme, f"{side} jawline (substitutes") for side in ("Right", "Left"))
    if landmarks.shape != (N_LANDMARKS,) or jaw_right.shape != (8,) or jaw_left.shape != (8,):
        raise FaceModelError(f"README.md: landmark lists of {len(landmarks)}, {len(jaw_right)}, {len(jaw_left)} "
                             "indices, expected 68, 8, 8")
    return {"neutral": shapes.pop("generic_neutral_mesh"), "quads": _quads(texts["quads"]), "shapes": shapes,
            "expressions": expressions, "landmarks": landmarks, "jaw_right": jaw_right, "jaw_left": jaw_left}


def with_alternative_jaw(landmarks: np.ndarray, jaw_right: np.ndarray, jaw_left: np.ndarray) -> np.ndarray:
    """(68,) the Multi-PIE landmarks with iBUG 0-7 and 9-16 replaced by the README's alternative jawline."""
    out = landmarks.copy()
    out[JAW] = np.concatenate([jaw_right, jaw_left])
    return out


def jaw_template_residual(mean_mm: np.ndarray, landmarks: np.ndarray, template_68: np.ndarray) -> float:
    """Mean 3D distance (mm) of the jaw landmark vertices (iBUG 0-7, 9-16) from the BFM mean 68-landmark template
    (similarity_Lm3D_all.mat) brought into model space by a similarity fitted on the other 52 landmarks."""
    rest = [i for i in range(N_LANDMARKS) if i not in JAW]
    scale, rot, t = similarity_fit(template_68[rest], mean_mm[landmarks[rest]])
    target = template_68[JAW] @ (scale * rot).T + t
    return float(np.linalg.norm(mean_mm[landmarks[JAW]] - target, axis=1).mean())


def jaw_rows_inside_jawline(mean_mm: np.ndarray, landmarks: np.ndarray, tol_mm: float = JAW_ROW_TOL_MM) -> np.ndarray:
    """(16, K) the silhouette rows of jaw points 0-7, 9-16 (decode.jaw_contour_candidates) without the vertices
    outside the jawline in the frontal view. ICT's mesh goes on under the jaw, where the generic rows would put
    the lower jaw points on the underside of the jaw (measured on the frontal mean: 31 px from the landmark vertex
    at iBUG 7 and 9; SFM: 4.9 px). The jawline is the polyline of landmarks 0-8 (8-16) in (x, y); a vertex stays
    if its |x| exceeds the jawline's at its height by at most tol_mm, so a frontal face's silhouette is the line."""
    rows = jaw_contour_candidates(mean_mm, landmarks)
    out = []
    for j, row in zip(JAW, rows):
        side = landmarks[:9] if j < 8 else landmarks[8:17][::-1]  # from the top of the side down to the chin
        line_y, line_x = mean_mm[side[::-1], 1], np.abs(mean_mm[side[::-1], 0])  # chin first: y increasing
        row = row[row >= 0]
        inside = np.abs(mean_mm[row, 0]) <= np.interp(mean_mm[row, 1], line_y, line_x) + tol_mm
        out.append(np.union1d(row[inside], [landmarks[j]]))
    k = max(len(r) for r in out)
    return np.stack([np.pad(r, (0, k - len(r)), constant_values=-1) for r in out]).astype(np.int64)


def _triangulate(quads: np.ndarray) -> np.ndarray:
    """(Q, 4) quads -> (2Q, 3) triangles, split along the 0-2 diagonal, keeping the corner order."""
    return np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])


def narrow_vertices(mean_mm: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(V,) bool: the front face (module docstring, NARROW_*) of the face area."""
    eye_z = mean_mm[landmarks[[36, 45]], 2].mean()
    chin_y, brow_y = mean_mm[landmarks[8], 1], mean_mm[landmarks[17:27], 1].max()
    return ((mean_mm[:, 2] > eye_z - NARROW_BEHIND_EYES_MM) & (mean_mm[:, 1] > chin_y - NARROW_BELOW_CHIN_MM)
            & (mean_mm[:, 1] < brow_y + NARROW_ABOVE_BROWS_MM))


def _largest_piece(tris: np.ndarray, n: int) -> np.ndarray:
    """The triangles (F', 3) of the largest edge-connected piece of tris (F, 3) over n vertices."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    edges = tris[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    graph = sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    biggest = np.bincount(label[tris[:, 0]]).argmax()
    return tris[label[tris[:, 0]] == biggest]


def boundary_loops(tris: np.ndarray, n: int) -> list[np.ndarray]:
    """The directed boundary edges (E_i, 2) of each boundary loop of tris (F, 3), in the triangles' orientation."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    half = tris[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    key = np.sort(half, 1)
    _, inv, count = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    border = half[count[inv.ravel()] == 1]
    graph = sparse.coo_matrix((np.ones(len(border)), (border[:, 0], border[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    return [border[label[border[:, 0]] == lab] for lab in np.unique(label[border[:, 0]])]


def close_holes(verts: np.ndarray, tris: np.ndarray, loops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Fan each loop (directed boundary edges (E, 2)) around a new vertex at its mean.

    verts: (V, 3 * M) any per-vertex rows that deform linearly (mean and basis columns side by side); returns
    (V + L, 3 * M) with the L loop means appended and tris (F + sum E, 3), the fans oriented like the mesh."""
    new_rows, fans = [], []
    for i, loop in enumerate(loops):
        centre = len(verts) + i
        new_rows.append(verts[np.unique(loop)].mean(0))
        # a boundary edge a->b of a triangle is b->a in the fan triangle, so both agree in orientation
        fans.append(np.stack([loop[:, 1], loop[:, 0], np.full(len(loop), centre)], 1))
    return np.concatenate([verts, np.stack(new_rows)]), np.concatenate([tris] + fans)


def convert_ict(source: str | Path, albedo_rgb: tuple[float, float, float], area: str = "narrow",
                landmarks: str = "fitted") -> FaceModel:
    """The ICT face model from `source` (the .tar.xz or a clone); area: 'full' | 'narrow' (module docstring);
    albedo_rgb: the uniform mean reflectance in [0, 1] (the Light model has no colour model); landmarks:
    'fitted' (inner points FITTED_INNER_LANDMARKS) | 'model_file' (the README's)."""
    if area not in AREAS:  # checked before the archive is read
        raise FaceModelError(f"face_model.ict_area must be one of {AREAS}, got {area!r}")
    if landmarks not in LANDMARK_CHOICES:
        raise FaceModelError(f"face_model.landmarks must be one of {LANDMARK_CHOICES}, got {landmarks!r}")
    return ict_face_model(read_ict(source), albedo_rgb, area, landmarks)


def expression_names(data: dict) -> list[str]:
    """The expression shapes of the basis, in its column order: read_ict's 53 minus DROPPED_EXPRESSIONS."""
    return [n for n in data["expressions"] if not DROPPED_EXPRESSIONS.match(n)]


def face_area(data: dict, area: str) -> tuple[np.ndarray, np.ndarray]:
    """The mesh of `area` ('full' | 'narrow') in read_ict's vertex ids: (U,) int64 the vertices it keeps, in the
    model's vertex order (the eye-hole centres follow them), and (F, 3) int64 its triangles. The narrow area is cut
    at the README's landmarks whatever the landmark choice, so the mesh stays the same."""
    if area not in AREAS:
        raise FaceModelError(f"face_model.ict_area must be one of {AREAS}, got {area!r}")
    tris = _triangulate(data["quads"])
    if area == "narrow":
        landmarks = with_alternative_jaw(data["landmarks"], data["jaw_right"], data["jaw_left"])
        keep = narrow_vertices(data["neutral"] * CM_TO_MM, landmarks)
        tris = _largest_piece(tris[keep[tris].all(1)], FACE_VERTS)
    return np.unique(tris), tris


def ict_face_model(data: dict, albedo_rgb: tuple[float, float, float], area: str,
                   landmarks: str = "fitted") -> FaceModel:
    """The face model from read_ict's data (convert_ict's arguments otherwise; face_area checks `area`)."""
    if landmarks not in LANDMARK_CHOICES:
        raise FaceModelError(f"face_model.landmarks must be one of {LANDMARK_CHOICES}, got {landmarks!r}")
    used, tris = face_area(data, area)
    names = expression_names(data)
    neutral = data["neutral"] * CM_TO_MM
    ids = np.stack([data["shapes"][f"identity{i:03d}"] * CM_TO_MM - neutral for i in range(N_IDENTITY)], -1)
    exps = np.stack([data["shapes"][n] * CM_TO_MM - neutral for n in names], -1)
    readme_landmarks = with_alternative_jaw(data["landmarks"], data["jaw_right"], data["jaw_left"])
    landmark_ids = readme_landmarks.copy()
    if landmarks == "fitted":
        landmark_ids[17:] = FITTED_INNER_LANDMARKS
    if not np.isin(landmark_ids, used).all():
        missing = landmark_ids[~np.isin(landmark_ids, used)]
        raise FaceModelError(f"area {area!r} leaves out landmark vertices {missing}")
    remap = np.full(FACE_VERTS, -1, np.int64)
    remap[used] = np.arange(len(used))
    tris, landmark_ids, eye_ids = remap[tris], remap[landmark_ids], remap[readme_landmarks]
    rows = np.concatenate([neutral[used], ids[used].reshape(len(used), -1), exps[used].reshape(len(used), -1)], 1)
    # the eye holes: the two loops (other than the outer border and the mouth) whose centre is nearest an eye
    # (the README's eye points, so that the mesh does not depend on the landmark choice)
    loops = boundary_loops(tris, len(used))
    eyes = [min(loops, key=lambda lp: np.linalg.norm(rows[np.unique(lp), :3].mean(0) - centre))
            for centre in (rows[eye_ids[36:42], :3].mean(0), rows[eye_ids[42:48], :3].mean(0))]
    rows, tris = close_holes(rows, tris, eyes)

    n = len(rows)
    mean = rows[:, :3]
    centroid = mean.mean(0)
    mean = mean - centroid
    id_basis = rows[:, 3:3 + 3 * N_IDENTITY].reshape(n, 3, N_IDENTITY).reshape(3 * n, N_IDENTITY)
    exp_basis = rows[:, 3 + 3 * N_IDENTITY:].reshape(n, 3, len(names)).reshape(3 * n, len(names))
    tris = outward_winding(mean, tris)
    return FaceModel(
        mean_shape=mean.astype(np.float32), id_basis=id_basis.astype(np.float32),
        exp_basis=exp_basis.astype(np.float32),
        mean_albedo=np.tile(np.asarray(albedo_rgb, np.float32), (n, 1)),
        albedo_basis=np.zeros((3 * n, 0), np.float32), triangles=tris, landmarks=landmark_ids,
        face_region=skin_region(mean, landmark_ids), **no_mesh468(),
        exp_range=np.asarray([0.0, 1.0], np.float32), jaw_candidates=jaw_rows_inside_jawline(mean, landmark_ids),
        name=f"ICT Face Model Light ({area})", version=f"ict-light-{area}-100id+{len(names)}exp",
        licence=ICT_LICENCE)
