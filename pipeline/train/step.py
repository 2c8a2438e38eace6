"""One optimisation step of R-Net (and optionally the face model) under the hybrid-level loss.

R-Net regresses coefficients, the face model and renderer turn them into an image and landmarks, and the
loss of Deng et al. (2019) compares them with the photo (weak supervision: no 3D labels). The loss of a
batch is the mean over its samples of each sample's loss (every hybrid term is a per-sample mean) and DDP
averages gradients over processes, so N processes with B/N samples each take the step of one process with all B (BatchNorm
statistics aside: they stay per process, as in Deep3DFaceRecon). Adam, lr x `lr_decay` every
`lr_decay_epochs` epochs (counted in steps), gradients clipped to `grad_clip`, AMP (float16 + GradScaler)
on CUDA only. A step whose loss is not finite in any process is skipped by all of them and counted; more
than `max_nonfinite` end the run with an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..face_model import Camera, FaceDecoder, FaceModel
from ..losses import landmark_weights
from ..losses.hybrid import hybrid_loss
from ..nets.identity import load_identity_features
from ..render.face import FaceRender, render_face
from .augment import sample_similarity, warp
from .config import TrainConfig
from .distributed import Dist, all_mean, all_true


class Reconstructor(nn.Module):
    """R-Net + face model + renderer: crops (B, 3, S, S) in [0, 1] -> (coeffs (B, C) float32, FaceRender).
    One module so that DDP also averages the gradients of trainable face model arrays."""

    def __init__(self, net: nn.Module, decoder: FaceDecoder, amp: bool):
        super().__init__()
        self.net, self.decoder, self.amp = net, decoder, amp

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, FaceRender]:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            coeffs = self.net(image)
        coeffs = coeffs.float()  # geometry, rendering and losses stay in float32
        return coeffs, render_face(self.decoder, coeffs)


def face_model_prior(decoder: FaceDecoder, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the trained face model arrays {name: start value} of the mean squared change from the start."""
    return sum(((getattr(decoder, name) - value) ** 2).mean() for name, value in start.items())


@dataclass
class StepResult:
    finite: bool                  # False: the step was skipped (non-finite loss or gradient)
    curves: dict[str, float]      # 'loss' and each term, averaged over processes, plus the step's 'lr'


class Trainer:
    """Network, face model, optimiser, lr schedule and AMP scaler of one process, and their step."""

    def __init__(self, cfg: TrainConfig, net: nn.Module, face_model: FaceModel, image_size: int, world: Dist,
                 steps_per_epoch: int):
        self.cfg, self.net, self.face_model, self.world = cfg, net, face_model, world
        device = world.device
        self.trainable = tuple(k for k in cfg.trainable if getattr(face_model, k).size > 0)
        if set(cfg.trainable) - set(self.trainable) and world.is_main:
            print(f"face model arrays without components, not trained: "
                  f"{sorted(set(cfg.trainable) - set(self.trainable))}")
        self.decoder = FaceDecoder(face_model, Camera(size_px=image_size), trainable=self.trainable).to(device)
        self.start_arrays = {k: getattr(self.decoder, k).detach().clone() for k in self.trainable}
        self.amp = device.type == "cuda"
        model = Reconstructor(net.to(device), self.decoder, self.amp)
        # the decoder's buffers (the bases) never change: synchronised once at init, not before every step
        self.model = (DistributedDataParallel(model, device_ids=[device.index] if self.amp else None,
                                              forward_sync_buffers=False) if world.world_size > 1 else model)
        groups = [{"params": list(net.parameters()), "lr": cfg.lr}]
        if self.trainable:
            groups.append({"params": list(self.decoder.parameters()), "lr": cfg.face_model_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.schedule = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_decay_epochs * steps_per_epoch,
                                                        gamma=cfg.lr_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.lmk_weights = landmark_weights(cfg.nose_weight, cfg.mouth_weight).to(device)
        self.identity = (load_identity_features(cfg.identity_net, cfg.identity_weights, str(device))
                         if cfg.loss.identity > 0 else None)
        self.nonfinite = 0
        self._net_buffers = [b for b in net.buffers() if b.is_floating_point()]

    def step(self, batch: dict[str, torch.Tensor], epoch: int) -> StepResult:
        """Augment `batch` (image (B, 3, S, S), mask (B, 1, S, S), lmk_px (B, 68, 2), index (B,)), take one
        optimiser step and one lr schedule step. Raises RuntimeError past cfg.max_nonfinite skipped steps."""
        cfg, device = self.cfg, self.world.device
        image, mask, lmk_px = (batch[k].to(device, non_blocking=True) for k in ("image", "mask", "lmk_px"))
        mats, flipped = sample_similarity(batch["index"], epoch, cfg.seed, cfg.augment, image.shape[-1])
        image, mask, lmk_px = warp(image, mask, lmk_px, mats, flipped)
        saved_buffers = [b.clone() for b in self._net_buffers]
        coeffs, face = self.model(image)
        total, terms = hybrid_loss(face, self.decoder.layout.split(coeffs), image, mask, lmk_px,
                                   self.lmk_weights, self.decoder.face_region, cfg.loss, self.identity)
        if self.trainable:
            terms["face_model_prior"] = face_model_prior(self.decoder, self.start_arrays)
            total = total + cfg.face_model_reg * terms["face_model_prior"]
        loss_ok = all_true(bool(torch.isfinite(total)), self.world, device)
        self.scaler.scale(total).backward()  # every process joins DDP's gradient all-reduce, even to skip
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        finite = loss_ok and bool(torch.isfinite(grad_norm))  # the norm is of the all-reduced gradients
        if finite:
            self.scaler.step(self.optimizer)
            if "mean_albedo" in self.trainable:
                with torch.no_grad():
                    self.decoder.mean_albedo.clamp_(0.0, 1.0)  # the face model format keeps albedo in [0, 1]
        elif not loss_ok or not self.amp:  # with AMP, inf gradients of a finite loss are the scaler's business
            self._skip(saved_buffers, terms)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.schedule.step()
        values = all_mean(torch.stack([total.detach(), *[t.detach() for t in terms.values()]]), self.world)
        curves = dict(zip(["loss", *terms], values.tolist()))
        return StepResult(finite, {**curves, "lr": lr})

    def _skip(self, saved_buffers: list[torch.Tensor], terms: dict[str, torch.Tensor]) -> None:
        self.nonfinite += 1
        with torch.no_grad():  # the bad forward pass also moved the BatchNorm statistics: put them back
            for b, saved in zip(self._net_buffers, saved_buffers):
                b.copy_(saved)
        if self.nonfinite > self.cfg.max_nonfinite:
            raise RuntimeError(
                f"training stopped: {self.nonfinite} steps with a non-finite loss or gradient, more than "
                f"train.max_nonfinite = {self.cfg.max_nonfinite} (last terms: "
                f"{ {k: float(v.detach()) for k, v in terms.items()} }). Check the data, lower train.lr.")

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "decoder": self.decoder.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.nonfinite = state["nonfinite"]

    def trained_face_model(self) -> FaceModel:
        """The face model with the trained arrays (the input model itself if nothing was trained)."""
        if not self.trainable:
            return self.face_model
        arrays = {k: getattr(self.decoder, k).detach().cpu().numpy() for k in self.trainable}
        return replace(self.face_model, **arrays, version=f"{self.face_model.version}+trained")

