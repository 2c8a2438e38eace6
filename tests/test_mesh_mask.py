"""The face-mesh mask: its contour index lists against the canonical triangulation, the mask on a real photo's
mesh (eyes and mouth out, cheeks in), on a synthetic render against the rendered true region, the fallback to the
skin model, and the masks parameters."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import FACES, MEDIAPIPE_OBJ, REPO_ROOT, annotated_inner_nme
from pipeline.detect import CropSettings, LandmarkSettings, crop_photo
from pipeline.detect.landmarks import landmarks_task
from pipeline.evaluate.mask_comparison import compose, fit_annotated_nmes, iou
from pipeline.evaluate.synth import (SynthSettings, background_patch, painted_albedo, read_five_points,
                                     render_synthetic, true_region_in_crop, true_region_weights)
from pipeline.face_model import FaceDecoder
from pipeline.face_model.mediapipe_mesh import read_canonical_obj
from pipeline.reconstruct.fit import FitSettings
from pipeline.segment import MaskSettings, face_mask, skin_mask
from pipeline.segment.masks import mask_task
from pipeline.segment.mesh_mask import HOLES, INNER_MOUTH, LEFT_BROW, LEFT_EYE, RIGHT_BROW, RIGHT_EYE, N_MESH
from pipeline.shards import decode_grey, decode_rgb
from stages import param_errors

MESH = MaskSettings(method="mesh", mesh_obj=str(MEDIAPIPE_OBJ))
# vertices of MediaPipe's mesh on the cheeks (below the eyes, beside the nose): skin on any face
CHEEKS = (50, 280, 205, 425)


def mesh_edges() -> set[frozenset]:
    _, tris = read_canonical_obj(MEDIAPIPE_OBJ)
    return {frozenset((int(a), int(b))) for t in tris for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0]))}


def test_contour_lists_are_closed_loops_on_the_canonical_triangulation():
    verts, _ = read_canonical_obj(MEDIAPIPE_OBJ)
    edges = mesh_edges()
    for name, contour in HOLES.items():
        assert all(0 <= i < N_MESH for i in contour) and len(set(contour)) == len(contour), name
        pairs = [frozenset(p) for p in zip(contour, contour[1:] + contour[:1])]  # closed: the last back to the first
        # each runs along triangle edges all the way round (a brow's two polylines are joined by its end edges)
        assert [tuple(p) for p in pairs if p not in edges] == [], name
        polygon = verts[list(contour), :2].astype(np.float32)
        centre = tuple(float(c) for c in polygon.mean(0))
        assert cv2.contourArea(polygon) > 1.0 and cv2.pointPolygonTest(polygon, centre, False) > 0, name
    # MediaPipe's "left" is the subject's left: +x in the canonical model
    assert verts[list(LEFT_EYE), 0].min() > 0 > verts[list(RIGHT_EYE), 0].max()
    assert verts[list(LEFT_BROW), 0].min() > 0 > verts[list(RIGHT_BROW), 0].max()
    assert verts[list(LEFT_BROW), 1].min() > verts[list(LEFT_EYE), 1].max()  # brows above the eyes
    assert abs(verts[list(INNER_MOUTH), 0].mean()) < 1.0  # the mouth on the midline (mm)
    assert not set.intersection(*map(set, HOLES.values()))


@pytest.fixture(scope="module")
def photo_face():
    """(crop (224, 224, 3) uint8, 68 landmarks (68, 2), the crop row) of 000002.jpg (open smiling mouth)."""
    row = crop_photo(FACES / "000002.jpg", CropSettings())[0]
    (points,), _ = landmarks_task(row, LandmarkSettings())
    return decode_rgb(row["crop"]), np.reshape(points["landmarks"], (68, 2)), {**row, **points}


def at(weights: np.ndarray, point_px: np.ndarray) -> float:
    x, y = np.round(point_px[:2]).astype(int)
    return float(weights[y, x]) / 255.0


def test_mesh_mask_covers_the_face_and_cuts_out_eyes_brows_and_mouth(photo_face):
    crop, lmk, row = photo_face
    mesh = np.reshape(row["mesh"], (N_MESH, 3))
    mask = face_mask(crop, lmk, MESH, mesh_px=mesh, mesh_score=row["mesh_score"])
    assert mask.method == "mesh" and mask.fallback is None and mask.weights.shape == (224, 224)
    for contour in (LEFT_EYE, RIGHT_EYE, INNER_MOUTH):
        assert at(mask.weights, mesh[list(contour)].mean(0)) < 0.05
    for contour in (LEFT_BROW, RIGHT_BROW):
        assert at(mask.weights, mesh[list(contour)].mean(0)) < 0.1
    assert min(at(mask.weights, mesh[i]) for i in CHEEKS) > 0.9
    # the face oval (the mesh's convex hull) is mostly covered, nothing outside it is
    hull = np.zeros((224, 224), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.round(mesh[:, :2]).astype(np.int32)), 1)
    weights = mask.weights / 255.0
    assert (weights[hull == 1] > 0.5).mean() > 0.8
    assert weights[cv2.dilate(hull, np.ones((5, 5), np.uint8)) == 0].max() == 0.0


def test_mesh_mask_matches_the_true_region_of_a_synthetic_render(sfm, tmp_path):
    """A near-frontal SFM face (painted brows, eyes, lips, as the synth stage paints them) over a real background,
    through the pipeline's crop and landmarks; the mesh mask against the rendered true region in the crop."""
    model = sfm.with_albedo(painted_albedo(sfm), sfm.albedo_basis, "painted")
    decoder = FaceDecoder(model)
    coeffs = np.zeros((1, decoder.layout.size), np.float32)
    coeffs[0, decoder.layout.k_id + decoder.layout.k_exp + decoder.layout.k_alb + 1] = np.radians(15.0)  # yaw
    rng = np.random.default_rng(0)
    settings = SynthSettings(canvas_px=320, scale_min=0.9, scale_max=0.9, inplane_max_deg=0.0, shift_max_px=0.0)
    photo = cv2.cvtColor(cv2.imread(str(FACES / "000037.jpg")), cv2.COLOR_BGR2RGB)
    background = background_patch(photo, read_five_points(FACES / "detections" / "000037.txt"), 320, rng)
    transform = np.array([[0.9, 0.0, 319 / 2 - 0.9 * 223 / 2], [0.0, 0.9, 319 / 2 - 0.9 * 223 / 2]])
    batch = render_synthetic(decoder, coeffs, background[None], transform[None], settings.noise_std, rng)
    image = tmp_path / "synth.png"  # crop_photo reads a file
    cv2.imwrite(str(image), cv2.cvtColor(batch.images[0], cv2.COLOR_RGB2BGR))
    row = crop_photo(image, CropSettings())[0]
    (points,), _ = landmarks_task(row, LandmarkSettings())
    crop, lmk = decode_rgb(row["crop"]), np.reshape(points["landmarks"], (68, 2))
    render_to_crop = compose(np.reshape(row["transform"], (1, 2, 3)), transform[None])
    truth = true_region_in_crop(decoder, coeffs, true_region_weights(model, "surface"), render_to_crop, 224)
    mask = face_mask(crop, lmk, MESH, mesh_px=np.reshape(row["mesh"], (N_MESH, 3)), mesh_score=row["mesh_score"])
    assert mask.method == "mesh"
    mesh_iou = iou(mask.weights[None] >= 128, truth)[0]
    assert mesh_iou > 0.65, mesh_iou  # measured 0.743 (the mesh's face oval stops below the model's forehead)
    assert truth.mean() > 0.2  # the true region is the face, not an empty or misplaced render


@pytest.mark.parametrize("mesh,score,reason", [(None, None, "no face mesh"), ("nan", 1.0, "non-finite"),
                                               ("ok", 0.2, "mesh_score 0.200 < 0.5"), ("ok", float("nan"), "nan")])
def test_faces_without_a_usable_mesh_fall_back_to_the_skin_model(photo_face, mesh, score, reason):
    crop, lmk, row = photo_face
    points = {"ok": row["mesh"], "nan": np.full(3 * N_MESH, np.nan, np.float32), None: None}[mesh]
    mask = face_mask(crop, lmk, MESH, mesh_px=points, mesh_score=score)
    assert mask.method == "skin" and reason in mask.fallback
    expected = skin_mask(crop, lmk, MESH.forehead_lift, MESH.feather_px)
    assert np.array_equal(mask.weights, (expected * 255.0 + 0.5).astype(np.uint8))
    # as a stage task: the row says which method made the mask and why
    task_row = {k: v for k, v in row.items() if k not in ("mesh", "mesh_score")}
    if mesh is not None:
        task_row.update(mesh=points, mesh_score=score)
    (out,), rejects = mask_task(task_row, MESH, "cpu")
    assert not rejects and out["method"] == "skin" and reason in out["fallback"]
    assert np.array_equal(decode_grey(out["mask"]), mask.weights)


def test_mask_task_records_the_mesh_method(photo_face):
    _, _, row = photo_face
    (out,), rejects = mask_task(row, MESH, "cpu")
    assert not rejects and out["method"] == "mesh" and out["fallback"] is None


def test_compose_applies_the_first_map_then_the_second():
    rng = np.random.default_rng(0)
    first, second, points = rng.normal(size=(3, 2, 3)), rng.normal(size=(3, 2, 3)), rng.normal(size=(3, 5, 2))
    apply = lambda m, p: p @ m[:, :2].T + m[:, 2]  # noqa: E731
    for f, s, p, c in zip(first, second, points, compose(second, first)):
        assert np.allclose(apply(c, p), apply(s, apply(f, p)))


def test_mask_parameters_are_checked_before_work(tmp_path):
    with pytest.raises(ValueError, match="masks.method bisenet needs masks.bisenet_weights"):
        MaskSettings(method="bisenet")
    with pytest.raises(ValueError, match="masks.method must be one of mesh, skin, bisenet"):
        MaskSettings(method="parsing")
    weights = tmp_path / "79999_iter.pth"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="bisenet_weights is set but masks.method is 'mesh'"):
        MaskSettings(method="mesh", bisenet_weights=str(weights), mesh_obj=str(MEDIAPIPE_OBJ))
    with pytest.raises(ValueError, match="masks.mesh_obj: no such file"):
        MaskSettings(method="mesh", mesh_obj=str(tmp_path / "missing.obj"))
    with pytest.raises(ValueError, match="masks.skin_gate must be in"):
        MaskSettings(method="skin", skin_gate=1.5)
    with pytest.raises(ValueError, match="masks.min_mesh_score must be in"):
        MaskSettings(method="skin", min_mesh_score=-0.1)
    masks = {"method": "parsing", "mesh_obj": "x.obj", "min_mesh_score": 2.0, "skin_gate": 0.5,
             "face_classes": [], "bisenet_weights": "", "forehead_lift": 0.3, "feather_px": 2.0, "min_coverage": 0.05}
    assert param_errors({"masks": masks}, "masks") == [
        "masks.method must be one of mesh, skin, bisenet, got 'parsing'",
        "masks.min_mesh_score must be a number >= 0 and <= 1, got 2.0"]


def test_skin_gate_removes_a_non_skin_occluder_inside_the_mesh_region(photo_face):
    crop, lmk, row = photo_face
    mesh = np.reshape(row["mesh"], (N_MESH, 3))
    x, y = np.round((lmk[8] + lmk[57]) / 2).astype(int)  # the chin, between lip and jaw: not a skin sample
    covered = crop.copy()
    covered[y - 6:y + 6, x - 10:x + 10] = (40, 90, 200)  # a blue sticker, as a hand or a microphone would be
    inner = np.s_[y - 4:y + 4, x - 8:x + 8]  # away from the 1-2 px of edge softening
    gated = face_mask(covered, lmk, MESH, mesh_px=mesh, mesh_score=1.0).weights
    ungated = face_mask(covered, lmk, MaskSettings(method="mesh", mesh_obj=str(MEDIAPIPE_OBJ), skin_gate=0.0),
                        mesh_px=mesh, mesh_score=1.0).weights
    assert gated[inner].max() < 0.05 * 255 and ungated[inner].min() > 0.9 * 255


def test_the_mask_comparison_scores_the_annotated_photos_fitted_with_the_masks_it_is_given(sfm, annotated_faces):
    """fit_annotated_nmes with the faces' own masks scores what the evaluate stage's scoring of the same fit gives
    (conftest.annotated_inner_nme), and the masks it is given reach the fit: with empty masks the photometric
    term sees nothing and the full stage ends elsewhere. A short fit (30 + 20 steps) keeps it cheap."""
    faces, notes, _ = annotated_faces
    fit = FitSettings(landmark_steps=30, full_steps=20)
    own = np.stack([decode_grey(m) for m in faces["mask"]])
    decoder = FaceDecoder(sfm)
    scored = fit_annotated_nmes(decoder, faces, own, notes, fit, batch_size=32)
    assert scored["landmark_nme_count"] == len(notes)
    assert scored["landmark_nme_inner"] == pytest.approx(annotated_inner_nme(sfm, faces, notes, fit).mean(), abs=1e-6)
    empty = fit_annotated_nmes(decoder, faces, np.zeros_like(own), notes, fit, batch_size=32)
    assert abs(empty["landmark_nme_inner"] - scored["landmark_nme_inner"]) > 1e-4, (empty, scored)
    with pytest.raises(ValueError, match="masks: expected shape"):
        fit_annotated_nmes(decoder, faces, own[:1], notes, fit, batch_size=32)


def test_mesh_masks_are_made_without_importing_torch(photo_face, tmp_path):
    """The mask workers need MediaPipe's triangulation and nothing else of the face models: a process with the
    modules the fork server preloads makes a real face's mesh mask without importing torch (each worker used to
    import it, 2-5 s on 2 cores, which took preprocess_vs_landmark_bound from 0.85 to 0.48)."""
    crop, lmk, row = photo_face
    np.savez(tmp_path / "face.npz", crop=crop, lmk=lmk, mesh=np.reshape(row["mesh"], (N_MESH, 3)),
             score=row["mesh_score"])
    code = ("import sys, numpy as np, pipeline.detect, pipeline.segment\n"
            "from pipeline.segment import MaskSettings, face_mask\n"
            f"f = np.load({str(tmp_path / 'face.npz')!r})\n"
            f"mask = face_mask(f['crop'], f['lmk'], MaskSettings(method='mesh', mesh_obj={str(MEDIAPIPE_OBJ)!r}, "
            "skin_gate=0.0), mesh_px=f['mesh'], mesh_score=float(f['score']))\n"
            "print(mask.method, int(mask.weights.sum() > 0), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.split() == ["mesh", "1", "False"], out
