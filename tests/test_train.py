"""Training: flip permutation, augmentation geometry, data order, checkpoints and resume, non-finite steps,
trainable face model, DDP (2 gloo processes) against one process, and the stage's params -> config."""
from __future__ import annotations

import math
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from scipy.io import loadmat
from torch import nn

from pipeline.face_model import CoeffLayout, FaceModel, load_face_model, no_mesh468
from pipeline.train import (IBUG_FLIP, AugmentSettings, Dist, TrainConfig, TrainPaths, load_rnet, load_rnet_record,
                            sample_similarity, train, warp)
from pipeline.train.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from pipeline.train.data import epoch_loader, steps_per_epoch
from pipeline.train.evaluate import recompute_batchnorm

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_68 = ROOT.parent / "shared" / "face_models" / "bfm_aux" / "similarity_Lm3D_all.mat"
SIZE = 32  # tiny crops keep the real renderer cheap
NO_AUGMENT = AugmentSettings(shift_px=0.0, scale=0.0, rotation_deg=0.0, flip=0.0)
CPU = Dist(rank=0, world_size=1, device=torch.device("cpu"))


# ---- flip permutation and augmentation geometry

def test_flip_permutation_pairs_and_involution():
    assert sorted(IBUG_FLIP) == list(range(68))
    assert all(IBUG_FLIP[IBUG_FLIP[i]] == i for i in range(68))
    for a, b in [(0, 16), (8, 8), (36, 45), (39, 42), (48, 54), (60, 64), (17, 26), (31, 35)]:
        assert IBUG_FLIP[a] == b and IBUG_FLIP[b] == a
    assert [IBUG_FLIP[i] for i in (27, 28, 29, 30, 33, 51, 57, 62, 66)] == [27, 28, 29, 30, 33, 51, 57, 62, 66]


def test_flip_permutation_mirrors_the_mean_face():
    """Mirroring the (nearly symmetric) mean 3D landmarks and relabelling them gives them back."""
    lm = loadmat(str(TEMPLATE_68))["lm"].astype(np.float64)
    mirrored = lm[list(IBUG_FLIP)] * np.array([-1.0, 1.0, 1.0])
    mirrored[:, 0] += 2 * lm[[27, 28, 29, 30, 33, 51, 57, 8], 0].mean()  # mirror about the face's midline
    spread = np.linalg.norm(lm - lm.mean(0), axis=1).mean()
    assert np.linalg.norm(mirrored - lm, axis=1).max() < 0.1 * spread


def _dot_image(points: dict[int, tuple[float, float]], size: int) -> torch.Tensor:
    """(1, 3, S, S): a 3x3 bright square in channel c at each landmark position."""
    img = torch.zeros(1, 3, size, size)
    for channel, (x, y) in enumerate(points.values()):
        img[0, channel, round(y) - 1:round(y) + 2, round(x) - 1:round(x) + 2] = 1.0
    return img


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_augmented_landmarks_stay_on_their_image_features(flip):
    size = 224
    lmk = torch.rand(1, 68, 2, generator=torch.Generator().manual_seed(0)) * 120 + 52
    marked = {36: (80.0, 90.0), 54: (140.0, 150.0), 30: (112.0, 118.0)}  # right eye corner, mouth corner, nose
    for i, xy in marked.items():
        lmk[0, i] = torch.tensor(xy)
    image, mask = _dot_image(marked, size), torch.ones(1, 1, size, size)
    rows_cols = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).float()
    settings = AugmentSettings(shift_px=10.0, scale=0.1, rotation_deg=10.0, flip=flip)
    for index in range(4):
        mats, flipped = sample_similarity(torch.tensor([index]), epoch=3, seed=7, settings=settings, size=size)
        assert bool(flipped[0]) == (flip == 1.0)
        out, out_mask, out_lmk = warp(image, mask, lmk, mats, flipped)
        for channel, i in enumerate(marked):
            label = IBUG_FLIP[i] if flipped[0] else i  # a mirrored right eye corner is now the left one
            plane = out[0, channel]
            centroid_yx = (plane * rows_cols).sum((1, 2)) / plane.sum()
            assert torch.allclose(centroid_yx.flip(0), out_lmk[0, label], atol=0.3), (index, i)
        assert out_mask.amax() > 0.999 and out_mask.amin() == 0.0  # the border shows where the source ended


def test_similarity_draws_depend_only_on_seed_epoch_and_index():
    s = AugmentSettings()
    a, fa = sample_similarity(torch.tensor([5, 9]), 2, 0, s, 224)
    b, fb = sample_similarity(torch.tensor([9, 5]), 2, 0, s, 224)
    assert torch.equal(a, b.flip(0)) and torch.equal(fa, fb.flip(0))
    c, _ = sample_similarity(torch.tensor([5]), 3, 0, s, 224)
    assert not torch.equal(a[:1], c)
    ident, flipped = sample_similarity(torch.tensor([1]), 0, 0, NO_AUGMENT, 224)
    img = torch.rand(1, 3, 224, 224)
    out, _, _ = warp(img, torch.ones(1, 1, 224, 224), torch.zeros(1, 68, 2), ident, flipped)
    assert torch.allclose(out, img, atol=1e-4)  # float32 round trip through normalised coordinates


# ---- data order

def test_data_order_is_shared_across_processes_and_resumable():
    faces = [{"image": torch.zeros(3, 4, 4), "mask": torch.zeros(1, 4, 4), "lmk_px": torch.zeros(68, 2)}] * 12
    one = [b["index"].tolist() for b in epoch_loader(faces, 1, 0, 4, 0, 0, 1, 0)]
    ranks = [[b["index"].tolist() for b in epoch_loader(faces, 1, 0, 4, 0, r, 2, 0)] for r in (0, 1)]
    assert len(one) == steps_per_epoch(12, 4, 1) == steps_per_epoch(12, 4, 2) == 3
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(x) for x in one]
    assert [b["index"].tolist() for b in epoch_loader(faces, 1, 2, 4, 0, 0, 1, 0)] == one[2:]
    assert one != [b["index"].tolist() for b in epoch_loader(faces, 2, 0, 4, 0, 0, 1, 0)]


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    import random
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    atomic_save({"rng": rng_state()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "s.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_recomputed_batchnorm_statistics_are_the_data_average():
    faces = tiny_faces(8, nan_at=(5,))
    net = nn.Sequential(nn.BatchNorm2d(3, momentum=0.9))
    net.train()(torch.rand(4, 3, SIZE, SIZE) * 9)  # off-data running statistics, as after augmented batches
    recompute_batchnorm(net.eval(), faces, torch.device("cpu"), batch_size=4)
    first, second = (torch.stack([faces[i]["image"] for i in idx]) for idx in ([0, 1, 2, 3], [4, 6, 7]))
    batch_means = torch.stack([first.mean(dim=(0, 2, 3)), second.mean(dim=(0, 2, 3))])  # NaN face 5 left out
    assert torch.allclose(net[0].running_mean, batch_means.mean(dim=0), atol=1e-6)
    assert not net.training and net[0].momentum == 0.9


# ---- training on a tiny face model with the real renderer and losses

def tiny_face_model() -> FaceModel:
    """A 10 x 10 vertex dome, about 20 mm across (a face of ~20 px in a 32 px crop)."""
    n = 10
    ys, xs = np.meshgrid(np.linspace(-10, 10, n), np.linspace(-10, 10, n), indexing="ij")
    zs = 5.0 * np.cos(xs / 14) * np.cos(ys / 14)
    mean = np.stack([xs, ys, zs], -1).reshape(-1, 3).astype(np.float32)
    tris = [[r * n + c, r * n + c + 1, (r + 1) * n + c + 1] for r in range(n - 1) for c in range(n - 1)]
    tris += [[r * n + c, (r + 1) * n + c + 1, (r + 1) * n + c] for r in range(n - 1) for c in range(n - 1)]
    rng = np.random.default_rng(0)
    v = n * n
    return FaceModel(
        mean_shape=mean, id_basis=rng.normal(0, 0.5, (3 * v, 4)).astype(np.float32),
        exp_basis=rng.normal(0, 0.5, (3 * v, 2)).astype(np.float32),
        mean_albedo=np.full((v, 3), 0.6, np.float32), albedo_basis=rng.normal(0, 0.05, (3 * v, 2)).astype(np.float32),
        triangles=np.asarray(tris, np.int64), landmarks=rng.choice(v, 68, replace=False).astype(np.int64),
        face_region=np.ones(v, np.float32), **no_mesh468(), name="tiny", version="test", licence="test")


def tiny_faces(n: int, seed: int = 0, nan_at: tuple[int, ...] = ()) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    faces = []
    for i in range(n):
        image = torch.rand(3, SIZE, SIZE, generator=g) * 0.5 + 0.25
        if i in nan_at:
            image[:, 3, 3] = math.nan
        mask = torch.zeros(1, SIZE, SIZE)
        mask[:, : 4 + 7 * i % (SIZE - 4)] = 1.0  # face masks of different areas, as real ones
        faces.append({"image": image, "mask": mask, "lmk_px": torch.rand(68, 2, generator=g) * 16 + 8})
    return faces


def tiny_net(n_coeffs: int, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 4, stride=4)] + ([nn.BatchNorm2d(4)] if batch_norm else []) + [
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, n_coeffs)]
    net = nn.Sequential(*layers)
    with torch.no_grad():  # R-Net's head starts at zero (the mean face); small here so early layers learn too
        net[-1].weight.mul_(0.01)
        net[-1].bias.zero_()
    return net


def tiny_config(**kw) -> TrainConfig:
    base = dict(arch="resnet18", epochs=3, batch_size=4, lr=1.0e-3, lr_decay_epochs=2, grad_clip=5.0,
                augment=NO_AUGMENT, checkpoint_every=2, eval_every=3)
    return TrainConfig(**{**base, **kw})


def paths_in(folder: Path) -> TrainPaths:
    return TrainPaths(rnet=folder / "rnet.pt", last=folder / "rnet_last.pt", face_model=folder / "fm.npz",
                      grid=folder / "grid.png")


def run_tiny(cfg: TrainConfig, folder: Path, faces: list[dict], val: list[dict], world: Dist = CPU,
             batch_norm: bool = False, log=None, resume: bool = True):
    model = tiny_face_model()
    net = tiny_net(CoeffLayout.of(model).size, batch_norm)
    return train(cfg, net, model, faces, val, paths_in(folder), world, log=log, resume=resume)


class Interrupt(Exception):
    pass


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    cfg = tiny_config(augment=AugmentSettings(), epochs=2)
    faces = tiny_faces(12)
    full = run_tiny(cfg, tmp_path / "full", faces, [])
    assert [s for s, _ in full.step_losses] == list(range(1, 7))
    assert full.metrics["val_is_train"] and full.metrics["steps"] == 6 and full.metrics["epochs"] == 2

    def crash_at_5(step, values):
        if step == 5:
            raise Interrupt
    with pytest.raises(Interrupt):
        run_tiny(cfg, tmp_path / "cut", faces, [], log=crash_at_5)
    assert load_checkpoint(tmp_path / "cut" / "rnet_last.pt")["step"] == 4
    resumed = run_tiny(cfg, tmp_path / "cut", faces, [])
    assert resumed.metrics["resumed_from_step"] == 4
    assert [s for s, _ in resumed.step_losses] == [5, 6]
    assert np.allclose([v for _, v in resumed.step_losses], [v for _, v in full.step_losses[4:]], rtol=1e-6)
    a, b = (load_checkpoint(tmp_path / d / "rnet.pt")["state_dict"] for d in ("full", "cut"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert full.step_losses[-1][1] < full.step_losses[0][1]


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    faces = tiny_faces(8, nan_at=(2,))  # one bad face: one bad batch per epoch
    cfg = tiny_config(epochs=2, max_nonfinite=2)
    result = run_tiny(cfg, tmp_path / "a", faces, tiny_faces(2, seed=1), batch_norm=True)
    assert result.metrics["nonfinite_steps"] == 2 and result.metrics["steps"] == 4
    assert sum(math.isnan(v) for _, v in result.step_losses) == 2
    state = load_checkpoint(tmp_path / "a" / "rnet.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())  # BN stats too
    assert math.isfinite(result.metrics["val_landmark_px"])
    with pytest.raises(RuntimeError, match="max_nonfinite"):
        run_tiny(replace(cfg, epochs=3), tmp_path / "b", faces, tiny_faces(2, seed=1), batch_norm=True)


def test_trainable_face_model_is_trained_regularised_and_saved(tmp_path):
    cfg = tiny_config(epochs=2, trainable=("mean_albedo", "id_basis"), face_model_lr=1.0e-2)
    logged = {}
    run_tiny(cfg, tmp_path, tiny_faces(8), [], log=lambda step, values: logged.update(values))
    start, trained = tiny_face_model(), load_face_model(tmp_path / "fm.npz")
    assert trained.version == "test+trained" and np.array_equal(trained.exp_basis, start.exp_basis)
    assert not np.allclose(trained.mean_albedo, start.mean_albedo)
    assert not np.allclose(trained.id_basis, start.id_basis)
    assert logged["train/face_model_prior"] > 0
    record = load_rnet_record(tmp_path / "rnet.pt")
    assert record["face_model"]["file"] == "fm.npz" and record["face_model"]["version"] == "test+trained"


# ---- DDP: two gloo processes == one process with the whole batch

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    import os
    from pipeline.train import init_distributed, shutdown

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    world = init_distributed("cpu")
    try:
        run_tiny(tiny_config(epochs=2), Path(folder), tiny_faces(8), tiny_faces(2, seed=1), world=world)
    finally:
        shutdown(world)


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    single = run_tiny(tiny_config(epochs=2), tmp_path / "one", tiny_faces(8), tiny_faces(2, seed=1))
    a, b = (load_checkpoint(tmp_path / d / "rnet.pt")["state_dict"] for d in ("ddp", "one"))
    assert single.metrics["steps"] == 4
    start = tiny_net(CoeffLayout.of(tiny_face_model()).size).state_dict()
    moved = sum(float((b[k] - start[k]).abs().sum()) for k in b)
    assert moved > 1e-3, "the run must actually change the weights for the comparison to mean anything"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


# ---- the stage's params and the final checkpoint

def test_params_yaml_builds_the_train_config():
    from stages.train import train_config

    p = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    cfg = train_config(p)
    assert cfg.arch == "resnet18" and cfg.loss.photometric == 1.92 and cfg.loss.landmark == 1.6e-3
    assert (cfg.nose_weight, cfg.mouth_weight) == (20.0, 20.0)
    assert cfg.augment == AugmentSettings() and cfg.trainable == ()
    assert all(isinstance(v, float) for v in (cfg.lr, cfg.lr_decay, cfg.loss.w_alb))  # 1.0e-4, not "1e-4"


def test_rnet_checkpoint_rebuilds_the_network(tmp_path):
    from pipeline.nets import build_rnet
    from pipeline.train.checkpoint import rnet_record

    model = tiny_face_model()
    layout = CoeffLayout.of(model)
    net = build_rnet("resnet18", layout.size, None)
    with torch.no_grad():
        net.fc.weight.normal_()  # anything but the zero head, so a load that does nothing would show
    atomic_save(rnet_record(net, "resnet18", layout, model, "fm.npz", 224, {}), tmp_path / "rnet.pt")
    loaded = load_rnet(tmp_path / "rnet.pt")
    x = torch.rand(2, 3, 224, 224)
    assert torch.allclose(loaded(x), net.eval()(x), atol=1e-5)
    assert load_rnet_record(tmp_path / "rnet.pt")["n_coeffs"] == layout.size


def test_reconstruction_decodes_with_the_face_model_the_network_was_trained_with(tmp_path):
    from dataclasses import replace

    from pipeline.face_model import save_face_model
    from pipeline.nets import build_rnet
    from pipeline.train.checkpoint import decoding_face_model, rnet_record

    start = tiny_face_model()
    trained = replace(start, mean_albedo=start.mean_albedo * 0.9)  # as train.trainable would change it
    save_face_model(start, tmp_path / "configured.npz")
    net = build_rnet("resnet18", CoeffLayout.of(start).size, None)
    atomic_save(rnet_record(net, "resnet18", CoeffLayout.of(start), trained, "fm.npz", 224, {}), tmp_path / "rnet.pt")
    with pytest.raises(ValueError, match="neither"):
        decoding_face_model(tmp_path / "rnet.pt", tmp_path / "configured.npz")  # the trained copy is not there
    save_face_model(trained, tmp_path / "fm.npz")
    path, chosen = decoding_face_model(tmp_path / "rnet.pt", tmp_path / "configured.npz")
    assert path == tmp_path / "fm.npz"
    np.testing.assert_array_equal(chosen.mean_albedo, trained.mean_albedo)
    save_face_model(trained, tmp_path / "configured.npz")
    assert decoding_face_model(tmp_path / "rnet.pt", tmp_path / "configured.npz")[0] == tmp_path / "configured.npz"
