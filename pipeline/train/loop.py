"""The training run: data order, validation, curves, resumable checkpoints and the final network.

One code path for one CPU process, one GPU and torchrun DDP (distributed.py); the step itself is step.py.
Validation runs at the start (the zero-initialised head predicts exactly the mean face), every
`eval_every` steps and at the end, on the val split or, when that is empty, on the train split
(`val_is_train`). Before the final validation and rnet.pt, BatchNorm statistics are recomputed over the
un-augmented training faces (evaluate.recompute_batchnorm). Every `checkpoint_every` steps the whole state
(model, optimiser, schedule, scaler, RNG states of every process, step = position in the data order) is
written atomically; a later run with the same config, process count, data size and face model resumes
from it and repeats the uninterrupted run's steps exactly.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..face_model import CoeffLayout, FaceModel, save_face_model
from .checkpoint import atomic_save, face_model_digest, load_checkpoint, rng_state, rnet_record, set_rng_state
from .config import TrainConfig
from .data import epoch_loader, seed_everything, steps_per_epoch
from .distributed import Dist, barrier
from .evaluate import evaluate, recompute_batchnorm, write_png
from .step import Trainer


@dataclass(frozen=True)
class TrainPaths:
    rnet: Path        # final weights + how to rebuild them (models/rnet.pt)
    last: Path        # resumable state, overwritten every checkpoint_every steps
    face_model: Path  # the face model the network's coefficients decode with (updated if trainable)
    grid: Path        # preview grid PNG, rewritten at every validation pass


@dataclass
class TrainResult:
    metrics: dict                       # what reports/train.json holds (rank 0; empty elsewhere)
    step_losses: list[tuple[int, float]]  # (step, total loss) of the steps this call ran; skipped: nan


def train(cfg: TrainConfig, net: nn.Module, face_model: FaceModel, train_set: Dataset, val_set: Dataset,
          paths: TrainPaths, world: Dist, log: Callable[[int, dict[str, float]], None] | None = None,
          resume: bool = True) -> TrainResult:
    """Train `net` ((B, 3, S, S) in [0, 1] -> (B, C) coefficients of `face_model`, zero-initialised output
    layer) on `train_set` items {image (3, S, S), mask (1, S, S), lmk_px (68, 2) px}; validate on `val_set`.
    `log(step, {name: value})` receives the curves (rank 0). Writes `paths` (rank 0), returns the metrics;
    raises RuntimeError after more than cfg.max_nonfinite non-finite steps."""
    if len(train_set) == 0:
        raise ValueError("the train split is empty: nothing to train on")
    if cfg.batch_size % world.world_size:
        raise ValueError(f"train.batch_size {cfg.batch_size} must split evenly over {world.world_size} processes")
    seed_everything(cfg.seed + world.rank)
    per_epoch = steps_per_epoch(len(train_set), cfg.batch_size, world.world_size)
    total_steps = cfg.epochs * per_epoch
    trainer = Trainer(cfg, net, face_model, int(train_set[0]["image"].shape[-1]), world, per_epoch)
    val_faces, val_is_train = (val_set, False) if len(val_set) > 0 else (train_set, True)
    fingerprint = {"config": asdict(cfg), "world_size": world.world_size, "n_train": len(train_set),
                   "face_model": face_model_digest(face_model)}
    _say(world, f"{len(train_set)} training faces, {total_steps} steps ({cfg.epochs} epochs of {per_epoch}); "
                f"identity loss {f'on ({cfg.identity_net})' if trainer.identity else 'off'}")

    step, images, train_seconds, val_start = 0, 0, 0.0, None
    state = _read_resumable(paths.last, world) if resume and paths.last.exists() else None
    if state is not None:
        if state["fingerprint"] != fingerprint:
            _say(world, f"{paths.last} is from other params, data or face model: training from scratch")
        elif state["step"] >= total_steps:
            _say(world, f"{paths.last} is a finished run: training from scratch")
        else:
            trainer.load_state_dict(state["trainer"])
            set_rng_state(state["rng"][world.rank])
            step, images, train_seconds = state["step"], state["images"], state["train_seconds"]
            val_start = state["val_start"]
            _say(world, f"resuming from {paths.last} at step {step} of {total_steps}")
    resumed_from = step

    def validate() -> dict[str, float]:
        metrics, grid = evaluate(net, trainer.decoder, val_faces, world.device,
                                 max(1, cfg.batch_size // world.world_size))
        write_png(paths.grid, grid)
        if log:
            log(step, {f"val/{k}": v for k, v in metrics.items()})
        return metrics

    if world.is_main and val_start is None:
        val_start = validate()
    step_losses = []
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not world.is_main,
               mininterval=1.0)
    while step < total_steps:
        epoch, first_batch = divmod(step, per_epoch)
        tic = time.perf_counter()
        for batch in epoch_loader(train_set, epoch, first_batch, cfg.batch_size, cfg.seed, world.rank,
                                  world.world_size, cfg.loader_workers):
            result = trainer.step(batch, epoch)
            train_seconds += time.perf_counter() - tic  # loading and stepping, not validating or saving
            step += 1
            images += len(batch["index"]) * world.world_size
            step_losses.append((step, result.curves["loss"] if result.finite else float("nan")))
            bar.update(1)
            bar.set_postfix(loss=f"{step_losses[-1][1]:.4g}", img_s=f"{images / max(train_seconds, 1e-9):.1f}",
                            refresh=False)
            if world.is_main and log:
                log(step, {("lr" if k == "lr" else f"train/{k}"): v for k, v in result.curves.items()})
            if world.is_main and step % cfg.eval_every == 0 and step < total_steps:
                validate()
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                state = {"fingerprint": fingerprint, "step": step, "images": images, "train_seconds": train_seconds,
                         "val_start": val_start, "trainer": trainer.state_dict(), "rng": _gather_rng(world)}
                if world.is_main:
                    atomic_save(state, paths.last)
                barrier(world)
            tic = time.perf_counter()

    bar.close()
    metrics = {}
    if world.is_main:
        recompute_batchnorm(net, train_set, world.device, max(1, cfg.batch_size // world.world_size))
        val_end = validate()
        trained_model = trainer.trained_face_model()
        save_face_model(trained_model, paths.face_model)
        atomic_save(rnet_record(net, cfg.arch, CoeffLayout.of(face_model), trained_model, paths.face_model.name,
                                trainer.decoder.camera.size_px, asdict(cfg)), paths.rnet)
        metrics = {
            "val_landmark_px_start": val_start["landmark_px"], "val_landmark_px": val_end["landmark_px"],
            "val_photometric_start": val_start["photometric"], "val_photometric": val_end["photometric"],
            "val_is_train": val_is_train, "n_train": len(train_set), "n_val": len(val_faces),
            "steps": step, "epochs": step / per_epoch, "nonfinite_steps": trainer.nonfinite,
            "train_seconds": train_seconds, "train_img_s": images / max(train_seconds, 1e-9),
            "resumed_from_step": resumed_from, "world_size": world.world_size, "device": world.device.type,
            "identity_loss": trainer.identity is not None,
        }
    barrier(world)
    return TrainResult(metrics, step_losses)


RESUME_KEYS = ("fingerprint", "step", "images", "train_seconds", "val_start", "trainer", "rng")


def _read_resumable(path: Path, world: Dist) -> dict | None:
    """The resumable state at `path`, or None (training starts from scratch, and the first checkpoint replaces
    the file) when it cannot be read: truncated, corrupt or not a checkpoint of this code."""
    try:
        state = load_checkpoint(path, world.device)
        missing = [k for k in RESUME_KEYS if k not in state] if isinstance(state, dict) else list(RESUME_KEYS)
        if missing:
            raise ValueError(f"not a resumable training checkpoint (no {', '.join(missing)})")
        return state
    except Exception as error:  # noqa: BLE001 - any unreadable cache file: say which and what happens
        _say(world, f"{path} cannot be resumed from ({type(error).__name__}: {str(error)[:200]}): training from "
                    f"scratch; the first checkpoint overwrites it (or delete it, or set train.resume: false)")
        return None


def _say(world: Dist, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def _gather_rng(world: Dist) -> list[dict]:
    """RNG states of every process (index = rank), so that each resumes its own streams."""
    state = rng_state()
    if world.world_size == 1:
        return [state]
    gathered = [None] * world.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered
