"""dlib's face-recognition ResNet in PyTorch: descriptors equal to dlib's own on the sample photos, identity
decisions preserved, gradients to the input, a strict reader, and the 5-point chip warp."""
from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest
import torch

from pipeline.detect.alignment import fit_similarity, five_points
from pipeline.detect.dlib_faces import hog_detector, shape_predictor_68
from pipeline.nets.dlib_resnet import (CHIP_SIZE, DLIB_TEMPLATE_PX, DlibFormatError, _Unit, dlib_model_path,
                                       load_dlib_resnet, read_dlib_resnet)
from pipeline.nets.identity import (check_identity_net, five_points_torch, similarity_to_template,
                                    warp_to_template)

FACES = Path(__file__).resolve().parents[2] / "shared" / "samples" / "faces"
MAX_SIDE_PX = 800  # large photos are shrunk first (both sides see the same image): detection stays quick
SAME_PERSON_M = 0.6  # dlib's threshold on the Euclidean distance of two descriptors


def _photo(path: Path) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    scale = MAX_SIDE_PX / max(rgb.shape[:2])
    return cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb


@pytest.fixture(scope="module")
def net():
    return load_dlib_resnet()


@pytest.fixture(scope="module")
def sample_faces(net):
    """Per sample photo with a HOG face: name, dlib's descriptor, ours on dlib's chip, ours on our warp."""
    recogniser = dlib.face_recognition_model_v1(str(dlib_model_path()))
    out = []
    photos = [(p.name, _photo(p)) for p in sorted(FACES.iterdir()) if p.suffix in (".jpg", ".png")]
    # a second image of the same person: each video frame mirrored (the sample photos are all different people)
    photos += [(f"{name} mirrored", np.ascontiguousarray(rgb[:, ::-1])) for name, rgb in photos if name[:2] == "vd"]
    for name, rgb in photos:
        boxes = hog_detector()(rgb, 1)
        if not boxes:
            continue
        box = max(boxes, key=lambda r: r.area())
        shape = shape_predictor_68()(rgb, box)
        theirs = np.array(recogniser.compute_face_descriptor(rgb, shape))
        chip = torch.from_numpy(dlib.get_face_chip(rgb, shape, CHIP_SIZE, 0.25)).permute(2, 0, 1)[None] / 255.0
        lmk = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
        photo = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        five = torch.from_numpy(five_points(lmk))[None].float()
        with torch.no_grad():
            ours = net(chip.float())[0].double().numpy()
            warped = net(warp_to_template(photo, five, DLIB_TEMPLATE_PX, CHIP_SIZE))[0].double().numpy()
        out.append((name, theirs, ours, warped))
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_descriptors_equal_dlibs(sample_faces):
    assert len(sample_faces) >= 28  # nearly every sample photo has a HOG face
    for name, theirs, ours, _ in sample_faces:
        cosine = _cosine(theirs, ours)
        print(f"{name}: 1 - cosine {1 - cosine:.2e}, L2 {np.linalg.norm(theirs - ours):.2e}")
        assert cosine >= 0.99, name
        assert np.linalg.norm(theirs - ours) < 1e-4, name  # float32 round-off of the same arithmetic


def test_same_person_decisions_preserved(sample_faces):
    theirs = np.stack([f[1] for f in sample_faces])
    ours = np.stack([f[2] for f in sample_faces])
    pairs = list(itertools.combinations(range(len(sample_faces)), 2))
    d_theirs = np.array([np.linalg.norm(theirs[i] - theirs[j]) for i, j in pairs])
    d_ours = np.array([np.linalg.norm(ours[i] - ours[j]) for i, j in pairs])
    np.testing.assert_array_equal(d_ours < SAME_PERSON_M, d_theirs < SAME_PERSON_M)
    np.testing.assert_allclose(d_ours, d_theirs, atol=1e-4)
    same = {(sample_faces[i][0], sample_faces[j][0]) for (i, j), d in zip(pairs, d_ours) if d < SAME_PERSON_M}
    mirrors = {(name.removesuffix(" mirrored"), name) for name, *_ in sample_faces if name.endswith("mirrored")}
    assert len(mirrors) >= 6 and mirrors <= same  # a face and its mirror image: the same person
    # the rest are different people; dlib's one false match among them (two young women, 0.505) is kept too
    assert same - mirrors <= {("015259.jpg", "015384.jpg")}
    assert (d_ours >= SAME_PERSON_M).sum() > 0.9 * len(pairs)


def test_five_point_warp_gives_dlibs_identity(sample_faces):
    """Our differentiable 5-point chip (the loss's) is not dlib's 32-point one, but the person stays the same."""
    cosines = [_cosine(theirs, warped) for _, theirs, _, warped in sample_faces]
    print("5-point warp cosines:", np.round(cosines, 4))
    assert min(cosines) >= 0.9 and np.median(cosines) >= 0.97
    assert max(np.linalg.norm(t - w) for _, t, _, w in sample_faces) < SAME_PERSON_M


def test_gradients_reach_the_input(net):
    chip = torch.rand(2, 3, CHIP_SIZE, CHIP_SIZE, requires_grad=True)
    net(chip).norm(dim=1).sum().backward()
    assert torch.isfinite(chip.grad).all() and (chip.grad.abs() > 0).float().mean() > 0.9
    assert all(p.grad is None for p in net.parameters())  # frozen


def test_gradcheck_float64(net):
    """The whole network in float64 (gradcheck's random-direction mode: the full Jacobian has 67,500 columns),
    and a residual unit whose branch is zero-padded (3 x 3) to its pooled shortcut (4 x 4), in full."""
    net64 = load_dlib_resnet().double()
    chip = torch.rand(1, 3, CHIP_SIZE, CHIP_SIZE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net64, (chip,), fast_mode=True, eps=1e-6, atol=1e-5)
    unit = _Unit(2, 3, down=True).double()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    assert unit(x).shape == (1, 3, 4, 4)
    assert torch.autograd.gradcheck(unit, (x,))


def test_reader_rejects_bad_files(tmp_path):
    data = dlib_model_path().read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(DlibFormatError, match="truncated"):
        read_dlib_resnet(truncated)
    longer = tmp_path / "longer.dat"
    longer.write_bytes(data + b"\x00")
    with pytest.raises(DlibFormatError, match="1 bytes after the network"):
        read_dlib_resnet(longer)
    corrupt = bytearray(data)
    corrupt[0] = 0x7F  # the first integer's control byte, with the reserved bits set
    (tmp_path / "corrupt.dat").write_bytes(bytes(corrupt))
    with pytest.raises(DlibFormatError, match="control byte"):
        read_dlib_resnet(tmp_path / "corrupt.dat")
    with pytest.raises(DlibFormatError):  # another dlib model (the 68-point predictor's sibling, 5 points)
        read_dlib_resnet(dlib_model_path().with_name("shape_predictor_5_face_landmarks.dat"))
    with pytest.raises(FileNotFoundError):
        load_dlib_resnet(tmp_path / "missing.dat")


def test_similarity_matches_numpy_fit():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 224, (3, 5, 2))
    dst = rng.uniform(0, 150, (5, 2))
    ours = similarity_to_template(torch.from_numpy(src), torch.from_numpy(dst)).numpy()
    for s, m in zip(src, ours):
        np.testing.assert_allclose(m, fit_similarity(s, dst), atol=1e-9)
    lmk = rng.uniform(0, 224, (2, 68, 2))
    np.testing.assert_allclose(five_points_torch(torch.from_numpy(lmk)).numpy(),
                               np.stack([five_points(x) for x in lmk]), atol=1e-12)


def test_warp_equals_opencv_and_is_differentiable():
    rng = np.random.default_rng(1)
    # smooth, so that OpenCV's fixed-point weights (1/32 px steps) cost little: neighbours differ by < 0.05
    img = cv2.GaussianBlur(rng.uniform(0, 1, (40, 56, 3)), (0, 0), 2.0) * 4 - 1.5
    template = np.array([[8.0, 9.0], [22.0, 8.0], [15.0, 16.0], [10.0, 23.0], [21.0, 23.0]])
    angle = np.deg2rad(12.0)  # the photo's face: the template turned, enlarged 1.4x, shifted, a little noise
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (1.4 * template @ turn.T + [9.0, 2.0] + rng.normal(0, 0.5, (5, 2)))[None]
    m = fit_similarity(points[0], template)
    expected = cv2.warpAffine(img, m, (30, 30), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    got = warp_to_template(x, torch.from_numpy(points), template, 30)[0].permute(1, 2, 0).numpy()
    inside = cv2.warpAffine(np.ones((40, 56)), m, (30, 30), flags=cv2.INTER_NEAREST) > 0
    inside = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # borders: padding differs
    assert inside.mean() > 0.3
    np.testing.assert_allclose(got[inside], expected[inside], atol=5e-3)  # OpenCV: 1/32 px weights
    assert np.abs(got[inside] - expected[inside]).mean() < 1e-3
    small = torch.rand(1, 1, 10, 12, dtype=torch.float64, requires_grad=True)
    pts = torch.tensor([[[3.0, 3.0], [8.0, 3.0], [5.5, 5.0], [4.0, 7.0], [7.0, 7.0]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda im: warp_to_template(im, pts, template / 3, 10), (small,))


def test_identity_net_settings_are_checked(tmp_path):
    from pipeline.reconstruct.fit import FitSettings
    from pipeline.train.config import TrainConfig
    from stages import param_errors

    check_identity_net("dlib", "")
    with pytest.raises(ValueError, match="identity_net must be one of"):
        check_identity_net("facenet", "")
    with pytest.raises(ValueError, match="reconstruct.identity_net arcface needs identity_weights"):
        FitSettings(identity_net="arcface")
    with pytest.raises(ValueError, match="train.identity_weights: no such file"):
        TrainConfig(identity_net="dlib", identity_weights=str(tmp_path / "missing.dat"))
    params = {"reconstruct": {"identity_net": "vgg", "identity_weights": 3}}
    errors = param_errors(params, "reconstruct")
    assert any("reconstruct.identity_net must be" in e for e in errors)
    assert any("reconstruct.identity_weights must be" in e for e in errors)


def test_identity_term_of_the_fit(sfm):
    """On renders of the face model: the term is ~0 for the photo's own face, larger for another identity;
    each face's value is that of the face fitted alone; the fit with it runs and moves the coefficients."""
    from pipeline.face_model import FaceDecoder
    from pipeline.losses import landmark_weights
    from pipeline.reconstruct.fit import FitSettings, fit_coefficients, per_face_terms
    from pipeline.losses.hybrid import IdentityTarget
    from pipeline.render.face import render_face

    decoder = FaceDecoder(sfm)
    g = torch.Generator().manual_seed(0)
    coeffs = decoder.layout.zeros(2)
    c = decoder.layout.split(coeffs)
    c.id.copy_(torch.randn(c.id.shape, generator=g) * 1.5)
    c.sh[:, [3, 12, 21]] = 0.3
    with torch.no_grad():
        face = render_face(decoder, coeffs)
    photo, lmk = face.image + (1 - face.mask) * 0.25, face.decoded.lmk_px
    settings = FitSettings(landmark_steps=0, full_steps=3, identity_net="dlib")
    features = settings.identity_features(torch.device("cpu"))
    target = IdentityTarget.of(features, photo, five_points_torch(lmk))
    weights = settings.weights
    own = per_face_terms(decoder, face, coeffs, photo, face.mask, lmk, landmark_weights(), weights, None, target)
    other = coeffs.flip(0)  # each photo against the other face's identity (poses are both frontal)
    with torch.no_grad():
        swapped = per_face_terms(decoder, render_face(decoder, other), other, photo, face.mask, lmk,
                                 landmark_weights(), weights, None, target)
    assert (own["identity"] < 0.01).all() and (swapped["identity"] > 3 * own["identity"] + 0.02).all()
    alone = per_face_terms(decoder, render_face(decoder, coeffs[1:]), coeffs[1:], photo[1:], face.mask[1:], lmk[1:],
                           landmark_weights(), weights, None, IdentityTarget.of(features, photo[1:],
                                                                                 five_points_torch(lmk[1:])))
    torch.testing.assert_close(alone["identity"], own["identity"][1:], atol=1e-5, rtol=1e-4)
    start = decoder.layout.zeros(2)
    fitted = fit_coefficients(decoder, photo, face.mask, lmk, settings, init=start)
    assert torch.isfinite(fitted).all() and not torch.equal(fitted, start)
