"""Shared test paths: the repository root and the read-only reference data in ../shared."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FACES = SHARED / "samples" / "faces"
ANNOTATED = SHARED / "samples" / "annotated"
SFM_DIR = SHARED / "face_models" / "sfm"
AUX_DIR = SHARED / "face_models" / "bfm_aux"
MEDIAPIPE_OBJ = SHARED / "face_models" / "mediapipe" / "canonical_face_model.obj"
ICT_ARCHIVE = SHARED / "face_models" / "ict" / "ICT-FaceKit-FaceXModel.tar.xz"
ALBEDO = (0.72, 0.53, 0.44)  # the uniform albedo the converters give models without a colour model


def repo_params() -> dict:
    """The repository's params.yaml with its relative paths into ../shared made absolute (resolved from the
    repository root), so that a copy a test writes into its own work folder still finds the shared files."""
    import yaml

    def absolute(value):
        if isinstance(value, dict):
            return {k: absolute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, str) and value.startswith("../"):
            return str((REPO_ROOT / value).resolve())
        return value
    return absolute(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))


@pytest.fixture(scope="session")
def sfm():
    """The default face model as the face_model stage builds it (Surrey Face Model 3448, uniform albedo, with the
    MediaPipe 468-point correspondence)."""
    from pipeline.face_model.mediapipe_mesh import with_mesh468
    from pipeline.face_model.sfm import convert_sfm

    return with_mesh468(convert_sfm(SFM_DIR, AUX_DIR, (0.72, 0.53, 0.44)), MEDIAPIPE_OBJ)


@pytest.fixture(scope="session")
def ict_data():
    """read_ict of the real ICT-FaceKit archive, read once per session (one pass over the xz stream, ~15 s)."""
    from pipeline.face_model.ict import read_ict

    if not ICT_ARCHIVE.is_file():
        pytest.fail(f"reference archive missing: {ICT_ARCHIVE}")
    return read_ict(ICT_ARCHIVE)


@pytest.fixture(scope="session")
def ict(ict_data):
    """The narrow (default) ICT model as the face_model stage builds it (fitted inner landmarks), with the 468-point
    correspondence."""
    from pipeline.face_model.ict import ict_face_model
    from pipeline.face_model.mediapipe_mesh import with_mesh468

    return with_mesh468(ict_face_model(ict_data, ALBEDO, "narrow"), MEDIAPIPE_OBJ)


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """../shared/samples/faces: 28 real photos (trump_hillary.jpg has two faces)."""
    if not FACES.is_dir():
        pytest.fail(f"reference photos missing: {FACES}")
    return FACES


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height over one row of data: decoding it would fail, so only a check of
    the header can refuse it cleanly (a decompression-bomb stand-in that costs nothing to write)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 7))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def annotated_faces():
    """The annotated photos preprocessed as the pipeline does (params.yaml's crop, landmarks and masks), and their
    annotations."""
    from pipeline.detect import CropSettings, LandmarkSettings, preprocess_photos
    from pipeline.evaluate.annotations import find_annotations
    from pipeline.segment import MaskSettings
    params = repo_params()
    notes = find_annotations(ANNOTATED, ANNOTATED)
    faces, _ = preprocess_photos(sorted(notes), CropSettings(**params["crop"]), LandmarkSettings(**params["landmarks"]),
                                 MaskSettings(**params["masks"]), workers=2, root=ANNOTATED)
    return faces, notes, params["reconstruct"]


def annotated_inner_nme(model, faces, notes, fit):
    """(N,) the inner NME per annotated photo (sorted by image) of the reconstruct stage's fit of `faces`
    (annotated_faces) with `model` (FaceModel) and `fit` (FitSettings); asserts every annotated face was found."""
    import pandas as pd
    from pipeline.evaluate.benchmark import annotated_scores
    from pipeline.face_model import FaceDecoder
    from pipeline.reconstruct.stream import reconstruct_faces
    rows = pd.DataFrame(reconstruct_faces(FaceDecoder(model), faces, "fit", fit))
    scores = annotated_scores(rows, notes).set_index("image").sort_index()
    assert scores["detected"].all() and len(scores) == len(notes), scores
    return scores["nme_inner"].to_numpy()
