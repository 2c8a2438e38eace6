"""Networks: structure pinned to the reference implementations, strict checkpoint loading, the ArcFace warp.

The reference facts below were checked against the reference sources (TreB1eN/InsightFace_Pytorch model.py
`Backbone(50, 0.6, 'ir_se')`; zllrunning/face-parsing.PyTorch model.py + resnet.py `BiSeNet(19)`): key counts
follow from their module lists (ArcFace: 7 input-layer keys + 24 units x 15 + 3 conv shortcuts x 6 + 12
output-layer keys = 397; BiSeNet: 120 ResNet-18 keys + 42 context-path keys + 8 fusion keys + 3 heads x 7 =
191), and running the reference classes on the same weights gave identical outputs.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision

from pipeline.nets import build_rnet, crop_to_arcface, load_arcface, load_bisenet
from pipeline.nets.arcface import ARCFACE_TEMPLATE_PX, CROP_TO_ARCFACE, DENG_TEMPLATE_PX, ArcFaceIRSE50
from pipeline.nets.bisenet import CLASS_NAMES, BiSeNet
from pipeline.nets.rnet import RESNETS


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _with_trained_statistics(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    # fresh BatchNorm buffers (mean 0, var 1) would hide a buffer that is not loaded
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.copy_(0.1 * torch.randn(v.shape, generator=g))
        elif k.endswith("running_var"):
            v.copy_(0.5 + torch.rand(v.shape, generator=g))
    net.load_state_dict(state)
    return state


@pytest.fixture(scope="module")
def arcface_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _with_trained_statistics(ArcFaceIRSE50())


@pytest.fixture(scope="module")
def bisenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _with_trained_statistics(BiSeNet())


# ---------------------------------------------------------------- ArcFace IR-SE50


def test_arcface_structure_matches_reference(arcface_state):
    assert len(arcface_state) == 397
    assert sum(not k.endswith("num_batches_tracked") for k in arcface_state) == 343
    assert _n_params(ArcFaceIRSE50()) == 43_797_696
    shapes = {k: tuple(v.shape) for k, v in arcface_state.items()}
    assert shapes["input_layer.0.weight"] == (64, 3, 3, 3)
    assert shapes["input_layer.2.weight"] == (64,)                 # PReLU
    assert shapes["output_layer.0.weight"] == (512,)               # BatchNorm2d
    assert shapes["output_layer.3.weight"] == (512, 512 * 7 * 7)   # Linear after Dropout and Flatten
    assert shapes["output_layer.4.running_var"] == (512,)          # BatchNorm1d
    assert shapes["body.0.res_layer.5.fc1.weight"] == (4, 64, 1, 1)     # SE, reduction 16
    assert shapes["body.23.res_layer.5.fc2.weight"] == (512, 32, 1, 1)
    assert "body.24.res_layer.0.weight" not in shapes                    # 3 + 4 + 14 + 3 units
    # conv shortcuts only where the width changes; elsewhere a parameter-free strided max-pool
    assert sorted(k for k in shapes if k.endswith("shortcut_layer.0.weight")) == [
        "body.21.shortcut_layer.0.weight", "body.3.shortcut_layer.0.weight", "body.7.shortcut_layer.0.weight"]
    assert shapes["body.3.shortcut_layer.0.weight"] == (128, 64, 1, 1)


@pytest.fixture(scope="module")
def arcface_net(arcface_state, tmp_path_factory) -> ArcFaceIRSE50:
    path = tmp_path_factory.mktemp("arcface") / "model_ir_se50.pth"
    torch.save(arcface_state, path)
    return load_arcface(path, "cpu")


def test_arcface_strict_round_trip(arcface_net, arcface_state):
    net = arcface_net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, arcface_state[k]), k

    img = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1), requires_grad=True)
    emb = net(img)
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(net(img), emb, rtol=0, atol=0)
    emb[:, 0].sum().backward()   # frozen weights, but the identity loss needs gradients at the image
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_arcface_normalises_input_as_reference(arcface_net):
    net = arcface_net
    img = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        raw = net.output_layer(net.body(net.input_layer(2 * img - 1)))
        torch.testing.assert_close(net(img), raw / raw.norm(dim=1, keepdim=True))


def test_arcface_loads_checkpoint_without_batchnorm_counters(arcface_state, tmp_path):
    old = {k: v for k, v in arcface_state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    net = load_arcface(tmp_path / "old.pth")
    assert torch.equal(net.state_dict()["output_layer.3.weight"], arcface_state["output_layer.3.weight"])


def test_arcface_rejects_wrong_input_shape(arcface_net):
    with pytest.raises(ValueError, match=r"img: expected \(B, 3, 112, 112\)"):
        arcface_net(torch.rand(1, 3, 224, 224))


# ---------------------------------------------------------------- BiSeNet


def test_bisenet_structure_matches_reference(bisenet_state):
    assert len(bisenet_state) == 191
    assert sum(not k.endswith("num_batches_tracked") for k in bisenet_state) == 160
    assert _n_params(BiSeNet()) == 13_300_416
    assert len(CLASS_NAMES) == 19 and CLASS_NAMES[1] == "skin" and CLASS_NAMES[17] == "hair"
    shapes = {k: tuple(v.shape) for k, v in bisenet_state.items()}
    assert shapes["cp.resnet.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["cp.resnet.layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["cp.arm16.conv.conv.weight"] == (128, 256, 3, 3)
    assert shapes["cp.arm32.conv_atten.weight"] == (128, 128, 1, 1)
    assert shapes["cp.conv_avg.conv.weight"] == (128, 512, 1, 1)
    assert shapes["ffm.convblk.conv.weight"] == (256, 256, 1, 1)
    assert shapes["ffm.conv1.weight"] == (64, 256, 1, 1)
    assert shapes["conv_out.conv_out.weight"] == (19, 256, 1, 1)
    assert shapes["conv_out16.conv_out.weight"] == (19, 64, 1, 1)
    assert shapes["conv_out32.conv.conv.weight"] == (64, 128, 3, 3)
    # the context path's trunk is ResNet-18 without its classifier; the unused spatial path is absent
    resnet18 = {f"cp.resnet.{k}": tuple(v.shape) for k, v in torchvision.models.resnet18().state_dict().items()
                if not k.startswith("fc.")}
    assert {k: v for k, v in shapes.items() if k.startswith("cp.resnet.")} == resnet18
    assert not any(k.startswith("sp.") for k in shapes)


def test_bisenet_strict_round_trip(bisenet_state, tmp_path):
    torch.save(bisenet_state, tmp_path / "79999_iter.pth")
    net = load_bisenet(tmp_path / "79999_iter.pth", "cpu")
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, bisenet_state[k]), k
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = net(x)
        assert logits.shape == (2, 19, 64, 48)
        assert torch.equal(net(x), logits)
        net.train()
        outputs = net(x)
    assert len(outputs) == 3 and all(o.shape == (2, 19, 64, 48) for o in outputs)


def test_bisenet_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"x: expected \(B, 3, H, W\)"):
        BiSeNet().eval()(torch.rand(1, 1, 64, 64))


# ---------------------------------------------------------------- checkpoint errors, both loaders


@pytest.mark.parametrize("loader, state_name, key", [
    (load_arcface, "arcface_state", "output_layer.3.bias"),
    (load_bisenet, "bisenet_state", "conv_out.conv_out.weight"),
])
def test_loaders_name_the_offending_keys(loader, state_name, key, request, tmp_path):
    state = request.getfixturevalue(state_name)
    path = tmp_path / "w.pth"

    torch.save({k: v for k, v in state.items() if k != key}, path)
    with pytest.raises(ValueError, match=rf"missing keys \(1\): {re.escape(key)}$"):
        loader(path)

    torch.save({**state, "head.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): head\.weight$"):
        loader(path)

    torch.save({**state, key: state[key][:5]}, path)
    with pytest.raises(ValueError, match=rf"wrong shapes \(1\): {re.escape(key)} \[file \(5,.*\) "
                                         rf"vs network \({state[key].shape[0]},.*\)\]$"):
        loader(path)


@pytest.mark.parametrize("loader", [load_arcface, load_bisenet])
def test_loaders_reject_files_that_are_not_state_dicts(loader, tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        loader(text)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"does not hold a state dict .* got list"):
        loader(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError):
        loader(tmp_path / "absent.pth")


# ---------------------------------------------------------------- crop_to_arcface


def test_crop_to_arcface_matrix_maps_template_onto_template():
    mapped = DENG_TEMPLATE_PX @ CROP_TO_ARCFACE[:, :2].T + CROP_TO_ARCFACE[:, 2]
    # the two templates differ slightly in shape: a similarity fits them to under a pixel
    assert np.abs(mapped - ARCFACE_TEMPLATE_PX).max() < 1.0
    a, b = CROP_TO_ARCFACE[0, 0], CROP_TO_ARCFACE[1, 0]
    assert CROP_TO_ARCFACE[1, 1] == pytest.approx(a) and CROP_TO_ARCFACE[0, 1] == pytest.approx(-b)
    assert np.hypot(a, b) == pytest.approx(0.58, abs=0.01)  # 224 -> 112 with the face a little larger


def test_crop_to_arcface_template_points_land_on_arcface_template():
    # one Gaussian blob per channel at each of our template points; its centroid after the warp must be the
    # point mapped by CROP_TO_ARCFACE, which is within a pixel of ArcFace's template
    ys, xs = torch.meshgrid(torch.arange(224.0, dtype=torch.float64), torch.arange(224.0, dtype=torch.float64),
                            indexing="ij")
    pts = torch.from_numpy(DENG_TEMPLATE_PX)
    img = torch.exp(-((xs - pts[:, 0, None, None]) ** 2 + (ys - pts[:, 1, None, None]) ** 2) / (2 * 3.0 ** 2))
    out = crop_to_arcface(img[None])[0]
    assert out.shape == (5, 112, 112) and out.dtype == torch.float64
    oy, ox = torch.meshgrid(torch.arange(112.0, dtype=torch.float64), torch.arange(112.0, dtype=torch.float64),
                            indexing="ij")
    mass = out.sum(dim=(1, 2))
    centroids = torch.stack([(out * ox).sum(dim=(1, 2)) / mass, (out * oy).sum(dim=(1, 2)) / mass], 1).numpy()
    expected = DENG_TEMPLATE_PX @ CROP_TO_ARCFACE[:, :2].T + CROP_TO_ARCFACE[:, 2]
    np.testing.assert_allclose(centroids, expected, atol=0.05)
    assert np.abs(centroids - ARCFACE_TEMPLATE_PX).max() < 1.0


def test_crop_to_arcface_is_a_differentiable_bilinear_resampling():
    img = torch.ones(1, 1, 224, 224, dtype=torch.float64, requires_grad=True)
    out = crop_to_arcface(img)
    assert out[0, 0, 56, 56].item() == pytest.approx(1.0)   # interior: bilinear weights sum to 1
    assert out[0, 0, 0, 0].item() == 0.0                      # above the crop: zero padding
    out[0, 0, 56, 56].backward()
    grad = img.grad[0, 0]
    assert grad.min() >= 0 and grad.sum().item() == pytest.approx(1.0) and (grad > 0).sum() <= 4
    inverse = np.linalg.inv(np.vstack([CROP_TO_ARCFACE, [0, 0, 1]]))
    source_x, source_y = (inverse @ [56.0, 56.0, 1.0])[:2]
    rows, cols = torch.nonzero(grad, as_tuple=True)
    assert abs(float((grad[rows, cols] * cols).sum()) - source_x) < 1e-6
    assert abs(float((grad[rows, cols] * rows).sum()) - source_y) < 1e-6


def test_crop_to_arcface_rejects_other_sizes():
    with pytest.raises(ValueError, match=r"expected a float \(B, C, 224, 224\)"):
        crop_to_arcface(torch.rand(1, 3, 112, 112))


# ---------------------------------------------------------------- R-Net


@pytest.mark.parametrize("arch", sorted(RESNETS))
def test_rnet_is_torchvision_resnet_with_coefficient_head(arch):
    net = build_rnet(arch, 257, None)
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=257)
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}


def test_rnet_starts_at_the_mean_face_and_learns():
    torch.manual_seed(0)
    net = build_rnet("resnet18", 257, None)
    img = torch.rand(2, 3, 224, 224)
    out = net(img)
    assert out.shape == (2, 257) and torch.equal(out, torch.zeros(2, 257))
    out[:, 5].sum().backward()
    assert net.fc.weight.grad[5].abs().sum() > 0 and net.fc.bias.grad[5] == 2.0


def test_rnet_loads_imagenet_backbone_strictly(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(weights=None)   # stands in for resnet18-f37072fd.pth
    state = _with_trained_statistics(imagenet)
    torch.save(state, tmp_path / "resnet18.pth")
    net = build_rnet("resnet18", 102, tmp_path / "resnet18.pth")
    for k, v in net.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, state[k]), k
    assert not net.fc.weight.any() and not net.fc.bias.any()
    # files without the ImageNet classifier load too
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "trunk.pth")
    assert torch.equal(build_rnet("resnet18", 102, tmp_path / "trunk.pth").conv1.weight, state["conv1.weight"])


def test_rnet_init_weights_errors_name_keys(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "w.pth"
    torch.save({k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"}, path)
    with pytest.raises(ValueError, match=r"as the resnet18 backbone.*missing keys \(1\): layer4\.1\.bn2\.running_var"):
        build_rnet("resnet18", 257, path)
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): conv1\.weight \[file \(64, 3, 3, 3\) "
                                         r"vs network \(64, 3, 7, 7\)\]"):
        build_rnet("resnet18", 257, path)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): layer1\.2\.conv1\.weight"):
        build_rnet("resnet34", 257, path)   # a resnet18 file for a resnet34


def test_rnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="arch: expected one of"):
        build_rnet("vgg16", 257, None)
    with pytest.raises(ValueError, match="n_coeffs"):
        build_rnet("resnet18", 0, None)
    with pytest.raises(ValueError, match=r"img: expected \(B, 3, H, W\)"):
        build_rnet("resnet18", 257, None)(torch.rand(1, 224, 224))
