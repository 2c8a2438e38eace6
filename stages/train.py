"""Stage `train`: R-Net on the Parquet shards with the hybrid-level loss -> models/rnet.pt, reports/train.json.

    python -m stages.train                                # one process (CPU or one GPU)
    torchrun --nproc-per-node N -m stages.train           # DDP over N GPUs (or N CPU processes, gloo)
    torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m stages.train   # several nodes

Curves go to reports/train/ (dvclive; `dvc plots show`), a preview grid to reports/train_grid.png, metrics
to reports/train.json; models/rnet_face_model.npz is the face model to decode the network's coefficients with
(the input one, or its trained version with train.trainable). A run interrupted after a checkpoint resumes
from models/rnet_last.pt when started again with the same params.

Defaults (params.yaml) deviate from the paper's for a 2-core CPU and the ~24 sample training faces: resnet18 from
random init (no ImageNet weights here), no identity loss (train.identity_net: none), 100 epochs of batch 8 with lr
1e-3 decayed x0.2 every 40 epochs (paper: resnet50, ImageNet init, 20 epochs of batch 32, lr 1e-4 decayed
x0.2 every 10). Loss weights and augmentation are the paper's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dvclive import Live

from pipeline.face_model import CoeffLayout, load_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.losses.hybrid import LossWeights
from pipeline.nets import build_rnet
from pipeline.shards import ShardDataset
from pipeline.train import AugmentSettings, TrainConfig, TrainPaths, init_distributed, shutdown, train
from pipeline.train.curves import plot_training_curves
from stages import read_params

PATHS = TrainPaths(rnet=Path("models/rnet.pt"), last=Path("models/rnet_last.pt"),
                   face_model=Path("models/rnet_face_model.npz"), grid=Path("reports/train_grid.png"))
LIVE_DIR = "reports/train"
METRICS = Path("reports/train.json")
CURVES = Path("reports/train_curves.png")


def train_config(p: dict) -> TrainConfig:
    """The `train:` section of params.yaml -> TrainConfig (keys outside the config are the stage's own)."""
    stage_keys = {"face_model", "shards", "device", "resume", "loss", "augment", "trainable"}
    return TrainConfig(**{k: v for k, v in p.items() if k not in stage_keys}, loss=LossWeights(**p["loss"]),
                       augment=AugmentSettings(**p["augment"]), trainable=tuple(p["trainable"]))


def trim_live_logs(live_dir: str | Path, last_step: int) -> int:
    """Drop the rows after `last_step` from every dvclive curve (<live_dir>/plots/metrics/**/*.tsv): the steps an
    interrupted run logged after its last checkpoint, which the resumed run logs again. Returns rows dropped."""
    dropped = 0
    for tsv in sorted(Path(live_dir, "plots", "metrics").rglob("*.tsv")):
        lines = tsv.read_text().splitlines(keepends=True)
        if not lines:
            continue
        header, rows = lines[0].rstrip("\n").split("\t"), lines[1:]
        if "step" not in header:
            continue
        col = header.index("step")
        kept = [r for r in rows if r.strip() and int(float(r.split("\t")[col])) <= last_step]
        if len(kept) != len(rows):
            dropped += len(rows) - len(kept)
            tsv.write_text(lines[0] + "".join(kept))
    return dropped


def open_live(live_dir: str | Path, first_step: int) -> Live:
    """dvclive's logger for a run whose first logged step is `first_step`: a fresh run (0) starts new curves, a
    resumed one continues the interrupted run's, without the steps after its checkpoint (logged again now)."""
    if first_step > 0:
        trim_live_logs(live_dir, first_step - 1)
    return Live(dir=str(live_dir), resume=first_step > 0, save_dvc_exp=False, dvcyaml=None)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args()
    keep_freed_memory()
    p = read_params(args.params, "train")["train"]
    cfg = train_config(p)
    try:  # needed only at the end (the curves PNG): fail now rather than after the training
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("matplotlib is missing (reports/train_curves.png): pip install -r requirements.lock") from None
    world = init_distributed(p["device"])
    face_model = load_face_model(p["face_model"])
    net = build_rnet(cfg.arch, CoeffLayout.of(face_model).size, cfg.init_weights or None)
    shards = Path(p["shards"])
    train_set = ShardDataset(sorted(shards.glob("train-*.parquet")))
    val_paths = sorted(shards.glob("val-*.parquet"))
    val_set = ShardDataset(val_paths) if val_paths else []
    if world.is_main:
        print(f"train: {len(train_set)} faces, val: {len(val_set)} faces, {world.world_size} process(es) on "
              f"{world.device.type}; {cfg.arch} from {cfg.init_weights or 'random init (train.init_weights empty)'}")
        if not val_paths or len(val_set) == 0:
            print("the val split is empty: validating on the train split (val_is_train: true)")

    live = None

    def log(step: int, values: dict[str, float]) -> None:
        nonlocal live
        if live is None:
            live = open_live(LIVE_DIR, step)
        live.step = step
        for name, value in values.items():
            live.log_metric(name, value)

    result = train(cfg, net, face_model, train_set, val_set, PATHS, world, log=log if world.is_main else None,
                   resume=p["resume"])
    if world.is_main:
        live.end()
        plot_training_curves(LIVE_DIR, CURVES)  # the curves offline (dvc plots show loads its charts from a CDN)
        METRICS.parent.mkdir(parents=True, exist_ok=True)
        METRICS.write_text(json.dumps({**result.metrics, "arch": cfg.arch}, indent=2) + "\n")
        m = result.metrics
        print(f"{m['steps']} steps ({m['epochs']:.1f} epochs) in {m['train_seconds']:.0f} s, "
              f"{m['train_img_s']:.1f} img/s; val landmark error {m['val_landmark_px_start']:.2f} px (mean face) -> "
              f"{m['val_landmark_px']:.2f} px; {m['nonfinite_steps']} non-finite steps -> {PATHS.rnet}")
    shutdown(world)


if __name__ == "__main__":
    main()
