"""Face model format, SFM and BFM converters, decoder."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat
from scipy.spatial import cKDTree

from pipeline.face_model import (N_MESH468, CoeffLayout, FaceDecoder, FaceModelError, euler_to_rotation,
                                 load_face_model, no_mesh468, project, save_face_model, sh_shading)
from pipeline.evaluate.now import point_to_mesh_distance  # an independent (Ericson) closest-point search
from pipeline.face_model.bfm import BFM_VERTS, EXP_VERTS, FRONT_VERTS, convert_bfm
from pipeline.face_model.format import MESH468_ARRAYS, outward_winding
from pipeline.face_model.mediapipe_mesh import (ANCHORS, Surface, closest_on_triangles, read_canonical_obj,
                                                register_canonical, with_mesh468)
from pipeline.detect.alignment import TEMPLATE_5PT_PX, fit_similarity, five_points, transform_points
from pipeline.evaluate.annotations import find_annotations
from pipeline.evaluate.metrics import INNER_POINTS, landmark_nme
from pipeline.face_model.ict import convert_ict, ict_face_model
from pipeline.face_model.sfm import convert_sfm, similarity_fit
from pipeline.reconstruct.fit import FitSettings, fit_to_landmarks
from pipeline.train import IBUG_FLIP
from conftest import ALBEDO, ANNOTATED, AUX_DIR, ICT_ARCHIVE, MEDIAPIPE_OBJ, REPO_ROOT, SFM_DIR, annotated_inner_nme


def test_sfm_sizes(sfm):
    assert (sfm.n_verts, sfm.k_id, sfm.k_exp, sfm.k_alb) == (3448, 63, 6, 0)
    assert sfm.triangles.shape == (6736, 3)
    assert len(set(sfm.landmarks.tolist())) == 68, "every landmark needs its own vertex"
    assert np.allclose(sfm.mean_shape.mean(0), 0, atol=1e-3)


def test_sfm_landmarks_project_in_ibug_order(sfm):
    lmk = FaceDecoder(sfm)(CoeffLayout.of(sfm).zeros(1)).lmk_px[0].numpy()
    x, y = lmk[:, 0], lmk[:, 1]
    centre = x[[27, 28, 29, 30, 33, 8]].mean()
    # jaw: image-left half descends to the chin, image-right half climbs back up
    assert np.all(np.diff(y[0:9]) > 0) and np.all(np.diff(y[8:17]) < 0)
    assert np.all(x[0:8] < centre) and np.all(x[9:17] > centre)
    # left/right pairs mirror about the nose line (iBUG symmetric pairs, 0-based)
    pairs = [(0, 16), (3, 13), (17, 26), (19, 24), (36, 45), (39, 42), (31, 35), (48, 54), (60, 64), (50, 52)]
    for a, b in pairs:
        assert abs((x[a] - centre) + (x[b] - centre)) < 3.0, (a, b)
        assert abs(y[a] - y[b]) < 3.0, (a, b)
        assert x[a] < x[b], (a, b)
    # vertical order: brows above eyes above nose tip above mouth above chin
    assert y[19] < y[37] < y[30] < y[51] < y[57] < y[8]
    # inner mouth corners inside the outer ones
    assert x[48] < x[60] < x[64] < x[54]


def test_sfm_landmarks_match_bfm_template_shape(sfm):
    """After a 2D similarity fit, the SFM mean landmarks are within 4% (of face size) of the BFM mean layout."""
    template = loadmat(str(AUX_DIR / "similarity_Lm3D_all.mat"))["lm"][:, :2]
    ours = sfm.mean_shape[sfm.landmarks][:, :2].astype(np.float64)
    s, r, t = similarity_fit(ours, template)
    aligned = ours @ (s * r).T + t
    size = np.sqrt(np.prod(template.max(0) - template.min(0)))
    nme = np.linalg.norm(aligned - template, axis=1).mean() / size
    assert nme < 0.04, nme


def test_save_load_round_trip(sfm, tmp_path):
    path = tmp_path / "m.npz"
    save_face_model(sfm, path)
    back = load_face_model(path)
    for key in ("mean_shape", "id_basis", "exp_basis", "albedo_basis", "triangles", "landmarks", "face_region"):
        np.testing.assert_array_equal(getattr(back, key), getattr(sfm, key))
    assert back.licence == sfm.licence and back.k_alb == 0


@pytest.mark.parametrize("corrupt, message", [
    (lambda a: a.pop("landmarks"), "missing arrays ['landmarks']"),
    (lambda a: a.update(extra=np.zeros(1)), "unexpected arrays ['extra']"),
    (lambda a: a.update(triangles=a["triangles"].astype(np.int32)), "triangles: expected dtype int64"),
    (lambda a: a.update(landmarks=a["landmarks"][:60]), "landmarks: expected shape (68,)"),
    (lambda a: a["mean_shape"].__setitem__((5, 1), np.nan), "mean_shape: contains NaN"),
    (lambda a: a["triangles"].__setitem__((0, 0), 10**6), "triangles: vertex indices must lie in"),
    (lambda a: a.update(id_basis=a["id_basis"][:-3]), "id_basis: expected shape"),
    (lambda a: a.update(mean_albedo=a["mean_albedo"] * 3), "mean_albedo: values outside [0, 1]"),
])
def test_loader_rejects_corrupt_files(sfm, tmp_path, corrupt, message):
    arrays = {k: np.array(getattr(sfm, k)) for k in sfm.__dataclass_fields__}
    corrupt(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(FaceModelError) as err:
        load_face_model(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_loader_rejects_non_npz(tmp_path):
    path = tmp_path / "model.npz"
    path.write_text("not a zip")
    with pytest.raises(FaceModelError, match="not a face model .npz"):
        load_face_model(path)
    with pytest.raises(FaceModelError, match="no such face model"):
        load_face_model(tmp_path / "absent.npz")


# ---------------------------------------------------------------- BFM on generated inputs of the real structure

def _fake_bfm(tmp_path: Path, k: int = 80, exp_k: int = 79) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(0)
    n3 = 3 * BFM_VERTS
    arrays = {
        "shapeMU": (rng.normal(0, 5e4, (n3, 1))).astype(np.float32),   # micrometres
        "shapePC": rng.normal(0, 1e-3, (n3, k)).astype(np.float32),
        "shapeEV": np.linspace(9e5, 1e5, k, dtype=np.float32)[:, None],
        "texMU": rng.uniform(0, 255, (n3, 1)).astype(np.float32),
        "texPC": rng.normal(0, 1e-3, (n3, k)).astype(np.float32),
        "texEV": np.linspace(4e3, 1e3, k, dtype=np.float32)[:, None],
        "tl": np.ones((10, 3), np.float64),  # real files carry more keys; the converter ignores them
    }
    mat = tmp_path / "01_MorphableModel.mat"
    savemat(str(mat), arrays)
    exp_pc = rng.normal(0, 1e-3, (exp_k, 3 * EXP_VERTS)).astype(np.float32)
    exp = tmp_path / "Exp_Pca.bin"
    with open(exp, "wb") as fh:
        np.array([exp_k], np.int32).tofile(fh)
        np.zeros(3 * EXP_VERTS, np.float32).tofile(fh)
        exp_pc.tofile(fh)
    return mat, exp, {**arrays, "exp_pc": exp_pc}


@pytest.fixture(scope="module")
def fake_bfm(tmp_path_factory):
    return _fake_bfm(tmp_path_factory.mktemp("bfm"))


def test_bfm_converter_on_generated_inputs(fake_bfm):
    mat, exp, src = fake_bfm
    model = convert_bfm(mat, exp, AUX_DIR)
    assert (model.n_verts, model.k_id, model.k_exp, model.k_alb) == (FRONT_VERTS, 80, 64, 80)
    assert model.triangles.shape == (70789, 3)
    front_exp = loadmat(str(AUX_DIR / "BFM_front_idx.mat"))["idx"].astype(np.int64).ravel() - 1
    front = loadmat(str(AUX_DIR / "BFM_exp_idx.mat"))["trimIndex"].astype(np.int64).ravel()[front_exp] - 1
    mean_um = src["shapeMU"].reshape(-1, 3)[front].astype(np.float64)
    np.testing.assert_allclose(model.mean_shape, (mean_um - mean_um.mean(0)) * 1e-3, atol=1e-3)
    # id column 3 at vertex 100: PC x EV in micrometres -> mm
    v = 100
    want = src["shapePC"].reshape(-1, 3, 80)[front[v], :, 3] * src["shapeEV"][3, 0] * 1e-3
    np.testing.assert_allclose(model.id_basis[3 * v:3 * v + 3, 3], want, rtol=1e-5)
    std_exp = np.loadtxt(AUX_DIR / "std_exp.txt")
    want = src["exp_pc"][5].reshape(-1, 3)[front_exp[v]] * std_exp[5] * 1e-3
    np.testing.assert_allclose(model.exp_basis[3 * v:3 * v + 3, 5], want, rtol=1e-5)
    np.testing.assert_allclose(model.mean_albedo[v], np.clip(src["texMU"].reshape(-1, 3)[front[v]] / 255, 0, 1),
                               rtol=1e-6)
    keypoints = loadmat(str(AUX_DIR / "facemodel_info.mat"))["keypoints"].astype(np.int64).ravel() - 1
    np.testing.assert_array_equal(model.landmarks, keypoints)
    assert model.mesh468_triangle.shape == (0,) and not model.has_mesh468  # the face_model stage adds it


def test_bfm_converter_rejects_wrong_inputs(fake_bfm, tmp_path):
    mat, exp, _ = fake_bfm
    bad = tmp_path / "bad.mat"
    savemat(str(bad), {"shapeMU": np.zeros((30, 1), np.float32)})
    with pytest.raises(FaceModelError, match="'shapeMU' has shape"):
        convert_bfm(bad, exp, AUX_DIR)
    savemat(str(bad), {"shapeMU": np.zeros((3 * BFM_VERTS, 1), np.float32)})
    with pytest.raises(FaceModelError, match="missing key 'shapePC'"):
        convert_bfm(bad, exp, AUX_DIR)
    short = tmp_path / "Exp_Pca.bin"
    short.write_bytes(np.array([64], np.int32).tobytes() + b"\0" * 100)
    with pytest.raises(FaceModelError, match="Exp_Pca.bin"):
        convert_bfm(mat, short, AUX_DIR)
    text = tmp_path / "text.mat"
    text.write_text("hello")
    with pytest.raises(FaceModelError, match="cannot read as a MATLAB"):
        convert_bfm(text, exp, AUX_DIR)


# ---------------------------------------------------------------- decoder

def test_zero_coefficients_give_the_mean_face(sfm):
    dec = FaceDecoder(sfm)
    out = dec(dec.layout.zeros(2))
    np.testing.assert_allclose(out.verts_model[1].numpy(), sfm.mean_shape, atol=1e-5)
    np.testing.assert_allclose(out.albedo[0].numpy(), sfm.mean_albedo, atol=1e-6)


def test_layout_split_join_and_shape_errors(sfm):
    layout = CoeffLayout.of(sfm)
    assert layout.size == 63 + 6 + 0 + 3 + 27 + 3
    coeffs = torch.randn(4, layout.size)
    parts = layout.split(coeffs)
    assert parts.alb.shape == (4, 0) and parts.sh.shape == (4, 27)
    torch.testing.assert_close(layout.join(parts), coeffs)
    with pytest.raises(ValueError, match=r"expected \(B, 102\)"):
        layout.split(torch.zeros(4, 101))


def test_rotations_are_orthonormal_and_compose():
    angles = torch.randn(64, 3, dtype=torch.float64)
    r = euler_to_rotation(angles)
    eye = torch.eye(3, dtype=torch.float64).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(64, dtype=torch.float64))
    # pure yaw of +90 deg turns +z (the face's front) towards +x
    yaw = euler_to_rotation(torch.tensor([[0.0, math.pi / 2, 0.0]], dtype=torch.float64))[0]
    torch.testing.assert_close(yaw @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
                               torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_dc_only_lighting_is_uniform():
    normals = torch.nn.functional.normalize(torch.randn(2, 500, 3), dim=-1)
    sh = torch.zeros(2, 27)
    sh[:, [0, 9, 18]] = torch.tensor([0.2, 0.1, -0.3])
    shade = sh_shading(normals, sh)
    assert torch.allclose(shade, shade[:, :1].expand_as(shade), atol=1e-6)
    dc = math.pi / math.sqrt(4 * math.pi)  # a0 * c0
    torch.testing.assert_close(shade[0, 0], torch.tensor([1.0, 0.9, 0.5]) * dc)


def test_frontal_face_normals_face_the_camera(sfm):
    dec = FaceDecoder(sfm)
    out = dec(dec.layout.zeros(1))
    nose_normal = out.normals_cam[0, sfm.landmarks[30]]
    assert nose_normal[2] > 0.9
    # a head turned by +30 deg yaw shows its nose tip right of the frontal position
    coeffs = dec.layout.zeros(1)
    dec.layout.split(coeffs).rot[0, 1] = math.radians(30)  # split returns views: this writes the yaw
    turned = dec(coeffs).lmk_px[0, 30, 0]
    assert turned > out.lmk_px[0, 30, 0] + 15  # nose tip ~37 mm before the centre: ~19 px at 30 deg


def test_mean_face_projection_fills_the_crop_like_the_alignment_template(sfm):
    """Zero pose and translation put the landmarks within 6 px of the crop template (docs/conventions.md)."""
    lmk = FaceDecoder(sfm)(CoeffLayout.of(sfm).zeros(1)).lmk_px[0].numpy()
    five = np.stack([lmk[36:42].mean(0), lmk[42:48].mean(0), lmk[30], lmk[48], lmk[54]])
    template = np.array([[80.23, 82.38], [143.60, 82.45], [112.33, 116.71], [86.28, 150.90], [137.34, 150.89]])
    assert np.abs(five - template).max() < 6.0


def test_landmark_only_decoding_matches_the_full_mesh(sfm):
    dec = FaceDecoder(sfm)
    coeffs = torch.randn(3, dec.layout.size) * 0.3
    torch.testing.assert_close(dec.landmark_px(dec.layout.split(coeffs)), dec(coeffs).lmk_px)


def test_projected_landmarks_land_on_the_rendered_pixels_of_their_vertices(sfm):
    from pipeline.render.face import render_face
    dec = FaceDecoder(sfm)
    coeffs = dec.layout.zeros(1)
    dec.layout.split(coeffs).rot[0, 1] = math.radians(15)
    face = render_face(dec, coeffs)
    lmk = face.decoded.lmk_px[0]
    gaps = []
    for i in list(range(17, 68)):  # inner points: fixed vertices, visible at this pose
        x, y = (int(round(float(v))) for v in lmk[i])
        vertex_depth = face.decoded.verts_px[0, sfm.landmarks[i], 2]
        assert face.mask[0, 0, y, x] == 1, i
        gaps.append(abs(float(face.depth[0, 0, y, x] - vertex_depth)))
    # world units (1 = 100 mm): rounding to the pixel centre moves <= 0.7 px, a few mm on steep brow ends;
    # an occluder or the background would be centimetres off
    assert max(gaps) < 0.06 and float(np.median(gaps)) < 0.01, gaps


def test_jaw_landmarks_follow_the_silhouette_of_a_turned_head(sfm):
    from pipeline.render.face import render_face
    dec = FaceDecoder(sfm)
    coeffs = dec.layout.zeros(1)
    dec.layout.split(coeffs).rot[0, 1] = math.radians(40)  # the left jaw (points 9-16) turns away
    face = render_face(dec, coeffs)
    lmk = face.decoded.lmk_px[0]
    static = face.decoded.verts_px[0, sfm.landmarks, :2]
    mask = face.mask[0, 0]
    for j in range(9, 16):
        x, y = float(lmk[j, 0]), int(round(float(lmk[j, 1])))
        outline_x = int(mask[y].nonzero().max())  # rightmost rendered pixel of that row
        assert abs(x - outline_x) < 2.5, (j, x, outline_x)
    assert float((lmk[9:16, 0] - static[9:16, 0]).abs().max()) > 3  # the static vertices are not the outline


def test_saved_bytes_depend_on_the_arrays_only(sfm, tmp_path):
    """DVC hashes outputs: saving the same model twice must give identical files."""
    import time
    save_face_model(sfm, tmp_path / "a.npz")
    time.sleep(2.1)  # zip timestamps have a 2 s resolution
    save_face_model(sfm, tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


# ---------------------------------------------------------------- MediaPipe 468-point correspondence

def _raw(model):
    """The model as a converter returns it: no 468-point correspondence (N = 0)."""
    return replace(model, **no_mesh468())


@pytest.mark.parametrize("corrupt, message", [
    (lambda a: a.update(mesh468_triangle=a["mesh468_triangle"][:100]), "mesh468_triangle: expected 0 or 468"),
    (lambda a: a.update(mesh468_weight=a["mesh468_weight"][:467]), "mesh468_weight: 467 points"),
    (lambda a: a.update(mesh468_triangle=a["mesh468_triangle"].astype(np.int32)), "mesh468_triangle: expected dtype"),
    (lambda a: a["mesh468_triangle"].__setitem__(7, 6736), "mesh468_triangle: triangle indices must lie in"),
    (lambda a: a["mesh468_barycentric"].__setitem__((3, 0), -0.1), "mesh468_barycentric: negative"),
    (lambda a: a["mesh468_barycentric"].__setitem__((3, 0), a["mesh468_barycentric"][3, 0] + 1e-4),
     "mesh468_barycentric: rows must sum to 1"),
    (lambda a: a["mesh468_weight"].__setitem__(0, 1.5), "mesh468_weight: values outside [0, 1]"),
    (lambda a: a["mesh468_barycentric"].__setitem__((0, 0), np.nan), "mesh468_barycentric: contains NaN"),
])
def test_loader_rejects_corrupt_correspondence(sfm, tmp_path, corrupt, message):
    test_loader_rejects_corrupt_files(sfm, tmp_path, corrupt, message)


def test_old_face_model_files_ask_for_a_rerun(sfm, tmp_path):
    arrays = {k: np.array(getattr(sfm, k)) for k in sfm.__dataclass_fields__ if not k.startswith("mesh468_")}
    path = tmp_path / "old.npz"
    np.savez(path, **arrays)
    with pytest.raises(FaceModelError) as err:
        load_face_model(path)
    assert "missing arrays ['mesh468_barycentric', 'mesh468_triangle', 'mesh468_weight']" in str(err.value)
    assert "dvc repro face_model" in str(err.value)


def test_correspondence_survives_saving_and_model_copies(sfm, tmp_path):
    save_face_model(sfm, tmp_path / "m.npz")
    back = load_face_model(tmp_path / "m.npz")
    coloured = sfm.with_albedo(sfm.mean_albedo * 0.5, np.zeros((3 * sfm.n_verts, 1), np.float32), "test")
    for model in (back, coloured):
        for key in MESH468_ARRAYS:
            np.testing.assert_array_equal(getattr(model, key), getattr(sfm, key))
    assert back.has_mesh468 and not _raw(sfm).has_mesh468
    save_face_model(_raw(sfm), tmp_path / "raw.npz")
    assert load_face_model(tmp_path / "raw.npz").mesh468_triangle.shape == (0,)


def test_with_mesh468_adds_only_the_correspondence(sfm):
    raw = _raw(sfm)
    added = with_mesh468(raw, MEDIAPIPE_OBJ)
    for key in raw.__dataclass_fields__:
        if key in MESH468_ARRAYS:
            np.testing.assert_array_equal(getattr(added, key), getattr(sfm, key))  # deterministic
        else:
            assert getattr(added, key) is getattr(raw, key), key
    assert added.mesh468_triangle.shape == (N_MESH468,) and added.mesh468_barycentric.dtype == np.float32


def test_canonical_obj_frame_and_anchor_vertices():
    """The OBJ is in model-space axes (x to the image right, y up, z to the camera, CCW from +z) and each anchor is
    what its name says: the ends of MediaPipe's eye and outer-lip contours (paths of mesh edges), the lowest and
    the most anterior vertex."""
    verts, tris = read_canonical_obj(MEDIAPIPE_OBJ)
    assert verts.shape == (468, 3) and tris.shape == (898, 3)
    np.testing.assert_array_equal(outward_winding(verts, tris), tris)
    edges = {tuple(e) for e in np.sort(tris[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1).tolist()}
    contours = {  # MediaPipe's FACEMESH_RIGHT_EYE / LEFT_EYE / LIPS chains, outer corner first
        (33, 133): [[33, 246, 161, 160, 159, 158, 157, 173, 133], [33, 7, 163, 144, 145, 153, 154, 155, 133]],
        (263, 362): [[263, 466, 388, 387, 386, 385, 384, 398, 362], [263, 249, 390, 373, 374, 380, 381, 382, 362]],
        (61, 291): [[61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291],
                    [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]],
    }
    for (a, b), chains in contours.items():
        for chain in chains:
            assert all(tuple(sorted(e)) in edges for e in zip(chain, chain[1:])), chain
            x = verts[chain, 0]
            assert {chain[int(np.argmin(x))], chain[int(np.argmax(x))]} == {a, b}, chain
    assert verts[33, 0] < verts[133, 0] < 0 < verts[362, 0] < verts[263, 0]  # subject's right eye at image left
    lines = MEDIAPIPE_OBJ.read_text().splitlines()
    uv = np.array([[float(w) for w in line.split()[1:3]] for line in lines if line.startswith("vt ")])
    corners = [w.split("/") for line in lines if line.startswith("f ") for w in line.split()[1:]]
    u = {int(v) - 1: uv[int(t) - 1, 0] for v, t in corners}
    assert u[33] < 0.5 < u[263]  # and so in the texture (canonical_face_model_uv_visualization.png)
    assert verts[61, 0] < 0 < verts[291, 0]
    for right, left in ((33, 263), (133, 362), (61, 291)):
        np.testing.assert_allclose(verts[left], verts[right] * [-1, 1, 1], atol=1e-4)
    assert int(np.argmin(verts[:, 1])) == 152 and int(np.argmax(verts[:, 2])) == 4
    assert set(ANCHORS) == {4, 152, 33, 133, 362, 263, 61, 291}
    assert np.linalg.norm(verts[33] - verts[263]) == pytest.approx(89, abs=1)  # cm in the file, mm here


def test_closest_point_on_triangles_matches_dense_sampling():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(0, 1, (3, 200, 3))
    p = rng.normal(0, 1.5, (200, 3))
    bary = closest_on_triangles(p, a, b, c)
    assert bary.min() >= 0 and np.allclose(bary.sum(1), 1)
    dist = np.linalg.norm(bary[:, :1] * a + bary[:, 1:2] * b + bary[:, 2:] * c - p, axis=1)
    u, v = np.meshgrid(np.linspace(0, 1, 201), np.linspace(0, 1, 201))
    u, v = u[u + v <= 1], v[u + v <= 1]
    samples = (1 - u - v)[None, :, None] * a[:, None] + u[None, :, None] * b[:, None] + v[None, :, None] * c[:, None]
    naive = np.linalg.norm(samples - p[:, None], axis=2).min(1)
    assert np.all(dist <= naive + 1e-12)
    assert np.all(naive - dist < 0.02)  # the grid's spacing: 1/200 of an edge ~ 0.01


def test_closest_surface_points_match_brute_force(sfm):
    rng = np.random.default_rng(1)
    surface = Surface(sfm.mean_shape, sfm.triangles)
    points = sfm.mean_shape[rng.choice(sfm.n_verts, 300)] + rng.normal(0, 6, (300, 3))
    found = surface.closest(points)
    corners = surface.corners
    q = np.repeat(np.arange(len(points)), len(corners))
    t = np.tile(np.arange(len(corners)), len(points))
    bary = closest_on_triangles(points[q], corners[t, 0], corners[t, 1], corners[t, 2])
    naive = np.linalg.norm((bary[:, :, None] * corners[t]).sum(1) - points[q], axis=1).reshape(len(points), -1)
    np.testing.assert_allclose(found.distance, naive.min(1), atol=1e-9)
    np.testing.assert_allclose(found.distance, point_to_mesh_distance(points, sfm.mean_shape, sfm.triangles), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(found.point - points, axis=1), found.distance, atol=1e-9)


@pytest.fixture(scope="module")
def registration(sfm):
    verts, tris = read_canonical_obj(MEDIAPIPE_OBJ)
    return register_canonical(verts, tris, _raw(sfm))


def test_registration_anchors_land_on_their_landmark_vertices(sfm, registration):
    for vertex, ibug in ANCHORS.items():
        target = sfm.mean_shape[sfm.landmarks[ibug]]
        assert np.linalg.norm(registration.surface.point[vertex] - target) < 1.0, (vertex, ibug)  # measured <= 0.3
    # the pure similarity already puts each anchor within a few mm (measured <= 5.3 mm, the outer eye corners)
    for vertex, ibug in ANCHORS.items():
        assert np.linalg.norm(registration.rigid[vertex] - sfm.mean_shape[sfm.landmarks[ibug]]) < 6.0, vertex
    assert registration.scale == pytest.approx(0.94, abs=0.02)  # the canonical face is ~6% larger than SFM's mean


def test_registration_residuals_are_small_where_weighted(sfm, registration):
    """The canonical face after the similarity lies within 1.0 mm (mean; 3.1 mm at the 95th percentile, 5.1 mm
    at most, the upper inner lip over SFM's mouth slit) of the SFM mean surface. A wrong anchor (e.g. a swapped
    eye) would tilt or flip the fit and leave many points centimetres off."""
    w = registration.weight
    rigid = registration.rigid_surface.distance[w > 0]
    assert w.min() > 0.95 and (w == 1).sum() >= 460  # SFM's mesh (ears to neck) covers the whole canonical face
    assert rigid.mean() < 1.5 and np.percentile(rigid, 95) < 4.0 and rigid.max() < 6.0
    final = registration.surface.distance[w > 0]  # after the smooth non-rigid step (measured mean 0.6, max 3.0)
    assert final.mean() < 1.0 and final.max() < 4.0
    assert np.all(final <= registration.rigid_surface.distance[w > 0] + 1.0)


def test_registered_correspondence_is_valid_barycentric(sfm):
    bary = sfm.mesh468_barycentric.astype(np.float64)
    assert bary.shape == (468, 3) and bary.min() >= 0 and np.abs(bary.sum(1) - 1).max() < 1e-6
    assert sfm.mesh468_triangle.min() >= 0 and sfm.mesh468_triangle.max() < len(sfm.triangles)
    assert 0 <= sfm.mesh468_weight.min() and sfm.mesh468_weight.max() == 1


def test_points_beyond_the_model_mesh_get_zero_weight(sfm):
    """A model cut above the brows (y > 45 mm) has no counterpart for MediaPipe's forehead points."""
    tris = sfm.triangles[sfm.mean_shape[sfm.triangles][:, :, 1].max(1) < 45.0]
    cut = replace(_raw(sfm), triangles=tris)
    verts, canon_tris = read_canonical_obj(MEDIAPIPE_OBJ)
    reg = register_canonical(verts, canon_tris, cut)
    forehead = [10, 151, 9, 109, 338, 67, 297]
    assert np.all(reg.weight[forehead] == 0)
    below = reg.rigid[:, 1] < 30.0  # well inside the cut mesh
    assert reg.weight[below].min() > 0.95
    assert 0 < (reg.weight == 0).sum() < 150


# ---------------------------------------------------------------- decoding the 468 points and the 3D landmarks

def test_mesh468_and_landmark3d_match_the_full_decode(sfm):
    dec = FaceDecoder(sfm)
    coeffs = torch.randn(3, dec.layout.size, generator=torch.Generator().manual_seed(0)) * 0.3
    c = dec.layout.split(coeffs)
    out = dec(coeffs)
    px = out.verts_px[..., :2].numpy().astype(np.float64)
    corners = sfm.triangles[sfm.mesh468_triangle]
    naive = (px[:, corners] * sfm.mesh468_barycentric[None, :, :, None]).sum(2)
    np.testing.assert_allclose(dec.mesh468_px(c).numpy(), naive, atol=2e-3)
    np.testing.assert_allclose(dec.landmark3d_px(c).numpy(), px[:, sfm.landmarks], atol=2e-3)
    # the exact projection of the interpolated 3D point is within 0.01 px of the interpolated projections
    cam = (out.verts_cam.numpy().astype(np.float64)[:, corners] * sfm.mesh468_barycentric[None, :, :, None]).sum(2)
    exact = project(torch.from_numpy(cam), dec.camera)[..., :2].numpy()
    assert np.abs(exact - naive).max() < 0.01


def test_mesh468_and_landmark3d_gradients(sfm):
    dec = FaceDecoder(sfm).double()
    base = dec.layout.zeros(2, dtype=torch.float64)
    picks = [0, 5, dec.layout.k_id + 1, dec.layout.size - 33, dec.layout.size - 31, dec.layout.size - 3,
             dec.layout.size - 1]  # id 0, id 5, exp 1, pitch, roll, x and z translation

    def through(fn):
        def f(x):
            return fn(dec.layout.split(base.index_put((torch.arange(2)[:, None], torch.tensor(picks)), x)))
        return f

    x = torch.randn(2, len(picks), dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.2
    x.requires_grad_(True)
    assert dec.mesh468_barycentric.dtype == torch.float64
    # fast mode: random projections of the (B, 468, 2) outputs instead of one backward pass per output
    assert torch.autograd.gradcheck(through(dec.mesh468_px), (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(through(dec.landmark3d_px), (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_mesh468_needs_a_correspondence(sfm):
    dec = FaceDecoder(_raw(sfm))
    assert not dec.has_mesh468 and dec.mesh468_weight.shape == (0,)
    with pytest.raises(ValueError, match="no MediaPipe 468-point correspondence.*dvc repro face_model"):
        dec.mesh468_px(dec.layout.split(dec.layout.zeros(1)))
    FaceDecoder(sfm).load_state_dict(dec.state_dict())  # the correspondence is not decoder state


def test_mesh468_points_of_a_frontal_mean_face_look_like_a_face(sfm):
    dec = FaceDecoder(sfm)
    c = dec.layout.split(dec.layout.zeros(1))
    pts, lmk = dec.mesh468_px(c)[0].numpy(), dec.landmark3d_px(c)[0].numpy()
    for vertex, ibug in ANCHORS.items():
        assert np.linalg.norm(pts[vertex] - lmk[ibug]) < 1.0, (vertex, ibug)  # measured <= 0.3 px (~1 px per mm)
    x, y = pts[:, 0], pts[:, 1]
    assert 2 < pts[1, 1] - lmk[30, 1] < 8  # MediaPipe's point 1 sits on the underside of the nose tip (4.8 px)
    for contour, ibug in (([159, 145, 33, 133], range(36, 42)), ([386, 374, 263, 362], range(42, 48))):
        assert np.linalg.norm(pts[contour].mean(0) - lmk[list(ibug)].mean(0)) < 3.5  # eye centres (2.6 px)
    # mid upper/lower lids: measured 5.1 / 3.6 px. The fitted inner landmarks (sfm.FITTED_INNER_LANDMARKS) follow
    # 300-W's lids on fitted faces; on the mean face, whose eyes open wider, they sit above MediaPipe's lid points.
    for lid, ibug in ((159, [37, 38]), (145, [40, 41]), (386, [43, 44]), (374, [46, 47])):
        assert np.linalg.norm(pts[lid] - lmk[ibug].mean(0)) < 6.0, lid
    assert y[159] < y[145] and y[386] < y[374]
    assert y[10] < y[9] < y[168] < y[4] < y[0] < y[17] < y[152]  # forehead, brows, bridge, tip, lips, chin
    assert np.abs(x[[10, 9, 168, 4, 0, 17, 152]] - lmk[[27, 30, 33, 8]][:, 0].mean()).max() < 1.5  # on the midline
    outline = lmk[:17]
    # MediaPipe's face oval spans the jaw outline (measured within 0.8 px), its lowest point is the chin
    assert np.abs([x.min() - outline[:, 0].min(), x.max() - outline[:, 0].max()]).max() < 3.0
    assert abs(y.max() - lmk[8, 1]) < 1.0
    left = x > lmk[30, 0]
    assert 200 < left.sum() < 268  # the 468 points are left/right symmetric about the nose


@pytest.mark.parametrize("source", ["sfm", "ict"])
def test_face_model_stage_writes_the_correspondence(source, request, tmp_path, monkeypatch):
    """The stages face_model and face_model_ict (--source ict) write the model the fixtures build (fitted
    landmarks by params.yaml's face_model.landmarks)."""
    import yaml
    from stages import face_model as stage
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    p = params["face_model"]
    assert (REPO_ROOT / p["mediapipe_obj"]).resolve() == MEDIAPIPE_OBJ.resolve()
    assert p["landmarks"] == "fitted"
    for key in ("sfm_dir", "bfm_aux_dir", "mediapipe_obj", "ict_source"):
        p[key] = str((REPO_ROOT / p[key]).resolve())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"face_model": p}))
    out = tmp_path / "face_model.npz"
    monkeypatch.setattr("sys.argv", ["face_model", "--params", str(tmp_path / "params.yaml"), "--out", str(out),
                                     "--source", source])
    stage.main()
    written, expected = load_face_model(out), request.getfixturevalue(source)
    for key in written.__dataclass_fields__:
        a, b = getattr(written, key), getattr(expected, key)
        assert a == b if isinstance(a, str) else np.array_equal(a, b), key


@pytest.fixture(scope="module", params=["sfm", "ict"])
def landmark_choices(request):
    """(name, the model with its fitted inner landmarks as the face_model stage builds it, the same model with its
    files' landmarks): the SFM's ibug_to_sfm.txt and ICT's README Multi-PIE list. Both carry the 468-point
    correspondence, so that a fit of either uses the same terms and only the landmark table differs."""
    if request.param == "sfm":
        file = convert_sfm(SFM_DIR, AUX_DIR, ALBEDO, landmarks="model_file")
    else:
        file = ict_face_model(request.getfixturevalue("ict_data"), ALBEDO, "narrow", landmarks="model_file")
    return request.param, request.getfixturevalue(request.param), with_mesh468(file, MEDIAPIPE_OBJ)


def test_fitted_inner_landmarks_move_only_inner_points_nearby(landmark_choices):
    name, fitted, file = landmark_choices
    assert np.array_equal(fitted.mean_shape, file.mean_shape) and np.array_equal(fitted.triangles, file.triangles)
    assert np.array_equal(fitted.landmarks[:17], file.landmarks[:17]), "the jaw keeps its contour vertices"
    moved_mm = np.linalg.norm(fitted.mean_shape[fitted.landmarks] - fitted.mean_shape[file.landmarks], axis=1)
    assert moved_mm.max() < 8.0, "the derivation searches 8 mm around the file's vertices"
    assert (moved_mm[17:] > 0).sum() >= 10  # measured: SFM 25, ICT 13 of the 51 inner points moved
    # left-right symmetric: of a mirrored pair, the higher-numbered point's vertex is the one nearest the mirror
    # image of the lower's; midline points stay within 1 mm of the midline
    mean_mm = fitted.mean_shape.astype(np.float64)
    pairs = [(k, IBUG_FLIP[k]) for k in range(17, 68) if IBUG_FLIP[k] > k]
    _, mirror = cKDTree(mean_mm).query(mean_mm[fitted.landmarks[[k for k, _ in pairs]]] * [-1.0, 1.0, 1.0])
    assert np.array_equal(mirror, fitted.landmarks[[j for _, j in pairs]]), name
    assert np.abs(mean_mm[fitted.landmarks[[k for k in range(17, 68) if IBUG_FLIP[k] == k]], 0]).max() < 1.0, name
    with pytest.raises(ValueError, match="fitted"):
        if name == "sfm":
            convert_sfm(SFM_DIR, AUX_DIR, ALBEDO, landmarks="dlib")
        else:
            convert_ict(ICT_ARCHIVE, ALBEDO, "narrow", landmarks="dlib")


def test_fitted_inner_landmarks_reach_held_out_annotations_closer(landmark_choices):
    """The model's own landmarks fitted to the annotated photos' ground truth (held out: the tables were derived on
    the sample photos against dlib): the fitted vertices get closer than the files' on average. SFM: on every
    photo (measured inner NME 1.64 -> 1.30 % on the four, each photo 0.26-0.48 lower). ICT, whose README vertices
    were closer to start with, and whose table is chosen for the pipeline's fit: level in this bare fit (measured
    1.143 -> 1.145 %; einstein 1.20 -> 1.29, the others lower or level), so it may not lose more than 0.15 points
    on a photo or 2 % on average. The tables are chosen for the pipeline's fit, not this bare landmark fit: the
    next test scores that."""
    name, fitted, file = landmark_choices
    notes = find_annotations(ANNOTATED, ANNOTATED)
    assert len(notes) >= 4
    gt_crop = np.stack([transform_points(a.lmk_px, fit_similarity(five_points(a.lmk_px), TEMPLATE_5PT_PX))
                        for a in notes.values()])
    nme = {}
    for choice, model in [("fitted", fitted), ("file", file)]:
        decoder = FaceDecoder(model)
        coeffs = fit_to_landmarks(decoder, decoder.layout.zeros(len(gt_crop), torch.device("cpu")),
                                  torch.tensor(gt_crop, dtype=torch.float32), torch.ones(68), 600, 5.0e-2,
                                  landmark_weight=1.0, coefficient_weight=1.0e-3)
        with torch.no_grad():
            lmk = decoder.landmark_px(decoder.layout.split(coeffs)).double().numpy()
        nme[choice] = landmark_nme(lmk, gt_crop, INNER_POINTS)
    if name == "sfm":
        assert np.all(nme["fitted"] < nme["file"] - 0.001), nme
        assert nme["fitted"].mean() < 0.9 * nme["file"].mean(), nme
    else:
        assert np.all(nme["fitted"] < nme["file"] + 0.0015), nme
        assert nme["fitted"].mean() < 1.02 * nme["file"].mean(), nme


def test_fitted_inner_landmarks_bring_the_pipelines_fit_closer_to_held_out_annotations(landmark_choices,
                                                                                       annotated_faces):
    """What the tables were derived for (scripts/derive_landmarks.py): the landmarks the reconstruct stage's fit
    outputs, scored on the held-out annotated photos, get closer to the ground truth with the fitted vertices.
    Both models as converted (uniform albedo, as model_comparison fits them, with the 468-point correspondence so
    that only the landmark table differs), 50 full-loss steps, the fit's own point weights and params.yaml's masks
    (the ungated mesh). Measured inner NME, file's -> fitted: SFM 3.10 -> 2.56 %, each photo 0.28-0.81 points
    lower; ICT 3.69 -> 3.29 %, each photo 0.33-0.54 lower (its table re-derived under the mesh masks: the one
    chosen under the skin masks measured 3.48 %, breakingbad level and takeo 0.10 higher)."""
    name, fitted, file = landmark_choices
    faces, notes, reconstruct = annotated_faces
    fit = FitSettings.from_params({**reconstruct, "full_steps": 50})
    nme = {choice: annotated_inner_nme(model, faces, notes, fit)
           for choice, model in [("fitted", fitted), ("file", file)]}
    assert np.all(nme["fitted"] < nme["file"]), (name, nme)
    assert nme["fitted"].mean() < (0.9 if name == "sfm" else 0.95) * nme["file"].mean(), (name, nme)
