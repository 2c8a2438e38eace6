"""The HTML report: mesh shading, page structure, embedded images, escaping, and a headless-Chromium render."""
from __future__ import annotations

import base64
import functools
import html
import json
import math
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.face_model import FaceDecoder, save_face_model
from pipeline.face_model.sfm import convert_sfm
from pipeline.reconstruct.export import draw_landmarks, overlay_on_photo, write_png
from pipeline.reconstruct.report import (COEFF_COLUMN_PREFIX, COLUMNS, face_cards, flatten_metrics, format_value,
                                         geometry_coefficients, read_metrics, report_html, screenshot_html,
                                         shading_image)
from pipeline.render.face import render_face
from pipeline.shards import SHARD_SCHEMA, decode_rgb, encode_jpeg, encode_png, write_table

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SFM_DIR = SHARED / "face_models" / "sfm"
AUX_DIR = SHARED / "face_models" / "bfm_aux"
BOX_PX = 160
HOSTILE_ID = "<script>alert('x')</script> & \"quoted\""


@functools.cache
def sfm_model():
    return convert_sfm(SFM_DIR, AUX_DIR, (0.72, 0.53, 0.44))


@pytest.fixture(scope="module")
def decoder():
    return FaceDecoder(sfm_model())


def face_coefficients(decoder, yaw_deg: float, pitch_deg: float, seed: int) -> torch.Tensor:
    """(C,) a random identity and expression at the given pose, with some coloured light."""
    g = torch.Generator().manual_seed(seed)
    c = decoder.layout.split(decoder.layout.zeros(1))
    return decoder.layout.join(c._replace(
        id=torch.randn(1, decoder.layout.k_id, generator=g) * 0.8,
        exp=torch.rand(1, decoder.layout.k_exp, generator=g) * 0.5,
        rot=torch.tensor([[math.radians(pitch_deg), math.radians(yaw_deg), math.radians(4.0)]]),
        sh=torch.randn(1, 27, generator=g) * 0.1))[0]


def synthetic_photo_files(decoder, coeffs: torch.Tensor, faces_dir: Path, stem: str) -> bytes:
    """Write `<stem>_overlay.png` and `<stem>_crop.png` as the reconstruct stage does, for a photo made by
    pasting the face render into a larger gradient image; returns the aligned input crop as JPEG bytes."""
    with torch.no_grad():
        face = render_face(decoder, coeffs[None])
    render_rgb = face.image[0].permute(1, 2, 0).numpy()
    mask = face.mask[0, 0].numpy()
    lmk_px = face.decoded.lmk_px[0].numpy()
    h, w = 300, 420
    photo = np.zeros((h, w, 3), np.uint8)
    photo[...] = np.linspace([70, 90, 120], [200, 190, 160], w).astype(np.uint8)[None]
    transform = np.array([[1.3, 0.1, -180.0], [-0.1, 1.3, -60.0]])  # photo px -> crop px, a similarity
    photo = overlay_on_photo(photo, render_rgb, mask, transform, alpha=1.0)
    crop = cv2.warpAffine(photo, transform, (224, 224))
    write_png(faces_dir / f"{stem}_overlay.png", overlay_on_photo(photo, render_rgb, mask, transform))
    write_png(faces_dir / f"{stem}_crop.png", draw_landmarks(crop, lmk_px + 1.5, lmk_px))
    return encode_jpeg(crop, 90)


def table_row(decoder, face_id: str, coeffs: torch.Tensor, stem: str, psnr: float) -> dict:
    c = decoder.layout.split(coeffs[None])
    pitch, yaw, roll = np.degrees(c.rot[0].numpy())
    row = {COEFF_COLUMN_PREFIX + name: getattr(c, name)[0].numpy() for name in c._fields}
    row.update(id=face_id, source=f"photos/{stem}.jpg", face_index=0, method="fit", pitch_deg=float(pitch),
               yaw_deg=float(yaw), roll_deg=float(roll), masked_psnr=psnr, files_stem=stem)
    return row


@pytest.fixture(scope="module")
def inputs(decoder, tmp_path_factory):
    """Three reconstructed faces: two with every file, one (hostile id) with none but its coefficients.
    Returns (folder with faces/ and metrics.json, coefficients table, {face id: input crop JPEG bytes})."""
    root = tmp_path_factory.mktemp("report")
    faces = [("face-a", 25.0, -5.0, "photos/a"), ("face-b", -10.0, 8.0, "photos/b"), (HOSTILE_ID, 0.0, 0.0, "c")]
    rows, crops = [], {}
    for i, (face_id, yaw, pitch, stem) in enumerate(faces):
        coeffs = face_coefficients(decoder, yaw, pitch, seed=i)
        if face_id != HOSTILE_ID:
            crops[face_id] = synthetic_photo_files(decoder, coeffs, root / "faces", stem)
        rows.append(table_row(decoder, face_id, coeffs, stem, psnr=24.5 + i))
    (root / "metrics.json").write_text(json.dumps(
        {"landmark_nme": {"ours": 0.0312, "eos": 0.0451}, "count": 1200, "name": "<b>synthetic</b>",
         "per_pose": [{"yaw": 0, "nme": 0.03}, {"yaw": 45, "nme": 0.05}]}))
    return root, pd.DataFrame(rows), crops


@pytest.fixture(scope="module")
def report(decoder, inputs):
    root, table, crops = inputs
    metrics = read_metrics({"Evaluation": root / "metrics.json", "Benchmark": root / "absent.json"})
    cards = face_cards(table, decoder, root / "faces", {k: decode_rgb(v) for k, v in crops.items()})
    page = report_html("Face <reconstruction> report", "3 faces & more", metrics, cards, BOX_PX, 80)
    path = root / "index.html"
    path.write_text(page, encoding="utf-8")
    return path, page, table


class PageStructure(HTMLParser):
    """Collects the contact-sheet rows, the images and the text of the page."""

    def __init__(self):
        super().__init__()
        self.face_rows = 0
        self.images: list[str] = []
        self.missing_cells = 0
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.face_rows += tag == "tr" and attrs.get("class") == "face"
        self.missing_cells += "missing" in (attrs.get("class") or "").split()
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_shading_image_is_grey_geometry_independent_of_the_fitted_light(decoder):
    coeffs = face_coefficients(decoder, yaw_deg=0.0, pitch_deg=0.0, seed=3)
    image = shading_image(decoder, coeffs)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    face = render_face(decoder, coeffs[None]).mask[0, 0].numpy() > 0.5
    assert 0.2 < face.mean() < 0.8, "the face should fill a good part of the crop"
    pixels = image[face].astype(int)
    assert np.abs(pixels - pixels[:, :1]).max() <= 1, "uniform grey albedo under white light: R = G = B"
    # lit from the camera: the nose tip region (facing the camera) is brighter than the face outline
    assert image[112, 112, 0] > np.percentile(pixels[:, 0], 25)
    relit = decoder.layout.split(coeffs[None])._replace(sh=torch.randn(1, 27))
    assert np.array_equal(shading_image(decoder, decoder.layout.join(relit)[0]), image)


def test_geometry_coefficients_checks_the_model(decoder):
    row = table_row(decoder, "f", face_coefficients(decoder, 10.0, 0.0, seed=0), "f", 20.0)
    vec = geometry_coefficients(row, decoder)
    assert vec.shape == (decoder.layout.size,)
    assert torch.equal(decoder.layout.split(vec[None]).id[0], torch.from_numpy(row["coeff_id"]))
    with pytest.raises(ValueError, match="coefficient group 'id' has 80 values"):
        geometry_coefficients({**row, "coeff_id": np.zeros(80)}, decoder)


def test_report_structure_images_and_escaping(report):
    path, page, table = report
    parsed = PageStructure()
    parsed.feed(page)
    assert parsed.face_rows == len(table) == 3
    # two complete faces (4 images each) + the shading of the face without files; its 3 others are placeholders
    assert len(parsed.images) == 2 * len(COLUMNS) + 1 and parsed.missing_cells == 3
    for src in parsed.images:
        assert src.startswith("data:image/jpeg;base64,")
        thumb = decode_rgb(base64.b64decode(src.split(",", 1)[1]))
        assert thumb.shape[0] <= BOX_PX and thumb.shape[1] <= 1.5 * BOX_PX and thumb.std() > 5, \
            "a decodable, non-flat thumbnail within its box"
    # self-contained and script-free: no external references of any kind
    assert "://" not in page and "script" not in parsed.tags and "link" not in parsed.tags
    # every data-derived string is escaped, in text and in attributes
    assert HOSTILE_ID not in page and "<reconstruction>" not in page and "<b>synthetic" not in page
    assert html.escape(HOSTILE_ID) in page
    text = "".join(parsed.text)
    assert HOSTILE_ID in text and "Face <reconstruction> report" in text
    # captions: method, angles in degrees, PSNR; metrics: the existing file only, flattened
    assert "+25.0\u00b0" in text and "-5.0\u00b0" in text and "24.50 dB" in text
    assert "Evaluation" in text and "Benchmark" not in text
    assert "landmark_nme.eos" in text and "per_pose[1].nme" in text and "1,200" in text
    assert path.stat().st_size < 200_000, "thumbnails are JPEG-compressed"


def test_report_stage_reads_the_reconstruct_outputs_and_shards(decoder, inputs, tmp_path, monkeypatch):
    """stages.report end to end: the table, per-face files and model of `reconstruct`, crops from the shards."""
    from pipeline.reconstruct.parts import part_path
    from stages.report import main

    root, table, crops = inputs
    recon = tmp_path / "reconstructions"
    shutil.copytree(root / "faces", recon / "faces")
    part_path(recon, "val-00000").parent.mkdir()
    table.to_parquet(part_path(recon, "val-00000"))
    blank_mask = encode_png(np.zeros((224, 224), np.uint8))
    write_table([{"id": face_id, "source": f"photos/{i}.jpg", "face_index": 0, "crop": crop,
                  "landmarks": np.zeros(136, np.float32), "mask": blank_mask, "transform": [1.0, 0, 0, 0, 1.0, 0],
                  "score": 1.0, "detector": "hog", "width": 224, "height": 224}
                 for i, (face_id, crop) in enumerate(crops.items())], tmp_path / "shards" / "val-00000.parquet",
                SHARD_SCHEMA)
    save_face_model(sfm_model(), tmp_path / "model.npz")
    params = {"reconstruct": {"out": str(recon), "shards": str(tmp_path / "shards"),
                              "face_model": str(tmp_path / "model.npz")},
              "report": {"title": "Stage report", "max_faces": 2, "thumb_px": 96, "jpeg_quality": 75,
                         "metrics": {"Evaluation": str(root / "metrics.json"), "Training": "absent.json"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.report", "--out", "out/index.html"])
    main()
    parsed = PageStructure()
    parsed.feed((tmp_path / "out" / "index.html").read_text(encoding="utf-8"))
    assert parsed.face_rows == 2 and len(parsed.images) == 2 * len(COLUMNS), "max_faces rows, all images found"
    text = "".join(parsed.text)
    assert "3 faces from 3 photos" in text and "showing the first 2" in text and "Training" not in text


def test_metrics_formatting():
    assert flatten_metrics({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == [
        ("a.b", 1), ("a.c", [1, 2]), ("d", None), ("e", {})]
    assert format_value({}) == format_value(None) == "\u2014"
    assert format_value(0.123456) == "0.1235" and format_value(float("nan")) == "\u2014"
    assert format_value(True) == "yes" and format_value(list(range(20))).endswith(", \u2026]")


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless check needs the `chromium` binary (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _, _ = report
    png = screenshot_html(path, tmp_path / "report.png", 1280, 2000)
    shot = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert shot.shape == (2000, 1280, 3)
    assert shot.std() > 20, "the page rendered content, not a blank screen"
    # the dark header band spans the top, the light page background is below it
    assert shot[10, :, :].mean() < 60 and shot[-10, 20].mean() > 200
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000, "photos and shading, not just flat boxes"
