"""Face model format, SFM and BFM converters, decoder."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

from pipeline.face_model import (CoeffLayout, FaceDecoder, FaceModelError, euler_to_rotation, load_face_model,
                                 save_face_model, sh_shading)
from pipeline.face_model.bfm import BFM_VERTS, EXP_VERTS, FRONT_VERTS, convert_bfm
from pipeline.face_model.sfm import similarity_fit
from conftest import AUX_DIR


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
