"""Loss terms: hand-computed values, Deep3DFaceRecon's normalisations, gradients, empty inputs."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import (coefficient_regularizer, identity_loss, landmark_loss, landmark_weights,
                             lighting_regularizer, photometric_loss, reflectance_loss)


def _assert_finite_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.grad is not None and torch.isfinite(t.grad).all()


# ---------------------------------------------------------------- photometric


def test_photometric_hand_computed():
    render = torch.zeros(1, 3, 2, 2)
    photo = torch.zeros(1, 3, 2, 2)
    photo[0, :, 0, 0] = torch.tensor([0.3, 0.4, 0.0])   # distance 0.5
    photo[0, :, 1, 0] = torch.tensor([0.0, 0.0, 1.0])   # distance 1
    photo[0, :, 0, 1] = torch.tensor([2.0, 0.0, 0.0])   # distance 2, outside the mask
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    expected = (0.5 * 1.0 + 1.0 * 0.5) / 1.5
    assert photometric_loss(render, photo, mask, eps=0.0).item() == pytest.approx(expected)
    assert photometric_loss(render, photo, mask).item() == pytest.approx(expected, abs=1e-5)


def test_photometric_averages_each_image_over_its_mask_weight():
    # per image: sum(distance x mask) / max(sum(mask), 1); then the mean over images
    render = torch.zeros(2, 3, 1, 2)
    photo = torch.zeros(2, 3, 1, 2)
    photo[0, 0, 0, 0], photo[1, 1, 0, 1] = 3.0, 1.0
    mask = torch.ones(2, 1, 1, 2)
    assert photometric_loss(render, photo, mask, eps=0.0).item() == pytest.approx((3.0 / 2 + 1.0 / 2) / 2)
    small = torch.zeros(2, 1, 1, 2)
    small[0, 0, 0, 0] = 0.25
    assert photometric_loss(render, photo, small, eps=0.0).item() == pytest.approx((0.25 * 3.0 / 1.0 + 0.0) / 2)


def test_photometric_identical_images_give_sqrt_eps_and_zero_gradient():
    g = torch.Generator().manual_seed(0)
    photo = torch.rand(2, 3, 8, 8, generator=g)
    render = photo.clone().requires_grad_(True)
    mask = torch.rand(2, 1, 8, 8, generator=g)
    loss = photometric_loss(render, photo, mask, eps=1e-6)
    assert loss.item() == pytest.approx(1e-3, rel=1e-5)
    loss.backward()
    _assert_finite_grads(render)
    assert render.grad.abs().max() == 0


def test_photometric_empty_mask_is_zero_with_finite_gradient():
    render = torch.rand(1, 3, 4, 4, requires_grad=True)
    loss = photometric_loss(render, torch.rand(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))
    loss.backward()
    assert loss.item() == 0.0
    _assert_finite_grads(render)


def test_photometric_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    render = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    photo = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(photometric_loss, (render, photo, mask))


def test_photometric_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mask: expected \(B, 1, H, W\)"):
        photometric_loss(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="photo: expected"):
        photometric_loss(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5), torch.rand(1, 1, 4, 4))


# ---------------------------------------------------------------- landmarks


def test_landmark_weights_follow_deep3dfacerecon():
    w = landmark_weights()
    assert w.shape == (68,) and w.dtype == torch.float32
    heavy = torch.nonzero(w == 20.0).flatten().tolist()
    assert heavy == [28, 29, 30, 60, 61, 62, 63, 64, 65, 66, 67]
    assert w.sum().item() == 57 + 11 * 20   # not normalised
    custom = landmark_weights(nose_weight=5.0, mouth_weight=2.0)
    assert custom[28:31].tolist() == [5.0] * 3 and custom[60:].tolist() == [2.0] * 8 and custom[27] == 1.0
    jaw = landmark_weights(jaw_weight=0.1)
    assert torch.allclose(jaw[:17], torch.full((17,), 0.1)) and torch.equal(jaw[17:], w[17:])


def test_landmark_loss_hand_computed():
    pred = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    gt = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    assert landmark_loss(pred, gt, torch.tensor([2.0, 7.0])).item() == pytest.approx(2.0 * 25.0 / 2)
    # 68 points all one pixel off, two images: mean over images and points of the weights
    pred68 = torch.zeros(2, 68, 2)
    assert landmark_loss(pred68, pred68 + torch.tensor([1.0, 0.0]), landmark_weights()).item() == \
        pytest.approx(277 / 68)


def test_landmark_loss_empty_is_zero():
    for b, n in ((2, 0), (0, 68)):
        pred = torch.zeros(b, n, 2, requires_grad=True)
        loss = landmark_loss(pred, torch.zeros(b, n, 2), torch.ones(n))
        loss.backward()
        assert loss.item() == 0.0
        _assert_finite_grads(pred)


def test_landmark_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    pred = torch.rand(2, 68, 2, generator=g, dtype=torch.float64, requires_grad=True) * 224
    gt = torch.rand(2, 68, 2, generator=g, dtype=torch.float64) * 224
    assert torch.autograd.gradcheck(landmark_loss, (pred, gt, landmark_weights().double()))


def test_robust_landmark_loss_is_squared_near_zero_and_linear_far_away():
    from pipeline.losses.landmarks import robust_squared

    d = torch.tensor([0.01, 0.1, 100.0, 1000.0], dtype=torch.float64)
    rho = robust_squared(d ** 2, 4.0)
    # d << delta: plain squares (relative gap d^2 / (4 delta^2)); d >> delta: 2 delta d - 2 delta^2
    assert rho[:2].tolist() == pytest.approx((d ** 2)[:2].tolist(), rel=1e-3)
    assert rho[2:].tolist() == pytest.approx((2 * 4.0 * d[2:] - 2 * 16.0).tolist(), rel=1e-3)
    assert torch.equal(robust_squared(d ** 2, 0.0), d ** 2)
    # hand-computed: one point 5 px off (3-4-5), delta 4: 2 * 16 * (sqrt(1 + 25 / 16) - 1) = 32 * (41 ** 0.5 / 4 - 1)
    pred, gt = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[3.0, 4.0]]])
    assert landmark_loss(pred, gt, torch.ones(1), delta_px=4.0).item() == pytest.approx(32 * (41 ** 0.5 / 4 - 1))
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(2, 68, 2, generator=g, dtype=torch.float64, requires_grad=True) * 224
    gt = torch.rand(2, 68, 2, generator=g, dtype=torch.float64) * 224
    assert torch.autograd.gradcheck(lambda p: landmark_loss(p, gt, landmark_weights().double(), 4.0), (pred,))
    # a far outlier pulls with a bounded force: its gradient is at most 2 delta w / (B N) per coordinate
    far = torch.tensor([[[500.0, 0.0]]], requires_grad=True)
    landmark_loss(far, torch.zeros(1, 1, 2), torch.ones(1), 4.0).backward()
    assert far.grad.norm().item() == pytest.approx(8.0, rel=1e-3)


def test_landmark_loss_rejects_mismatched_weights():
    with pytest.raises(ValueError, match=r"weights: expected \(N,\) with B=1, N=68"):
        landmark_loss(torch.zeros(1, 68, 2), torch.zeros(1, 68, 2), torch.ones(5))


# ---------------------------------------------------------------- identity


def test_identity_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    assert identity_loss(a, b).item() == pytest.approx((1.0 + 0.0 + 2.0) / 3)
    # cosine similarity does not depend on the embeddings' length
    assert identity_loss(3 * a, 0.5 * b).item() == pytest.approx((1.0 + 0.0 + 2.0) / 3)
    tilted = torch.tensor([[math.cos(0.3), math.sin(0.3)]])
    assert identity_loss(tilted, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(1 - math.cos(0.3))


def test_identity_loss_gradient_and_empty_batch():
    a = torch.randn(4, 512, requires_grad=True)
    identity_loss(a, torch.randn(4, 512)).backward()
    _assert_finite_grads(a)
    empty = torch.zeros(0, 512, requires_grad=True)
    loss = identity_loss(empty, torch.zeros(0, 512))
    loss.backward()
    assert loss.item() == 0.0
    _assert_finite_grads(empty)


# ---------------------------------------------------------------- regularisers


def test_coefficient_regularizer_hand_computed():
    ident, exp, alb = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]]), torch.tensor([[2.0]])
    expected = 1.0 * 5 + 0.8 * 9 + 1.7e-2 * 4
    assert coefficient_regularizer(ident, exp, alb).item() == pytest.approx(expected)
    # a mean over images: the same face twice costs the same
    assert coefficient_regularizer(ident.repeat(2, 1), exp.repeat(2, 1), alb.repeat(2, 1)).item() == \
        pytest.approx(expected)
    assert coefficient_regularizer(ident, exp, alb, w_id=0.0, w_exp=1.0, w_alb=0.5).item() == pytest.approx(11.0)


def test_coefficient_regularizer_empty_groups():
    # SFM has no albedo coefficients (K_alb = 0)
    ident = torch.tensor([[1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    exp, alb = torch.zeros(2, 0, requires_grad=True), torch.zeros(2, 0, requires_grad=True)
    loss = coefficient_regularizer(ident, exp, alb)
    loss.backward()
    assert loss.item() == pytest.approx(6.0 / 2)
    _assert_finite_grads(ident, exp, alb)
    torch.testing.assert_close(ident.grad, ident.detach())   # d/dx of sum x^2 / B with B = 2
    assert coefficient_regularizer(torch.zeros(0, 80), torch.zeros(0, 64), torch.zeros(0, 80)).item() == 0.0


def test_coefficient_regularizer_rejects_batch_mismatch():
    with pytest.raises(ValueError, match=r"exp: expected \(B, K_exp\) with B=2"):
        coefficient_regularizer(torch.zeros(2, 3), torch.zeros(3, 3), torch.zeros(2, 0))


def test_lighting_regularizer_hand_computed():
    sh = torch.zeros(1, 27)
    sh[0, 0] = 3.0   # red DC band; green and blue 0: per-band mean 1, deviations 2, -1, -1
    assert lighting_regularizer(sh).item() == pytest.approx((4 + 1 + 1) / 27)


def test_lighting_regularizer_is_zero_for_white_light():
    bands = torch.randn(2, 9)
    sh = bands.repeat(1, 3).requires_grad_(True)   # channel-major: r, g, b bands identical
    loss = lighting_regularizer(sh)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    _assert_finite_grads(sh)
    assert lighting_regularizer(torch.zeros(0, 27)).item() == 0.0
    with pytest.raises(ValueError, match=r"sh: expected \(B, 27\)"):
        lighting_regularizer(torch.zeros(2, 9))


def test_reflectance_loss_hand_computed():
    albedo = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [9.0, 9.0, 9.0]]])
    skin = torch.tensor([1.0, 1.0, 0.0])   # the third vertex is not skin
    # skin mean 0.5 per channel; squared deviations 0.25 x 3 channels x 2 vertices, over B x sum(w) = 2
    assert reflectance_loss(albedo, skin).item() == pytest.approx(1.5 / 2)


def test_reflectance_loss_is_zero_for_flat_skin():
    albedo = torch.tensor([0.7, 0.5, 0.4]).repeat(2, 5, 1)
    albedo[:, 4] = torch.tensor([0.1, 0.9, 0.0])   # off the skin region: ignored
    albedo.requires_grad_(True)
    loss = reflectance_loss(albedo, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    _assert_finite_grads(albedo)


def test_reflectance_loss_empty_skin_and_batch():
    albedo = torch.rand(2, 6, 3, requires_grad=True)
    skin = torch.zeros(6, requires_grad=True)
    loss = reflectance_loss(albedo, skin)
    loss.backward()
    assert loss.item() == 0.0
    _assert_finite_grads(albedo, skin)
    assert reflectance_loss(torch.zeros(0, 6, 3), torch.ones(6)).item() == 0.0
    with pytest.raises(ValueError, match=r"skin_weight: expected \(V,\) with B=2, V=6"):
        reflectance_loss(albedo, torch.ones(5))
