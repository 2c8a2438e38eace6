"""The synthetic benchmark: sampling, background patches, compositing, painted features and the synth stage."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.evaluate.metrics import landmark_nme
from pipeline.detect.alignment import transform_points
from pipeline.evaluate.synth import (SynthSettings, background_patch, background_square, composite, painted_albedo,
                                     render_synthetic, sample_canvas_transform, sample_coefficients)
from pipeline.face_model import CoeffLayout, FaceDecoder, save_face_model
from conftest import SHARED

FACES = SHARED / "samples" / "faces"


def test_sampled_coefficients_respect_the_ranges(sfm):
    layout = CoeffLayout.of(sfm)
    settings = SynthSettings(yaw_max_deg=60.0, pitch_max_deg=20.0, roll_max_deg=10.0)
    rng = np.random.default_rng(0)
    coeffs = np.stack([sample_coefficients(layout, settings, rng) for _ in range(200)])
    c = layout.split(torch.from_numpy(coeffs))
    deg = np.degrees(c.rot.numpy())
    assert np.abs(deg).max(0) == pytest.approx([20.0, 60.0, 10.0], abs=2.0)   # limits reached, never passed
    assert np.all(np.abs(deg) <= [20.0, 60.0, 10.0])
    assert c.exp.min() >= 0 and c.id.std() == pytest.approx(1.0, abs=0.05)
    assert np.all(c.trans.numpy() == 0)
    again = sample_coefficients(layout, settings, np.random.default_rng(0))
    assert np.array_equal(again, coeffs[0])


def test_canvas_transform_is_a_similarity_centred_on_the_canvas():
    settings = SynthSettings(canvas_px=320, scale_min=0.8, scale_max=0.8, inplane_max_deg=0.0, shift_max_px=0.0)
    m = sample_canvas_transform(settings, 224, np.random.default_rng(1))
    assert m[:, :2] == pytest.approx(0.8 * np.eye(2))
    assert transform_points(np.array([[111.5, 111.5]]), m) == pytest.approx(np.array([[159.5, 159.5]]))
    turned = SynthSettings(inplane_max_deg=30.0)
    m = sample_canvas_transform(turned, 224, np.random.default_rng(2))
    scale = math.hypot(m[0, 0], m[1, 0])
    assert m[:, :2] / scale == pytest.approx(np.array([[m[0, 0], -m[1, 0]], [m[1, 0], m[0, 0]]]) / scale)


def test_background_square_keeps_off_the_grown_face_box():
    # 200 x 100 photo, face box 20 px wide in the middle, grown by 20 px on each side -> x 70..130, y 20..80.
    assert background_square(np.array([90, 40, 110, 60]), 200, 100) == (0, 0, 70)
    # A face at the left edge leaves the right corners free up to the photo's height.
    assert background_square(np.array([10, 40, 30, 60]), 200, 100) == (100, 0, 100)


def test_background_patch_size_and_refusal():
    photo = np.zeros((100, 200, 3), np.uint8)
    photo[:, 100:] = 255  # the free corner square (right half) is white
    five = np.array([[12, 45], [28, 45], [20, 50], [14, 55], [26, 55]], np.float64)
    patch = background_patch(photo, five, 64, np.random.default_rng(0))
    assert patch.shape == (64, 64, 3) and patch.min() == 255
    with pytest.raises(ValueError, match="face-free corner"):
        background_patch(np.zeros((40, 40, 3), np.uint8), five / 3 + 5, 64, np.random.default_rng(0))


def test_composite_blends_by_coverage():
    rng = np.random.default_rng(0)
    render = np.zeros((8, 8, 3), np.float32)
    mask = np.zeros((8, 8), np.float32)
    render[2:6, 2:6] = [1.0, 0.5, 0.0]
    mask[2:6, 2:6] = 1.0
    background = np.full((8, 8, 3), 40, np.uint8)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    image, area = composite(render, mask, background, identity, 0.0, rng)
    assert area == 16.0
    assert image[3, 3].tolist() == [255, 128, 0] and image[0, 0].tolist() == [40, 40, 40]
    # Shifted by half a pixel: the edge pixel is half face, half background.
    image, _ = composite(render, mask, background, np.array([[1.0, 0, 0.5], [0, 1.0, 0]]), 0.0, rng)
    expected = np.array([0.5 * 255 + 0.5 * 40, 0.25 * 255 + 0.5 * 40, 0.5 * 40])
    assert np.abs(image[3, 2] - expected).max() <= 1.0   # 8-bit rounding


def test_painted_albedo_darkens_eyes_and_brows_and_reddens_lips(sfm):
    albedo = painted_albedo(sfm)
    lmk = sfm.landmarks
    skin = sfm.mean_albedo[0]
    assert np.all(albedo[lmk[19]] == pytest.approx(0.35 * skin))                 # brow middle
    eye_centre = sfm.mean_shape[lmk[36:42]].mean(0)
    eye_vertex = np.argmin(np.linalg.norm(sfm.mean_shape - eye_centre, axis=1))
    assert albedo[eye_vertex] == pytest.approx(0.2 * skin)
    assert albedo[lmk[51]] == pytest.approx(np.array([0.85, 0.5, 0.5]) * skin)   # upper lip
    assert albedo[lmk[30]] == pytest.approx(skin)                                 # nose tip untouched
    assert 0.02 < (albedo != sfm.mean_albedo).any(1).mean() < 0.2


def test_rendered_landmarks_land_on_the_face(sfm):
    decoder = FaceDecoder(sfm)
    settings = SynthSettings()
    rng = np.random.default_rng(3)
    n = 4
    coeffs = np.stack([sample_coefficients(decoder.layout, settings, rng) for _ in range(n)])
    transforms = np.stack([sample_canvas_transform(settings, 224, rng) for _ in range(n)])
    black = np.zeros((n, 320, 320, 3), np.uint8)
    batch = render_synthetic(decoder, coeffs, black, transforms, 0.0, rng)
    assert batch.images.shape == (n, 320, 320, 3) and batch.lmk_px.shape == (n, 68, 2)
    assert np.all((batch.lmk_px > 0) & (batch.lmk_px < 319))
    for image, lmk in zip(batch.images, batch.lmk_px):
        x, y = np.round(lmk[27:36]).astype(int).T                     # the nose: visible at any sampled yaw
        assert np.all(image[y, x].sum(-1) > 0)
        assert np.all(image[:4].sum(-1) == 0)                         # no face in the top rows: background


def write_params(tmp_path: Path, sfm, count: int, **sampling) -> Path:
    save_face_model(sfm, tmp_path / "model.npz")
    params = {"synth": {"count": count, "seed": 5, "face_model": str(tmp_path / "model.npz"),
                        "backgrounds": str(FACES), "sampling": {"canvas_px": 320, **sampling}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_synth_stage_round_trip(sfm, tmp_path):
    from stages.synth import main

    main(["--params", str(write_params(tmp_path, sfm, 3)), "--out", str(tmp_path / "synth")])
    images = sorted((tmp_path / "synth" / "images").glob("*.png"))
    truth = pd.read_parquet(tmp_path / "synth" / "truth.parquet")
    assert [p.name for p in images] == list(truth["file"]) == [f"synth_{i:04d}.png" for i in range(3)]
    assert all(cv2.imread(str(p)).shape == (320, 320, 3) for p in images)
    # The stored coefficients reproduce the stored mesh and landmarks; the angles match the rotation.
    decoder = FaceDecoder(sfm)
    coeffs = torch.from_numpy(np.stack([np.concatenate([np.asarray(r[g], np.float32) for g in decoder.layout.sizes])
                                        for _, r in truth.iterrows()]))
    with torch.no_grad():
        decoded = decoder(coeffs)
    for i, row in truth.iterrows():
        assert np.asarray(row["verts_model"]).reshape(-1, 3) == pytest.approx(decoded.verts_model[i].numpy(), abs=1e-4)
        transform = np.asarray(row["transform"], np.float64).reshape(2, 3)
        assert np.asarray(row["lmk_px"]).reshape(68, 2) == pytest.approx(
            transform_points(decoded.lmk_px[i].numpy(), transform), abs=1e-3)
        assert row["yaw_deg"] == pytest.approx(math.degrees(row["rot"][1]), abs=1e-4)
        assert (tmp_path / "synth" / "images" / row["file"]).exists() and (FACES / row["background"]).exists()
    # A second run with a smaller count leaves no stale images behind.
    main(["--params", str(write_params(tmp_path, sfm, 2)), "--out", str(tmp_path / "synth")])
    assert len(list((tmp_path / "synth" / "images").glob("*.png"))) == 2


def test_dlib_finds_the_synthetic_faces_at_their_ground_truth(sfm, tmp_path):
    """The detector the pipeline uses agrees with the ground-truth landmarks on near-frontal synthetic faces."""
    from pipeline.detect.dlib_faces import detect_faces, fit_landmarks
    from stages.synth import main

    main(["--params", str(write_params(tmp_path, sfm, 4, yaw_max_deg=15.0)), "--out", str(tmp_path / "synth")])
    truth = pd.read_parquet(tmp_path / "synth" / "truth.parquet")
    nme = []
    for _, row in truth.iterrows():
        rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "synth" / "images" / row["file"])), cv2.COLOR_BGR2RGB)
        found = detect_faces(rgb)
        assert found, row["file"]
        lmk = fit_landmarks(rgb, found[0].box_px)
        nme.append(landmark_nme(lmk[None, 17:], np.asarray(row["lmk_px"]).reshape(1, 68, 2)[:, 17:])[0])
    assert np.median(nme) < 0.06, nme
