"""Face-region masks: class selection and soft masks from parsing logits/labels (handcrafted label maps), the
BiSeNet path end to end (random weights), and the skin colour model on real crops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.detect import CropSettings, LandmarkSettings, crop_photo
from pipeline.detect.landmarks import landmarks_task
from pipeline.nets.bisenet import CLASS_NAMES, BiSeNet
from pipeline.segment import MaskSettings, face_mask, face_regions, load_mask_model, skin_mask
from pipeline.segment.face_parsing import mask_from_labels, parsing_class_ids, soft_mask_from_logits
from pipeline.segment.gaussian_mixture import fit_gaussian_mixture_2d
from pipeline.shards import Rejected, decode_rgb

DEFAULT_IDS = [1, 2, 3, 4, 5, 10, 11, 12, 13]  # skin, brows, eyes, nose, mouth, lips


@pytest.fixture(scope="module")
def crops(faces_dir):
    """(crop (224, 224, 3) uint8, landmarks (68, 2) crop px) of four sample faces."""
    out = []
    for name in ("000002.jpg", "000037.jpg", "vd026.png", "trump_hillary.jpg"):
        row = crop_photo(faces_dir / name, CropSettings())[0]
        (points,), _ = landmarks_task(row, LandmarkSettings())
        out.append((decode_rgb(row["crop"]), np.reshape(points["landmarks"], (68, 2))))
    return out


def label_map() -> np.ndarray:
    """A 64 x 64 cartoon face: background, a skin disc, hair on top, eyes, nose, lips and a neck."""
    y, x = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.int64)
    labels[(x - 32) ** 2 + (y - 32) ** 2 < 24 ** 2] = CLASS_NAMES.index("skin")
    labels[(y < 14) & (labels == 1)] = CLASS_NAMES.index("hair")
    labels[24:28, 20:26] = CLASS_NAMES.index("l_eye")
    labels[24:28, 38:44] = CLASS_NAMES.index("r_eye")
    labels[30:38, 30:34] = CLASS_NAMES.index("nose")
    labels[42:45, 26:38] = CLASS_NAMES.index("u_lip")
    labels[45:48, 26:38] = CLASS_NAMES.index("l_lip")
    labels[56:, 26:38] = CLASS_NAMES.index("neck")
    return labels


def test_face_class_names_and_groups_map_to_parsing_ids():
    assert parsing_class_ids(["skin", "nose", "brows", "eyes", "lips", "mouth"], CLASS_NAMES) == DEFAULT_IDS
    assert parsing_class_ids(["hair", "l_ear"], CLASS_NAMES) == [7, 17]
    with pytest.raises(ValueError, match="unknown face classes \\['beard'\\]"):
        parsing_class_ids(["skin", "beard"], CLASS_NAMES)


def test_label_map_mask_keeps_exactly_the_face_classes():
    labels = label_map()
    mask = mask_from_labels(labels, DEFAULT_IDS)
    assert mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, 1.0}
    assert (mask[labels == CLASS_NAMES.index("hair")] == 0).all() and (mask[labels == 0] == 0).all()
    assert (mask[labels == CLASS_NAMES.index("neck")] == 0).all()
    assert (mask[np.isin(labels, DEFAULT_IDS)] == 1).all()


def test_soft_mask_from_logits_is_the_class_probability_resized():
    labels = label_map()
    confident = 12.0 * torch.nn.functional.one_hot(torch.from_numpy(labels), 19).permute(2, 0, 1)[None].float()
    soft = soft_mask_from_logits(confident, DEFAULT_IDS, 64)[0, 0].numpy()
    assert np.abs(soft - mask_from_labels(labels, DEFAULT_IDS)).max() < 1e-3
    enlarged = soft_mask_from_logits(confident, DEFAULT_IDS, 128)
    assert enlarged.shape == (1, 1, 128, 128) and 0 <= enlarged.min() and enlarged.max() <= 1
    assert abs(enlarged.mean().item() - soft.mean()) < 0.01
    uncertain = torch.zeros(2, 19, 32, 32)  # uniform over 19 classes: mass 9/19 on the 9 face classes
    assert torch.allclose(soft_mask_from_logits(uncertain, DEFAULT_IDS, 16), torch.full((2, 1, 16, 16), 9 / 19))


def test_bisenet_masks_run_end_to_end_from_a_weights_file(tmp_path, crops):
    """Random weights (the real 79999_iter.pth is not available here): checks loading, normalisation, sizes."""
    torch.manual_seed(0)
    weights = tmp_path / "bisenet.pth"
    torch.save(BiSeNet().state_dict(), weights)
    settings = MaskSettings(method="bisenet", bisenet_weights=str(weights), min_coverage=0.0)
    mask = face_mask(crops[0][0], crops[0][1], settings).weights
    assert settings.method == "bisenet" and mask.shape == (224, 224) and mask.dtype == np.uint8
    assert mask.std() > 0  # a function of the image, not a constant
    with pytest.raises(ValueError, match="no such file"):
        MaskSettings(method="bisenet", bisenet_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown face classes"):
        load_mask_model(MaskSettings(method="bisenet", bisenet_weights=str(weights), face_classes=("skin", "beard")))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_mask_model(MaskSettings(method="bisenet", bisenet_weights=str(tmp_path / "text.pth")))


def test_gaussian_mixture_recovers_a_known_mixture_and_is_a_density():
    rng = np.random.default_rng(1)
    covariance = np.array([[9.0, 4.0], [4.0, 6.0]])
    points = np.concatenate([rng.multivariate_normal([150.0, 110.0], covariance, 700),
                             rng.multivariate_normal([120.0, 135.0], 4.0 * np.eye(2), 300)])
    mixture = fit_gaussian_mixture_2d(points, 2, variance_floor=1e-6)
    first = int(np.argmax(mixture.weights))
    assert np.allclose(mixture.weights[first], 0.7, atol=0.03)
    assert np.allclose(mixture.means[first], [150.0, 110.0], atol=0.5)
    assert np.allclose(mixture.means[1 - first], [120.0, 135.0], atol=0.5)
    assert np.allclose(mixture.covariances[first], covariance, atol=1.5)
    grid = np.stack(np.meshgrid(np.arange(90.0, 180.0, 0.5), np.arange(80.0, 170.0, 0.5)), -1).reshape(-1, 2)
    assert abs(np.exp(mixture.log_density(grid)).sum() * 0.25 - 1.0) < 1e-3  # integrates to 1
    assert np.array_equal(fit_gaussian_mixture_2d(points, 2, 1e-6).means, mixture.means)  # deterministic


def test_skin_mask_covers_the_face_skin_and_nothing_outside(crops):
    for crop, lmk in crops:
        mask = skin_mask(crop, lmk)
        regions = face_regions(lmk, 224, forehead_lift=0.3)
        assert mask.shape == (224, 224) and mask.dtype == np.float32
        assert mask[~regions["face"]].max() == 0.0  # nothing outside the face outline
        assert mask[regions["skin_samples"]].mean() > 0.8  # the cheeks and nose are skin
        eyes = regions["holes"] & (np.arange(224)[:, None] < lmk[30, 1])  # eye interiors (above the nose tip)
        assert mask[eyes].max() < 0.5
        assert 0.15 < mask.mean() < 0.45  # a face fills roughly a quarter to a third of the template crop


def test_skin_mask_separates_skin_from_a_non_skin_patch_inside_the_face(crops):
    crop, lmk = crops[0]
    x, y = np.round((lmk[8] + lmk[57]) / 2).astype(int)  # the chin, between lip and jaw: not a skin sample
    covered = crop.copy()
    covered[y - 6:y + 6, x - 10:x + 10] = (40, 90, 200)  # a blue sticker
    inner = np.s_[y - 4:y + 4, x - 8:x + 8]  # away from the 1-2 px of edge softening
    assert skin_mask(covered, lmk)[inner].max() < 0.05 and skin_mask(crop, lmk)[inner].mean() > 0.7


def test_tiny_masks_are_rejected(crops):
    crop, lmk = crops[0]
    with pytest.raises(Rejected, match="empty mask"):
        face_mask(crop, lmk, MaskSettings(min_coverage=0.9))
    assert face_mask(crop, lmk, MaskSettings()).weights.dtype == np.uint8
