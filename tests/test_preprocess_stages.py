"""The crop -> landmarks -> masks -> pack stage scripts, run in-process on a corpus of bad inputs and real photos:
every input file ends up in the shards or in reports/rejects.parquet with the right reason."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import repo_params, write_png_header_only
from pipeline.detect import CropSettings, LandmarkSettings, preprocess_photos
from pipeline.segment import MaskSettings
from pipeline.shards import read_faces
from stages import crop, landmarks, masks, pack

KEPT = ["real.jpg", "sub/real.png", "grey.jpg", "rgba.png", "grey16.png", "cmyk.jpg", "exif_rotated.jpg"]
REJECTED = {"empty.jpg": "empty file", "truncated.jpg": "truncated or corrupt image", "notes.jpg": "not an image",
            "dot.png": "image too small", "huge.png": "too many pixels", "gradient.png": "no face",
            "small_face.jpg": "face too small"}


def make_corpus(folder: Path, faces_dir: Path) -> None:
    """Two real photos, five decodable variants of a real face photo and seven inputs to refuse."""
    (folder / "sub").mkdir(parents=True)
    shutil.copy(faces_dir / "000002.jpg", folder / "real.jpg")
    shutil.copy(faces_dir / "vd051.png", folder / "sub" / "real.png")
    face = Image.open(faces_dir / "000033.jpg").convert("RGB")
    face.convert("L").save(folder / "grey.jpg")
    rgba = face.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(face.width) < 20, 0, 255).astype(np.uint8)[None].repeat(
        face.height, 0)))
    rgba.save(folder / "rgba.png")
    cv2.imwrite(str(folder / "grey16.png"), np.asarray(face.convert("L")).astype(np.uint16) * 257)
    face.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 8  # view by rotating 90 degrees counter-clockwise: the stored pixels lie on their side
    face.transpose(Image.Transpose.ROTATE_270).save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes((faces_dir / "000006.jpg").read_bytes()[:6000])
    (folder / "notes.jpg").write_text("a text file with a photo's name\n")
    Image.new("RGB", (1, 1), (200, 150, 120)).save(folder / "dot.png")
    write_png_header_only(folder / "huge.png", 40000, 40000)
    ramp = np.linspace(0, 255, 200, dtype=np.uint8)
    Image.fromarray(np.dstack([np.tile(ramp, (150, 1))] * 3)).save(folder / "gradient.png")
    face.resize((face.width * 11 // 20, face.height * 11 // 20), Image.LANCZOS).save(folder / "small_face.jpg")
    (folder / "detections").mkdir()
    (folder / "detections" / "real.txt").write_text("1 2\n")  # not a photo extension: not an input


def write_params(workdir: Path, images: Path, **overrides: dict) -> Path:
    params = repo_params()
    params["data"]["images"] = str(images)
    params["workers"] = 2
    for section, values in overrides.items():
        params[section].update(values)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_stages(params: Path) -> dict[str, dict]:
    """Run the four stage scripts in the current directory; returns their reports/<stage>.json."""
    for stage in (crop, landmarks, masks, pack):
        stage.main(["--params", str(params)])
    return {name: json.loads(Path(f"reports/{name}.json").read_text())
            for name in ("crop", "landmarks", "masks", "pack")}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, faces_dir):
    """The stages over the corpus: (work dir, photo folder, reports)."""
    work = tmp_path_factory.mktemp("stages")
    photos = work / "photos"
    make_corpus(photos, faces_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        reports = run_stages(write_params(work, photos))
    return work, photos, reports


def test_every_input_is_packed_or_rejected_with_its_reason(corpus_run):
    work, photos, reports = corpus_run
    faces = read_faces(sorted((work / "data" / "shards").glob("*.parquet")))
    rejects = pd.read_parquet(work / "reports" / "rejects.parquet")
    kept = {Path(s).relative_to(photos).as_posix() for s in faces["source"]}
    rejected = {Path(p).relative_to(photos).as_posix(): r for p, r in zip(rejects["path"], rejects["reason"])}
    assert kept == set(KEPT)
    assert rejected == REJECTED
    assert set(rejects["stage"]) == {"crop"} and rejects["id"].isna().all()
    assert sorted(faces["id"]) == sorted(f"{name}#0" for name in KEPT)
    assert reports["crop"]["inputs"] == len(KEPT) + len(REJECTED) == 14
    assert reports["crop"]["outputs"] == reports["pack"]["outputs"] == len(KEPT)
    assert reports["crop"]["rejects_by_reason"] == {reason: 1 for reason in REJECTED.values()}
    assert (reports["pack"]["photos_kept"], reports["pack"]["photos_rejected"]) == (len(KEPT), len(REJECTED))
    assert sum(reports["pack"]["faces_per_split"].values()) == len(KEPT)


def test_decoded_variants_keep_their_upright_size(corpus_run, faces_dir):
    work, _, _ = corpus_run
    faces = read_faces(sorted((work / "data" / "shards").glob("*.parquet"))).set_index("id")
    width, height = Image.open(faces_dir / "000033.jpg").size
    for name in ("grey.jpg", "rgba.png", "grey16.png", "cmyk.jpg", "exif_rotated.jpg"):
        assert (faces.loc[f"{name}#0", "width"], faces.loc[f"{name}#0", "height"]) == (width, height), name
    upright = np.asarray(faces.loc["exif_rotated.jpg#0", "transform"]).reshape(2, 3)
    original = np.asarray(faces.loc["cmyk.jpg#0", "transform"]).reshape(2, 3)
    assert np.allclose(upright, original, atol=0.05 * np.abs(original).max())  # same face, same place


def test_in_process_preprocessing_matches_the_stages(corpus_run):
    work, photos, _ = corpus_run
    params = yaml.safe_load((work / "params.yaml").read_text())
    faces, rejects = preprocess_photos(
        sorted(p for p in photos.rglob("*") if p.suffix in (".jpg", ".png")), CropSettings(**params["crop"]),
        LandmarkSettings(**params["landmarks"]), MaskSettings(**params["masks"]), workers=2, root=photos)
    staged = read_faces(sorted((work / "data" / "shards").glob("*.parquet"))).set_index("id")
    assert sorted(faces["id"]) == sorted(staged.index)
    for row in faces.itertuples():
        assert row.crop == staged.loc[row.id, "crop"] and row.mask == staged.loc[row.id, "mask"]
        assert np.array_equal(row.landmarks, staged.loc[row.id, "landmarks"])
    assert sorted(rejects["reason"]) == sorted(REJECTED.values())


def test_a_stage_rejecting_every_face_leaves_empty_shards_and_accounts_for_each(tmp_path, faces_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("000050.jpg", "trump_hillary.jpg"):
        shutil.copy(faces_dir / name, photos / name)
    params = write_params(tmp_path, photos, crop={"multi_face": "all"}, landmarks={"max_template_px": 0.5})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        reports = run_stages(params)
    rejects = pd.read_parquet(tmp_path / "reports" / "rejects.parquet")
    assert sorted(rejects["id"]) == ["000050.jpg#0", "trump_hillary.jpg#0", "trump_hillary.jpg#1"]
    assert set(rejects["stage"]) == {"landmarks"} and set(rejects["reason"]) == {"landmarks off template"}
    assert sorted(p.name for p in (tmp_path / "data" / "shards").iterdir()) == ["train-00000.parquet",
                                                                              "val-00000.parquet"]
    assert len(read_faces(sorted((tmp_path / "data" / "shards").glob("*.parquet")))) == 0
    assert reports["masks"]["inputs"] == reports["pack"]["outputs"] == 0
    assert reports["pack"]["photos_rejected"] == 2
