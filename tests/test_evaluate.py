"""Evaluation metrics on inputs with hand-computable answers, ground-truth readers, the eos peer and the
evaluate stage on fabricated reconstruction tables."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import trimesh
import yaml
from scipy.io import savemat
from scipy.spatial.transform import Rotation

from pipeline.evaluate.annotations import (IMAGE_SUFFIXES, Annotation, find_annotations, read_aflw2000_mat,
                                           read_annotation, read_pts)
from pipeline.evaluate.benchmark import (MIN_FACE_IOU, add_peer_scores, add_surface_scores, annotated_metrics,
                                         annotated_scores, synthetic_metrics, synthetic_scores)
from pipeline.evaluate.eos_baseline import EosFit, EosFitter
from pipeline.evaluate.metrics import (INNER_POINTS, aligned_vertex_error, landmark_nme, masked_psnr,
                                       region_error_stats, weighted_procrustes)
from pipeline.evaluate.now import closest_points_on_triangles, point_to_mesh_distance, scan_to_mesh_distance
from pipeline.face_model import CoeffLayout, FaceDecoder, save_face_model
from conftest import SHARED, SFM_DIR

ANNOTATED = SHARED / "samples" / "annotated"
NOW_LANDMARKS = [36, 39, 42, 45, 33, 48, 54]  # eye corners, nose tip, mouth corners (iBUG, 0-based)


def random_rigid(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return Rotation.random(random_state=seed).as_matrix(), rng.uniform(-50, 50, 3)


# ---------------------------------------------------------------- landmark NME

def box_landmarks() -> np.ndarray:
    """68 points spanning exactly a 10 x 20 px box (corners included)."""
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(0, 10, 68), rng.uniform(0, 20, 68)])
    pts[:4] = [[0, 0], [10, 0], [0, 20], [10, 20]]
    return pts + [100.0, 50.0]


def test_nme_uniform_shift_on_a_10_by_20_box():
    gt = box_landmarks()
    shifted = gt + [0.6, 0.8]            # 1 px for every point
    doubled = gt + [0.0, 2.0]            # 2 px for every point
    nme = landmark_nme(np.stack([shifted, doubled, gt]), np.stack([gt, gt, gt]))
    assert nme == pytest.approx([1 / math.sqrt(200), 2 / math.sqrt(200), 0.0])


def test_nme_averages_points_and_rejects_bad_shapes():
    gt = box_landmarks()
    pred = gt.copy()
    pred[:34] += [3.0, 4.0]              # half the points off by 5 px -> mean error 2.5 px
    assert landmark_nme(pred[None], gt[None])[0] == pytest.approx(2.5 / math.sqrt(200))
    with pytest.raises(ValueError, match="pred_px"):
        landmark_nme(pred[None, :60], gt[None])
    with pytest.raises(ValueError, match="empty bounding box"):
        landmark_nme(gt[None], np.zeros((1, 68, 2)))


def test_inner_nme_matches_a_naive_reference_normalised_by_all_68_points():
    rng = np.random.default_rng(1)
    gt = rng.uniform(0, 200, (3, 68, 2))
    pred = gt + rng.normal(0, 4.0, gt.shape)
    reference = []
    for p, g in zip(pred, gt):  # AFLW2000-3D: the box of all 68 ground-truth points, even for the inner 51
        w, h = g[:, 0].max() - g[:, 0].min(), g[:, 1].max() - g[:, 1].min()
        reference.append(sum(math.hypot(*(p[i] - g[i])) for i in range(17, 68)) / 51 / math.sqrt(w * h))
    assert len(INNER_POINTS) == 51
    assert landmark_nme(pred, gt, INNER_POINTS) == pytest.approx(reference, rel=1e-12)
    nan_pred = pred.copy()
    nan_pred[1] = np.nan  # a source that did not run on face 1
    nme = landmark_nme(nan_pred, gt, INNER_POINTS)
    assert np.isnan(nme[1]) and nme[[0, 2]] == pytest.approx(np.array(reference)[[0, 2]])


# ---------------------------------------------------------------- ground-truth readers

def test_pts_reader_converts_1_based_to_0_based():
    pts = read_pts(ANNOTATED / "image_0010.pts")
    assert pts.shape == (68, 2)
    # The file's first and last lines read "611.284152 272.773913" and "677.532790 409.255983".
    assert pts[0] == pytest.approx([610.284152, 271.773913])
    assert pts[67] == pytest.approx([676.532790, 408.255983])


@pytest.mark.parametrize("text, message", [
    ("n_points: 2\n{\n1 2\n3 4\n}\n", "header"),
    ("version: 1\nn_points: 3\n{\n1 2\n3 4\n}\n", "3 point lines"),
    ("version: 1\nn_points: 2\n{\n1 2\n3 x\n}\n", "not two numbers"),
])
def test_pts_reader_rejects_malformed_files(tmp_path, text, message):
    path = tmp_path / "bad.pts"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_pts(path)


def test_aflw2000_reader_on_a_generated_file(tmp_path):
    i = np.arange(68, dtype=np.float64)
    savemat(tmp_path / "face.mat", {"pt3d_68": np.stack([i + 1, 2 * i + 1, -i]), "Pose_Para": np.zeros((1, 7))})
    pts = read_aflw2000_mat(tmp_path / "face.mat")
    assert pts == pytest.approx(np.column_stack([i, 2 * i]))
    savemat(tmp_path / "wrong.mat", {"pt3d_68": np.zeros((2, 68))})
    with pytest.raises(ValueError, match=r"pt3d_68: expected shape \(3, 68\)"):
        read_aflw2000_mat(tmp_path / "wrong.mat")


def test_find_annotations_pairs_images_by_stem(tmp_path):
    images, notes = tmp_path / "images", tmp_path / "notes"
    (images / "sub").mkdir(parents=True)
    notes.mkdir()
    for name in ("a.png", "sub/b.jpg", "c.jpg"):
        (images / name).write_bytes(b"")
    i = np.arange(68, dtype=np.float64)
    savemat(notes / "a.mat", {"pt3d_68": np.stack([i + 1, i + 1, i])})
    (notes / "b.pts").write_text((ANNOTATED / "image_0010.pts").read_text())
    (notes / "orphan.pts").write_text((ANNOTATED / "image_0010.pts").read_text())
    found = find_annotations(images, notes)
    assert set(found) == {images / "a.png", images / "sub" / "b.jpg"}
    assert found[images / "a.png"].format == "mat" and found[images / "a.png"].lmk_px[5] == pytest.approx([5.0, 5.0])
    assert found[images / "sub" / "b.jpg"].format == "pts"
    assert found[images / "sub" / "b.jpg"].lmk_px == pytest.approx(read_pts(ANNOTATED / "image_0010.pts"))
    with pytest.raises(ValueError, match="unknown annotation format"):
        read_annotation(images / "a.png")


def annotated_photos() -> dict:
    """{image path: its .pts path} for every image of the shared annotated folder with a NAME.pts beside it."""
    return {p: p.with_suffix(".pts") for p in sorted(ANNOTATED.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".pts").is_file()}


def test_find_annotations_on_the_shared_folder():
    photos = annotated_photos()
    assert len(photos) > 1  # several photos, some with a second, unannotated face (shared/README.md)
    found = find_annotations(ANNOTATED, ANNOTATED)
    assert set(found) == set(photos)
    for image, note in photos.items():
        assert found[image].format == "pts" and found[image].lmk_px == pytest.approx(read_pts(note))


# ---------------------------------------------------------------- masked PSNR

def test_masked_psnr_counts_only_masked_pixels():
    photo = np.full((2, 3, 4, 4), 0.5)
    render = photo.copy()
    mask = np.zeros((2, 1, 4, 4))
    mask[:, :, :2] = 1.0
    render[0, :, :2] += 0.1              # face 0: error 0.1 on the mask -> MSE 0.01 -> 20 dB
    render[0, :, 2:] = 1.0               # huge errors outside the mask must not count
    render[1, :, 0] += 0.1               # face 1: half the masked pixels 0.1 off, half 0.3 -> MSE 0.05
    render[1, :, 1] += 0.3
    psnr = masked_psnr(render, photo, mask)
    assert psnr == pytest.approx([20.0, 10 * math.log10(20.0)])
    assert np.isnan(masked_psnr(render[:1], photo[:1], np.zeros((1, 1, 4, 4))))[0]
    # float32 images (as rendered) give the float64 answer: the sums are float64
    assert masked_psnr(*(x.astype(np.float32) for x in (render, photo, mask))) == pytest.approx(psnr, rel=1e-6)
    # torch tensors (a render batch on its device) give the same answer
    tensors = [torch.from_numpy(x.astype(np.float32)) for x in (render, photo, mask)]
    assert masked_psnr(*tensors) == pytest.approx(psnr, rel=1e-6)
    with pytest.raises(ValueError, match="mask"):
        masked_psnr(render, photo, mask[:, :, :3])
    with pytest.raises(ValueError, match="mask"):
        masked_psnr(tensors[0], tensors[1], tensors[2][:, :, :3])
    assert masked_psnr(tensors[0].requires_grad_(), *tensors[1:]) == pytest.approx(psnr, rel=1e-6)  # a live render
    with pytest.raises(ValueError, match="not a mix"):
        masked_psnr(tensors[0], photo, mask)


@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_psnr_float32_sums_match_float64_on_full_size_renders(channels_last):
    rng = np.random.default_rng(0)
    render, photo = (rng.random((4, 3, 224, 224)).astype(np.float32) for _ in range(2))
    mask = (rng.random((4, 1, 224, 224)) < 0.6).astype(np.float32) * rng.random((4, 1, 224, 224)).astype(np.float32)
    exact = masked_psnr(*(x.astype(np.float64) for x in (render, photo, mask)))
    tensors = [torch.from_numpy(x) for x in (render, photo, mask)]
    if channels_last:  # the layout of renders and decoded photos
        tensors = [x.contiguous(memory_format=torch.channels_last) for x in tensors]
    assert masked_psnr(*tensors) == pytest.approx(exact, rel=1e-6)


# ---------------------------------------------------------------- aligned vertex error

def test_vertex_error_is_zero_for_a_rigid_copy_and_similarity_removes_scale(sfm):
    gt = sfm.mean_shape.astype(np.float64)
    rot, t = random_rigid(1)
    moved = gt @ rot.T + t
    weights = sfm.face_region
    assert aligned_vertex_error(moved, gt, weights, "rigid").max() < 1e-6
    scaled = 1.3 * moved
    assert aligned_vertex_error(scaled, gt, weights, "rigid").mean() > 1.0
    assert aligned_vertex_error(scaled, gt, weights, "similarity").max() < 1e-6
    s, r, _ = weighted_procrustes(scaled, gt, weights, "similarity")
    assert s == pytest.approx(1 / 1.3) and r == pytest.approx(rot.T, abs=1e-9)


def test_vertex_error_equals_a_non_rigid_offset():
    # An expanded sphere: no rotation or translation can undo a uniform growth of the radius by d.
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=50.0).vertices
    d = 2.5
    grown = sphere * (50.0 + d) / 50.0
    weights = np.ones(len(sphere))
    assert aligned_vertex_error(grown, sphere, weights, "rigid") == pytest.approx(np.full(len(sphere), d))
    assert aligned_vertex_error(grown, sphere, weights, "similarity").max() < 1e-9


def test_zero_weight_vertices_do_not_move_the_alignment(sfm):
    gt = sfm.mean_shape.astype(np.float64)
    rot, t = random_rigid(2)
    pred = gt @ rot.T + t
    pred[10] += rot @ [0.0, 0.0, 7.0]   # one displaced vertex, excluded from the alignment
    weights = np.ones(len(gt))
    weights[10] = 0.0
    err = aligned_vertex_error(pred, gt, weights)
    assert err[10] == pytest.approx(7.0) and np.delete(err, 10).max() < 1e-6
    assert region_error_stats(err, weights) == pytest.approx((0.0, 0.0), abs=1e-6)
    with pytest.raises(ValueError, match="mode"):
        aligned_vertex_error(pred, gt, weights, "affine")


def test_region_error_stats_weighted_mean_and_median():
    assert region_error_stats(np.array([1.0, 2.0, 3.0, 10.0]), np.array([1, 1, 1, 0])) == (2.0, 2.0)
    assert region_error_stats(np.array([3.0, 1.0, 2.0]), np.array([2.0, 1.0, 1.0])) == (2.25, 2.0)
    with pytest.raises(ValueError, match="weights"):
        region_error_stats(np.ones(3), np.zeros(3))


# ---------------------------------------------------------------- NoW-style scan-to-mesh

def test_closest_point_on_a_triangle_in_every_region():
    a, b, c = np.array([0.0, 0, 0]), np.array([1.0, 0, 0]), np.array([0.0, 1, 0])
    cases = {  # query point -> closest point
        (-1, -1, 1): (0, 0, 0), (2, -1, 0): (1, 0, 0), (-1, 2, 0): (0, 1, 0),          # vertex regions
        (0.5, -1, 3): (0.5, 0, 0), (-1, 0.5, 0): (0, 0.5, 0), (1, 1, -2): (0.5, 0.5, 0),  # edge regions
        (0.2, 0.3, 5): (0.2, 0.3, 0),                                                   # face interior
    }
    pts = np.array(list(cases), np.float64)
    n = len(pts)
    out = closest_points_on_triangles(pts, np.tile(a, (n, 1)), np.tile(b, (n, 1)), np.tile(c, (n, 1)))
    assert out == pytest.approx(np.array(list(cases.values()), np.float64))


def plane_mesh() -> tuple[np.ndarray, np.ndarray]:
    """The square [-10, 10]^2 at z = 0 as a 5 x 5 vertex grid (32 triangles), mm."""
    g = np.linspace(-10, 10, 5)
    x, y = np.meshgrid(g, g)
    verts = np.column_stack([x.ravel(), y.ravel(), np.zeros(25)])
    quads = [(r * 5 + k, r * 5 + k + 1, (r + 1) * 5 + k, (r + 1) * 5 + k + 1) for r in range(4) for k in range(4)]
    tris = np.array([t for q in quads for t in ((q[0], q[1], q[3]), (q[0], q[3], q[2]))])
    return verts, tris


def test_scan_of_a_plane_offset_by_d_after_a_rigid_motion():
    verts, tris = plane_mesh()
    rng = np.random.default_rng(3)
    d = 1.7
    inside = np.column_stack([rng.uniform(-10, 10, (200, 2)), np.full(200, d)])
    outside = np.array([[13.0, 0.0, 0.0], [13.0, 14.0, 0.0]])      # beyond an edge (3 mm) and a corner (5 mm)
    lmk_idx = [0, 4, 20, 24, 12]
    rot, t = random_rigid(4)
    scan = np.concatenate([inside, outside]) @ rot.T + t
    dist = scan_to_mesh_distance(scan, verts, tris, verts[lmk_idx] @ rot.T + t, verts[lmk_idx])
    assert dist == pytest.approx(np.concatenate([np.full(200, d), [3.0, 5.0]]), abs=1e-9)


def test_point_to_sphere_mesh_distances_are_exact():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    verts, tris = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    corners = verts[tris]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    centroids = corners.mean(1)
    # Convex mesh: a point h above a face's centroid along its normal is h from the surface; a vertex is on it;
    # the centre is as far as the nearest face plane.
    h = 0.75
    pts = np.concatenate([centroids[:50] + h * normals[:50], 2 * verts[:20], np.zeros((1, 3))])
    expected = np.concatenate([np.full(50, h), np.ones(20), [np.abs((normals * corners[:, 0]).sum(1)).min()]])
    assert point_to_mesh_distance(pts, verts, tris) == pytest.approx(expected, abs=1e-9)


def test_pruned_search_matches_brute_force(sfm):
    rng = np.random.default_rng(5)
    verts, tris = sfm.mean_shape.astype(np.float64), sfm.triangles
    pts = verts[rng.integers(len(verts), size=150)] + rng.normal(0, 8.0, (150, 3))
    corners = verts[tris]
    p = np.repeat(pts, len(tris), axis=0)
    brute = np.linalg.norm(closest_points_on_triangles(p, *(np.tile(corners[:, k], (150, 1)) for k in range(3))) - p,
                           axis=1).reshape(150, -1).min(1)
    assert point_to_mesh_distance(pts, verts, tris) == pytest.approx(brute, abs=1e-9)


def test_scan_of_a_transformed_sfm_mean_is_at_zero_distance(sfm):
    mesh = sfm.mean_shape.astype(np.float64)
    lmk = mesh[sfm.landmarks[NOW_LANDMARKS]]
    rot, t = random_rigid(6)
    dist = scan_to_mesh_distance(mesh @ rot.T + t, mesh, sfm.triangles, lmk @ rot.T + t, lmk)
    assert dist.max() < 1e-6
    # A scan 10% larger: rigid alignment leaves millimetres; similarity alignment removes the scale.
    big = 1.1 * (mesh @ rot.T) + t
    assert scan_to_mesh_distance(big, mesh, sfm.triangles, 1.1 * (lmk @ rot.T) + t, lmk).mean() > 1.0
    assert scan_to_mesh_distance(big, mesh, sfm.triangles, 1.1 * (lmk @ rot.T) + t, lmk, "similarity").max() < 1e-6


# ---------------------------------------------------------------- eos peer

@pytest.fixture(scope="module")
def eos_fitter(sfm):
    return EosFitter(SFM_DIR, sfm.landmarks)


def synthetic_faces(sfm, seeds: list[int], yaw_deg: float = 20.0):
    """Decoded random identities (no expression) at a yaw: (verts_model (N, V, 3) mm, lmk_px (N, 68, 2) px)."""
    decoder = FaceDecoder(sfm)
    layout = CoeffLayout.of(sfm)
    coeffs = layout.zeros(len(seeds))
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        coeffs[i, :layout.k_id] = torch.randn(layout.k_id, generator=g)
    coeffs[:, layout.k_id + layout.k_exp + layout.k_alb + 1] = math.radians(yaw_deg)
    with torch.no_grad():
        out = decoder(coeffs)
    return out.verts_model.numpy().astype(np.float64), out.lmk_px.numpy().astype(np.float64)


def test_eos_recovers_synthetic_shapes_better_than_the_mean_face(sfm, eos_fitter):
    """Landmarks of 16 known SFM identities (N(0, 1)), projected orthographically (eos's camera model, so any error
    is the fit's) at 3 px/mm, yaw 0 and 20 degrees. 2D landmarks leave most of the depth unconstrained and eos's
    prior (lambda 30) shrinks the identity strongly, so the gain over the mean face is modest (measured: about
    12%): it is asserted on the average; per face, eos must reproduce the input landmarks and the yaw."""
    rng = np.random.default_rng(8)
    w = sfm.face_region
    px_per_mm, size = 3.0, 672
    eos_err, mean_err = [], []
    for k in range(16):
        gt = sfm.mean_shape + (sfm.id_basis @ rng.normal(0.0, 1.0, sfm.k_id)).reshape(-1, 3)
        yaw_deg = 20.0 * (k % 2)
        v = gt[sfm.landmarks] @ Rotation.from_euler("y", yaw_deg, degrees=True).as_matrix().T
        lmk = size / 2 + px_per_mm * np.column_stack([v[:, 0], -v[:, 1]])   # image y points down
        fit = eos_fitter.fit(lmk, size, size)
        assert fit.verts_mm.shape == (3448, 3) and fit.seconds > 0
        # Our jaw landmarks are fixed vertices, eos slides them to the silhouette: a few degrees of yaw bias.
        assert abs(fit.yaw_deg - yaw_deg) < 10.0
        assert landmark_nme(fit.lmk_px[None], lmk[None])[0] < 0.03
        eos_err.append(region_error_stats(aligned_vertex_error(fit.verts_mm, gt, w), w)[0])
        mean_err.append(region_error_stats(aligned_vertex_error(sfm.mean_shape, gt, w), w)[0])
    assert np.mean(eos_err) < 0.95 * np.mean(mean_err), (np.mean(eos_err), np.mean(mean_err))


def test_eos_rejects_bad_landmarks(eos_fitter):
    with pytest.raises(ValueError, match="lmk_px"):
        eos_fitter.fit(np.zeros((5, 2)), 224, 224)


# ---------------------------------------------------------------- benchmark tables and the evaluate stage

def truth_and_reconstructions(sfm, rot_seed: int = 7):
    """Two synthetic truth rows; a reconstruction table with file 0 reconstructed twice (the real face: a rigidly
    moved exact mesh, landmarks 1 px off; a false detection far away) and file 1 missed."""
    gt_mm, lmk = synthetic_faces(sfm, [21, 22])
    rot, t = random_rigid(rot_seed)
    truth = pd.DataFrame({"file": ["synth_0000.png", "synth_0001.png"], "yaw_deg": [20.0, 20.0],
                          "verts_model": [g.reshape(-1).astype(np.float32) for g in gt_mm],
                          "lmk_px": [l.reshape(-1).astype(np.float32) for l in lmk], "canvas_px": [224, 224]})
    real = {"source": "data/synth/images/synth_0000.png", "verts_model": (gt_mm[0] @ rot.T + t).reshape(-1),
            "lmk_px": (lmk[0] + [0.6, 0.8]).reshape(-1), "dlib_lmk_px": (lmk[0] + [0.0, 2.0]).reshape(-1),
            "masked_psnr": 30.0}
    false = dict(real, verts_model=sfm.mean_shape.reshape(-1), dlib_lmk_px=(lmk[0] + 150.0).reshape(-1),
                 lmk_px=(lmk[0] + 150.0).reshape(-1), masked_psnr=5.0)
    return truth, pd.DataFrame([false, real]), gt_mm, lmk


def box_nme(lmk: np.ndarray, shift_px: float) -> float:
    w, h = lmk.max(0) - lmk.min(0)
    return shift_px / math.sqrt(w * h)


def test_synthetic_scores_pick_the_matching_face_and_count_misses(sfm):
    truth, recon, gt_mm, lmk = truth_and_reconstructions(sfm)
    scores = synthetic_scores(truth, recon, sfm.mean_shape, sfm.face_region, "rigid")
    assert list(scores["file"]) == ["synth_0000.png"] and scores["recon_row"].tolist() == [1]
    row = scores.iloc[0]
    assert row["err_mm"] < 1e-5 and row["err_meanface_mm"] > 1.0
    assert row["nme"] == pytest.approx(box_nme(lmk[0], 1.0), rel=1e-5)
    assert row["nme_dlib"] == pytest.approx(box_nme(lmk[0], 2.0), rel=1e-5)
    # an older table: no input_lmk_px (the fit's target was dlib's) and no face mesh column
    assert row["nme_input"] == row["nme_dlib"] and np.isnan(row["nme_mesh"])
    w, h = lmk[0].max(0) - lmk[0].min(0)
    assert row["iou"] == pytest.approx((h - 2.0) / (h + 2.0), rel=1e-5)  # the face box (dlib's) is 2 px low
    metrics = synthetic_metrics(scores, truth["yaw_deg"].to_numpy(), our_seconds_per_face=2.0)
    assert metrics["synthetic_faces"] == 2 and metrics["synthetic_faces_missed"] == 1
    assert metrics["synthetic_vertex_error_mm_eos"] is None and metrics["fit_speed_vs_eos"] is None
    assert metrics["synthetic_landmark_nme_mesh"] is None
    assert metrics["synthetic_by_yaw"]["yaw_0_30"] == pytest.approx({
        "faces": 2, "detected": 1, "detection_rate": 0.5, "nme": row["nme"], "nme_dlib": row["nme_dlib"],
        "nme_mesh": None, "nme_input": row["nme_dlib"], "vertex_error_mm": row["err_mm"],
        "vertex_error_mm_eos": None})


def test_eos_on_faces_another_model_drew_is_scored_by_its_surface(sfm, ict):
    """Faces drawn by ICT, ours an exact ICT mesh rigidly moved, the peer's an SFM mesh (eos's topology): the peer
    has no vertex error against ICT's vertices (NaN, None in the metrics) but a landmark NME, a speed and a surface
    error, so fit_speed_vs_eos and surface_error_vs_eos are reported under face_model.source: ict too."""
    truth, recon, _, lmk = truth_and_reconstructions(ict)
    scores = synthetic_scores(truth, recon, ict.mean_shape, ict.face_region, "rigid")
    assert list(scores["file"]) == ["synth_0000.png"]
    rot, t = random_rigid(3)
    peer_verts = (sfm.mean_shape @ rot.T + t)[None]
    peer_lmk = lmk[:1] + [0.0, 3.0]
    scores = add_peer_scores(scores, truth, peer_verts, peer_lmk, np.array([0.25]), ict.face_region, "rigid")
    assert np.isnan(scores["err_eos_mm"]).all() and np.isnan(scores["err_eos_median_mm"]).all()
    assert scores["nme_eos"].iloc[0] == pytest.approx(box_nme(lmk[0], 3.0), rel=1e-5)
    scores = add_surface_scores(scores, truth, recon, ict, ict, peer_verts, sfm)
    assert scores["surface_mm"].iloc[0] < 1e-4                 # our mesh is the truth, moved
    assert 0.5 < scores["surface_eos_mm"].iloc[0] < 10.0       # the SFM mean face is another face
    with pytest.raises(ValueError, match="peer_verts_mm"):     # the peer's meshes must be of the peer model
        add_surface_scores(scores, truth, recon, ict, ict, peer_verts[:, :100], sfm)
    m = synthetic_metrics(scores, truth["yaw_deg"].to_numpy(), our_seconds_per_face=2.0)
    assert m["synthetic_vertex_error_mm_eos"] is None and m["vertex_error_vs_eos"] is None
    assert m["synthetic_vertex_error_mm"] < 1e-4 and m["fit_speed_vs_eos"] == pytest.approx(8.0)
    assert m["synthetic_landmark_nme_eos"] == pytest.approx(scores["nme_eos"].iloc[0])
    assert m["surface_error_vs_eos"] == pytest.approx(m["synthetic_surface_error_mm"] /
                                                      m["synthetic_surface_error_mm_eos"])
    assert m["synthetic_surface_error_mm_eos"] == pytest.approx(scores["surface_eos_mm"].iloc[0])


def synthetic_score_rows(yaw_deg: list[float], nme: list[float]) -> pd.DataFrame:
    """synthetic_scores-like rows at the given yaws and NMEs: vertex errors 1, 2, ... mm (eos: twice that);
    nme_dlib, nme_mesh, nme_input = 2, 3, 4 x nme."""
    n = len(yaw_deg)
    err = np.arange(1.0, n + 1)
    nme = np.asarray(nme)
    return pd.DataFrame({"file": [f"synth_{i:04d}.png" for i in range(n)], "yaw_deg": yaw_deg, "err_mm": err,
                         "err_median_mm": err, "err_meanface_mm": err + 1, "nme": nme, "nme_dlib": 2 * nme,
                         "nme_mesh": 3 * nme, "nme_input": 4 * nme, "masked_psnr": np.full(n, 25.0),
                         "err_eos_mm": 2 * err})


def test_synthetic_metrics_by_yaw_count_undetected_faces_in_their_bin():
    at_90 = math.degrees(np.float32(math.radians(90.0)))  # 90 deg after the float32 round trip: just above 90
    assert at_90 > 90.0
    truth_yaw = np.array([5.0, -25.0, 40.0, -55.0, 70.0, -80.0, 89.0, at_90])
    # detected: 5, -25 (0-30), 40 (30-60), -80 and 90 (60-90); missed: -55, 70, 89
    scores = synthetic_score_rows([5.0, -25.0, 40.0, -80.0, at_90], [0.02, 0.04, 0.12, 0.3, 0.5])
    m = synthetic_metrics(scores, truth_yaw, our_seconds_per_face=None)
    by_yaw = m["synthetic_by_yaw"]
    assert list(by_yaw) == ["yaw_0_30", "yaw_30_60", "yaw_60_90"]
    assert [(b["faces"], b["detected"], b["detection_rate"]) for b in by_yaw.values()] == [
        (2, 2, 1.0), (2, 1, 0.5), (4, 2, 0.5)]
    assert by_yaw["yaw_0_30"] == pytest.approx({
        "faces": 2, "detected": 2, "detection_rate": 1.0, "nme": 0.03, "nme_dlib": 0.06, "nme_mesh": 0.09,
        "nme_input": 0.12, "vertex_error_mm": 1.5, "vertex_error_mm_eos": 3.0})
    assert by_yaw["yaw_60_90"]["nme"] == pytest.approx(0.4) and by_yaw["yaw_60_90"]["vertex_error_mm"] == 4.5
    assert (m["synthetic_faces"], m["synthetic_faces_missed"]) == (8, 3)
    # NME > 0.10: 40, -80 and 90 deg; of those, only 40 deg is within 75 deg of yaw
    assert (m["synthetic_faces_nme_over_10pct"], m["synthetic_faces_nme_over_10pct_upto_75deg"]) == (3, 1)
    assert m["synthetic_landmark_nme_input"] == pytest.approx(4 * m["synthetic_landmark_nme"])
    none_found = synthetic_metrics(scores.iloc[:0], np.array([10.0]), None)["synthetic_by_yaw"]
    assert none_found["yaw_0_30"]["detection_rate"] == 0.0 and none_found["yaw_0_30"]["nme"] is None
    assert none_found["yaw_30_60"]["faces"] == 0 and none_found["yaw_30_60"]["detection_rate"] is None


def square_face(centre: tuple[float, float], size_px: float) -> np.ndarray:
    """image_0010's 68 annotated points scaled into a size_px x size_px box centred at centre (x, y), px."""
    gt = read_pts(ANNOTATED / "image_0010.pts")
    lo, hi = gt.min(0), gt.max(0)
    return (gt - (lo + hi) / 2) / (hi - lo) * size_px + np.asarray(centre)


def recon_row(source, points_px: np.ndarray, **columns) -> dict:
    """A reconstruction row whose every landmark column is points_px (68, 2) px, except those given in columns."""
    flat = points_px.reshape(-1)
    row = {"source": str(source), "lmk_px": flat, "lmk3d_px": flat, "input_lmk_px": flat, "dlib_lmk_px": flat,
           "mesh_lmk_px": flat}
    return row | {k: np.asarray(v, np.float64).reshape(-1) for k, v in columns.items()}


def test_the_annotated_face_is_the_reconstruction_that_overlaps_it_most():
    """Image a (1000 x 800): the annotated face, 100 px at (300, 300), reconstructed 12 px to the left, and another
    reconstruction 3x larger around it, nearer both the image's centre and the annotated points' centroid (so
    neither 'largest', 'most central' nor 'nearest centroid' finds the face). Image b: the only reconstruction
    is 80% of the face's width off."""
    gt = square_face((300.0, 300.0), 100.0)
    centroid = gt.mean(0)
    other = (gt - centroid) * 3.0 + centroid + 4.0    # contains the face's box: IoU 1/9
    ours = gt - [12.0, 0.0]                           # IoU 88/112
    far = gt + [80.0, 0.0]                            # IoU 20/180
    image_centre = np.array([500.0, 400.0])
    assert np.linalg.norm(other.mean(0) - gt.mean(0)) < np.linalg.norm(ours.mean(0) - gt.mean(0))
    assert np.linalg.norm(other.mean(0) - image_centre) < np.linalg.norm(ours.mean(0) - image_centre)
    recon = pd.DataFrame([recon_row("/photos/a.png", other), recon_row("/photos/a.png", ours),
                          recon_row("/photos/b.png", far)], index=[10, 11, 12])
    annotations = {Path("/photos/a.png"): Annotation(gt, "pts"), Path("/photos/b.png"): Annotation(gt, "pts")}
    scores = annotated_scores(recon, annotations)
    assert list(scores["image"]) == ["a.png", "b.png"] and list(scores["detected"]) == [True, False]
    assert scores["iou"].to_numpy() == pytest.approx([88 / 112, 20 / 180])
    assert 20 / 180 < MIN_FACE_IOU < 88 / 112
    assert scores["nme"].iloc[0] == pytest.approx(box_nme(gt, 12.0)) and np.isnan(scores["nme"].iloc[1])
    metrics = annotated_metrics(scores)
    assert (metrics["landmark_nme_count"], metrics["landmark_nme_missed"]) == (1, 1)
    # the face box is the fit's input landmarks, not ours: ours far off still scores (badly) on the right face
    recon.loc[11, "lmk_px"] = (gt + [60.0, 0.0]).reshape(-1)
    assert annotated_scores(recon, annotations)["nme"].iloc[0] == pytest.approx(box_nme(gt, 60.0))


def test_annotated_scores_use_each_formats_convention_and_old_tables():
    gt = square_face((200.0, 200.0), 120.0)
    source = {"pts": "/photos/p.png", "mat": "/photos/m.png"}
    recon = pd.DataFrame([recon_row(s, gt, lmk_px=gt + [0.6, 0.8], lmk3d_px=gt + [0.0, 3.0], dlib_lmk_px=gt + 5.0)
                          for s in source.values()])
    annotations = {Path(s): Annotation(gt, f) for f, s in source.items()}
    scores = annotated_scores(recon, annotations).set_index("format")
    assert scores.loc["pts", "nme"] == pytest.approx(box_nme(gt, 1.0))   # .pts: lmk_px (silhouette jaw)
    assert scores.loc["mat", "nme"] == pytest.approx(box_nme(gt, 3.0))   # .mat: lmk3d_px (fixed 3D points)
    assert scores["nme_input"].to_numpy() == pytest.approx([0.0, 0.0])
    assert scores["iou"].to_numpy() == pytest.approx([1.0, 1.0])  # the face box is input_lmk_px's
    # an older table: no lmk3d_px (.mat falls back to lmk_px), input_lmk_px (-> dlib's) or mesh_lmk_px (NaN)
    old = recon.drop(columns=["lmk3d_px", "input_lmk_px", "mesh_lmk_px"])
    scores = annotated_scores(old, annotations).set_index("format")
    assert scores.loc["mat", "nme"] == pytest.approx(box_nme(gt, 1.0))
    assert scores.loc["mat", "nme_input"] == pytest.approx(box_nme(gt, 5.0 * math.sqrt(2)))
    overlap = 115.0 ** 2 / (2 * 120.0 ** 2 - 115.0 ** 2)  # now dlib's box, 5 px off in x and y
    assert scores["iou"].to_numpy() == pytest.approx([overlap, overlap])
    metrics = annotated_metrics(scores.reset_index())
    assert metrics["landmark_nme_mesh"] is None and metrics["landmark_nme_inner_mesh"] is None
    assert metrics["landmark_nme_inner_best_input"] == pytest.approx(box_nme(gt, 5.0 * math.sqrt(2)))


def test_annotated_scores_count_missed_faces():
    gt = read_pts(ANNOTATED / "image_0010.pts")
    source = str(ANNOTATED / "image_0010.png")
    recon = pd.DataFrame([{"source": source, "lmk_px": (gt + [0.0, 3.0]).reshape(-1), "dlib_lmk_px": gt.reshape(-1)}])
    note = Annotation(gt, "pts")
    annotations = {ANNOTATED / "image_0010.png": note, ANNOTATED / "missing.png": note}
    scores = annotated_scores(recon, annotations)
    metrics = annotated_metrics(scores)
    assert metrics["landmark_nme"] == pytest.approx(box_nme(gt, 3.0))
    assert metrics["landmark_nme_dlib"] == 0.0
    assert (metrics["landmark_nme_count"], metrics["landmark_nme_missed"]) == (1, 1)
    assert annotated_metrics(annotated_scores(pd.DataFrame(), annotations))["landmark_nme_missed"] == 2


def crop_transform_around(lmk_px: np.ndarray) -> np.ndarray:
    """(2, 3) photo -> crop similarity putting the landmarks' box, 120 px wide, at the 224 crop's centre."""
    lo, hi = lmk_px.min(0), lmk_px.max(0)
    scale = 120.0 / (hi - lo)[0]
    return np.array([[scale, 0.0, 112.0 - scale * (lo + hi)[0] / 2], [0.0, scale, 112.0 - scale * (lo + hi)[1] / 2]])


def test_annotated_scores_floor_is_fitted_once_for_the_detected_faces():
    gt = read_pts(ANNOTATED / "image_0010.pts")
    transform = crop_transform_around(gt)
    recon = pd.DataFrame([{"source": str(ANNOTATED / "image_0010.png"), "lmk_px": gt.reshape(-1),
                           "dlib_lmk_px": gt.reshape(-1), "transform": transform.reshape(-1)}])
    calls = []

    def floor(gt_px, transforms):  # stands in for the model fit: lands 2 px to the right of the truth
        calls.append((gt_px.shape, transforms.shape))
        np.testing.assert_allclose(transforms[0], transform)
        return gt_px + [2.0, 0.0]

    note = Annotation(gt, "pts")
    annotations = {ANNOTATED / "image_0010.png": note, ANNOTATED / "missing.png": note}
    scores = annotated_scores(recon, annotations, floor)
    assert calls == [((1, 68, 2), (1, 2, 3))]
    assert scores["nme_model_floor"].iloc[0] == pytest.approx(box_nme(gt, 2.0))
    assert np.isnan(scores["nme_model_floor"].iloc[1])
    assert annotated_metrics(scores)["landmark_nme_model_floor"] == pytest.approx(box_nme(gt, 2.0))


def test_model_landmark_floor_reaches_landmarks_the_model_made(sfm):
    """Landmarks projected from a face of the model itself (identity, expression, 25 deg yaw), seen through a
    crop transform: the floor fit finds them again (NME ~0), and the photo-px round trip is exact."""
    from pipeline.evaluate.landmark_floor import model_landmark_floor

    decoder = FaceDecoder(sfm)
    g = torch.Generator().manual_seed(3)
    c = decoder.layout.split(decoder.layout.zeros(1))
    c.id.copy_(torch.randn(c.id.shape, generator=g) * 0.7)
    c.exp.copy_(torch.rand(c.exp.shape, generator=g) * 0.3)
    c.rot[0, 1] = math.radians(25.0)
    with torch.no_grad():
        lmk_crop = decoder.landmark_px(c)[0].double().numpy()
    transform = np.array([[0.5, 0.0, 30.0], [0.0, 0.5, 20.0]])  # photo -> crop: the photo is twice the crop size
    gt_photo = (lmk_crop - transform[:, 2]) / 0.5
    fitted = model_landmark_floor(decoder, gt_photo[None], transform.reshape(1, 6), steps=800)
    assert landmark_nme(fitted, gt_photo[None])[0] < 2.0e-3
    unreachable = gt_photo.copy()
    unreachable[0:17] = gt_photo[16::-1]  # the jaw line numbered backwards: no face puts point 1 on its left
    fitted = model_landmark_floor(decoder, unreachable[None], transform.reshape(1, 6), steps=800)
    assert landmark_nme(fitted, unreachable[None])[0] > 0.05


def test_eos_peer_fits_the_input_landmarks_where_dlib_did_not_run():
    from stages.evaluate import run_eos

    class Recorder:  # stands in for EosFitter: records the landmarks it is given
        def __init__(self):
            self.points = []

        def fit(self, lmk_px, width, height):
            self.points.append(np.asarray(lmk_px))
            return EosFit(np.zeros((3448, 3), np.float32), np.asarray(lmk_px, np.float32), 0.0, 0.5)

    dlib, given = np.full((68, 2), 10.0), np.full((68, 2), 20.0)
    recon = pd.DataFrame([recon_row("a.png", given, dlib_lmk_px=dlib), recon_row("b.png", given,
                                                                                dlib_lmk_px=np.full((68, 2), np.nan))])
    scores = pd.DataFrame({"file": ["a.png", "b.png"], "recon_row": [0, 1]})
    truth = pd.DataFrame({"file": ["a.png", "b.png"], "canvas_px": [224, 224]})
    fitter = Recorder()
    verts, lmk, seconds = run_eos(scores, truth, recon, fitter)
    assert [p[0, 0] for p in fitter.points] == [10.0, 20.0]
    assert verts.shape == (2, 3448, 3) and list(seconds) == [0.5, 0.5]


def fabricated_annotated_reconstructions(annotations: dict) -> pd.DataFrame:
    """Two reconstructions per annotated photo: first a decoy (another person: 1.3x larger, one and a half face
    widths to the right), then the annotated face with ours 1 px off on the inner 51 points and 5 px on the jaw,
    lmk3d_px 10 px off (the .mat convention, unused for .pts), input 0.5 px, dlib 5 px (NaN on the first photo: it
    did not run there), face mesh 1.5 px."""
    rows = []
    for k, (image, note) in enumerate(annotations.items()):
        gt = note.lmk_px
        width = (gt.max(0) - gt.min(0))[0]
        rows.append(recon_row(image, (gt - gt.mean(0)) * 1.3 + gt.mean(0) + [1.5 * width, 0.0],
                              transform=crop_transform_around(gt)))
        ours = gt + [0.6, 0.8]
        ours[:17] = gt[:17] + [3.0, 4.0]
        rows.append(recon_row(image, gt, lmk_px=ours, lmk3d_px=gt + [0.0, 10.0], input_lmk_px=gt + [0.3, 0.4],
                              dlib_lmk_px=gt + [3.0, 4.0] if k else np.full((68, 2), np.nan),
                              mesh_lmk_px=gt + [0.0, 1.5], transform=crop_transform_around(gt)))
    return pd.DataFrame(rows)


def test_evaluate_stage_on_fabricated_reconstructions(sfm, tmp_path, monkeypatch):
    import stages.evaluate
    from pipeline.evaluate.landmark_floor import model_landmark_floor
    from pipeline.reconstruct.parts import part_path

    # 400 of the floor fit's 2000 steps: within 0.01 NME of the full fit on these photos, a third of the time
    monkeypatch.setattr(stages.evaluate, "model_landmark_floor", functools.partial(model_landmark_floor, steps=400))

    truth, recon, _, _ = truth_and_reconstructions(sfm)
    synth = tmp_path / "synth"
    part_path(synth / "reconstructions", "photos").parent.mkdir(parents=True)
    truth.to_parquet(synth / "truth.parquet")
    recon.to_parquet(part_path(synth / "reconstructions", "photos"))
    save_face_model(sfm, tmp_path / "model.npz")
    (synth / "reconstructions" / "summary.json").write_text(json.dumps({"faces": 2, "seconds": 3.0,
                                                                        "face_model": str(tmp_path / "model.npz")}))
    annotations = find_annotations(ANNOTATED, ANNOTATED)
    assert set(annotations) == set(annotated_photos())
    annotated = tmp_path / "annotated"
    part_path(annotated, "photos").parent.mkdir(parents=True)
    fabricated_annotated_reconstructions(annotations).to_parquet(part_path(annotated, "photos"))
    photos = tmp_path / "photos"
    part_path(photos, "train-00000").parent.mkdir(parents=True)
    pd.DataFrame({"masked_psnr": [20.0, 30.0]}).to_parquet(part_path(photos, "train-00000"))
    (annotated / "summary.json").write_text(json.dumps({"faces": 8, "face_model": str(tmp_path / "model.npz")}))
    params = {"synth": {"face_model": str(tmp_path / "model.npz")}, "reconstruct": {"out": str(photos)},
              "evaluate": {"alignment": "rigid", "annotations": str(ANNOTATED), "annotated_images": str(ANNOTATED),
                           "sfm_dir": str(SFM_DIR), "sfm_model": str(tmp_path / "model.npz"), "eos_iterations": 5,
                           "eos_lambda_identity": 30.0, "eos_lambda_expressions": 30.0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stages.evaluate.main(["--params", str(tmp_path / "params.yaml"), "--synth", str(synth), "--annotated",
                          str(annotated), "--metrics", str(tmp_path / "metrics.json"), "--faces",
                          str(tmp_path / "faces.csv")])

    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["synthetic_vertex_error_mm"] < 1e-5 and m["synthetic_faces_missed"] == 1
    assert m["synthetic_vertex_error_mm_eos"] > 0.1 and m["vertex_error_vs_eos"] < 1e-3
    assert m["synthetic_surface_error_mm"] < 1e-4 and m["synthetic_surface_error_mm_eos"] > 0.1
    assert m["fit_seconds_per_face"] == 1.5
    assert m["fit_speed_vs_eos"] == pytest.approx(1.5 / m["fit_seconds_per_face_eos"])
    assert (m["synthetic_by_yaw"]["yaw_0_30"]["faces"], m["synthetic_by_yaw"]["yaw_0_30"]["detected"]) == (2, 1)
    gts = [a.lmk_px for a in annotations.values()]

    def mean_nme(shift_px: float, faces=gts) -> float:
        return float(np.mean([box_nme(gt, shift_px) for gt in faces]))

    assert m["landmark_nme"] == pytest.approx(mean_nme((17 * 5.0 + 51 * 1.0) / 68))
    assert m["landmark_nme_inner"] == pytest.approx(mean_nme(1.0))
    assert m["landmark_nme_dlib"] == pytest.approx(mean_nme(5.0, gts[1:]))  # dlib did not run on the first
    assert m["landmark_nme_inner_mesh"] == pytest.approx(mean_nme(1.5))
    assert m["landmark_nme_inner_input"] == pytest.approx(mean_nme(0.5))
    assert m["landmark_nme_inner_best_input"] == m["landmark_nme_inner_mesh"]
    assert (m["landmark_nme_count"], m["landmark_nme_missed"]) == (len(gts), 0)
    assert 0.0 < m["landmark_nme_model_floor"] < 0.03  # the SFM reaches real annotations to within 3 %
    assert m["masked_psnr"] == 25.0 and m["masked_psnr_count"] == 2
    faces = pd.read_csv(tmp_path / "faces.csv")
    assert sorted(set(faces["set"])) == ["annotated", "synthetic"]
    ann = faces[faces["set"] == "annotated"].set_index("file")
    assert sorted(ann.index) == sorted(p.name for p in annotations)
    assert ann["detected"].all() and ann["nme_model_floor"].notna().all()
    for image, note in annotations.items():  # the annotated face's box (input, 0.3 and 0.4 px off), not the decoy's
        w, h = note.lmk_px.max(0) - note.lmk_px.min(0)
        inter = (w - 0.3) * (h - 0.4)
        assert ann.loc[image.name, "iou"] == pytest.approx(inter / (2 * w * h - inter), rel=1e-4)
