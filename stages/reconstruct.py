"""Stage `reconstruct`: 3D faces for a dataset, a folder or single photos.

    python -m stages.reconstruct                          # DVC stage: the Parquet shards -> data/reconstructions
    python -m stages.reconstruct photo.jpg --out DIR      # one or more photos (crop/landmarks/masks run here)
    python -m stages.reconstruct --images DIR --out DIR   # a folder of photos
    torchrun --nproc-per-node N -m stages.reconstruct     # each rank takes every N-th face, rank 0 merges

Methods (reconstruct.method): fit | network | network+fit; without a checkpoint the stage falls back to fit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.face_model import FaceDecoder, load_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.losses import landmark_weights
from pipeline.reconstruct.fit import FitSettings
from pipeline.reconstruct.outputs import FaceOutputs, write_face_files
from pipeline.reconstruct.stream import reconstruct_faces
from stages import read_params


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stages.reconstruct", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", nargs="*", type=Path, help="photos to reconstruct (default: the shards)")
    ap.add_argument("--images", type=Path, help="a folder of photos to reconstruct (searched recursively)")
    ap.add_argument("--out", type=Path, help="output folder (default: reconstruct.out)")
    ap.add_argument("--method", choices=["fit", "network", "network+fit"], help="override reconstruct.method")
    ap.add_argument("--params", type=Path, help="parameters (default: ./params.yaml, else the repository's)")
    ap.add_argument("--report", type=Path, help="metrics JSON (default: reports/reconstruct.json for the "
                                                 "DVC stage, <out>/summary.json otherwise)")
    return ap.parse_args(argv)


PARAM_SECTIONS = ("reconstruct", "crop", "landmarks", "masks", "workers")


def load_params(path: Path | None) -> dict:
    """The parameters, checked before any work: `path` (which must exist: a mistyped --params is an error, not
    the defaults), or without one ./params.yaml, else the repository's (single-photo use from elsewhere)."""
    if path is None:
        path = Path("params.yaml")
        if not path.is_file():
            path = Path(__file__).resolve().parents[1] / "params.yaml"
    params = read_params(path, *PARAM_SECTIONS)
    from pipeline.detect import CropSettings, LandmarkSettings
    from pipeline.segment import MaskSettings

    try:  # the settings classes check their own values (e.g. crop.detector) before any work, too
        CropSettings(**params["crop"]), LandmarkSettings(**params["landmarks"]), MaskSettings(**params["masks"])
    except (TypeError, ValueError) as error:
        raise SystemExit(f"{path}: bad parameters: {error}") from None
    return params


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def pick_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def gather_faces(args, params: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(faces table, rejects table) from the shards, a folder or photos (preprocessed here as the stages do)."""
    from pipeline.detect import CropSettings, LandmarkSettings, preprocess_photos
    from pipeline.detect.photo_io import PHOTO_EXTENSIONS
    from pipeline.segment import MaskSettings
    from pipeline.shards import read_faces, screen_photos

    if not args.photos and args.images is None:
        shards = sorted(Path(params["reconstruct"]["shards"]).glob("*.parquet"))
        return read_faces(shards), pd.DataFrame(columns=["path", "stage", "reason", "detail", "id"])
    missing = [p for p in [*args.photos, *([args.images] if args.images else [])] if not p.exists()]
    if missing:
        raise SystemExit(f"no such file or folder: {', '.join(map(str, missing))}")
    photos, screened = list(args.photos), []
    if args.images is not None:
        found, screened = screen_photos(args.images, PHOTO_EXTENSIONS)
        photos += found
    faces, rejects = preprocess_photos(photos, CropSettings(**params["crop"]),
                                       LandmarkSettings(**params["landmarks"]), MaskSettings(**params["masks"]),
                                       params["workers"], root=args.images)
    if screened:  # folders named like photos, dangling symlinks, unreadable files: rejects, never skipped
        rejects = pd.concat([rejects, pd.DataFrame(screened, columns=rejects.columns)], ignore_index=True)
    return faces, rejects


def print_rejects(rejects: pd.DataFrame) -> None:
    """One stderr line per reject; names and details quoted as Python literals, so a file name holding a newline
    or a terminal escape cannot fake or hide lines."""
    for r in rejects.itertuples(index=False):
        print(f"{r.path!r}: {r.reason} ({r.detail!r})", file=sys.stderr)


def unwritten_rejects(chunk: pd.DataFrame, failed: list) -> list[dict]:
    """Reject rows (REJECTS_SCHEMA's columns) for the faces of `chunk` whose files could not be written."""
    return [{"path": chunk["source"].iloc[i], "stage": "reconstruct", "reason": "output not written",
             "detail": f"{type(error).__name__}: {error}", "id": chunk["id"].iloc[i]} for i, error in failed]


def drop_unwritten(rows: list[dict], rejects: pd.DataFrame, unwritten: list[dict]) -> tuple[list[dict],
                                                                                            pd.DataFrame]:
    """The faces whose files failed leave the coefficients table and join the rejects, with their reason."""
    if not unwritten:
        return rows, rejects
    gone = {r["id"] for r in unwritten}
    extra = pd.DataFrame(unwritten, columns=["path", "stage", "reason", "detail", "id"])
    rejects = extra if len(rejects) == 0 else pd.concat([rejects, extra], ignore_index=True)
    return [r for r in rows if r["id"] not in gone], rejects


def clear_owned_outputs(out: Path, report: Path) -> list[Path]:
    """Delete what an earlier run into `out` left and this run rewrites: coefficients*.parquet, rejects.parquet,
    the summary report and the per-face files of out/faces (FACE_FILE_SUFFIXES, and the temporary files of an
    interrupted write); any other file stays. A reused --out then never mixes two runs. Returns what went."""
    from pipeline.reconstruct.outputs import FACE_FILE_SUFFIXES

    gone = [*out.glob("coefficients*.parquet"), *out.glob("coefficients*.parquet.tmp*"),
            *out.glob("rejects.rank*.parquet"),
            *[x for x in (out / "rejects.parquet", report) if x.is_file()]]
    faces = out / "faces"
    if faces.is_dir():
        gone += [x for x in faces.iterdir() if x.is_file() and (x.name.endswith(FACE_FILE_SUFFIXES) or (
            x.name.startswith(".") and x.name.endswith(".tmp")))]
    for x in gone:
        x.unlink(missing_ok=True)
    return gone


def merge_rank_rejects(out: Path, rank: int, rejects: pd.DataFrame) -> pd.DataFrame:
    """Rank 0 under torchrun: `rejects` (its own rows, the photos' and its unwritten faces) plus the other
    ranks' unwritten faces from their rejects.rank<r>.parquet, which it deletes."""
    extra = []
    for x in sorted(out.glob("rejects.rank*.parquet")):
        if x.name != f"rejects.rank{rank}.parquet":
            extra.append(pd.read_parquet(x))
        x.unlink()
    return pd.concat([rejects, *extra], ignore_index=True) if extra else rejects


def main(argv=None) -> None:
    args = parse_args(argv)
    keep_freed_memory()
    params = load_params(args.params)
    p = params["reconstruct"]
    try:
        fit = FitSettings.from_params(p)
    except (TypeError, ValueError) as error:  # e.g. a loss weight the loss does not know
        raise SystemExit(f"reconstruct: bad parameters: {error}") from None
    if not Path(p["face_model"]).is_file():
        raise SystemExit(f"reconstruct.face_model: no such file: {p['face_model']} (dvc repro albedo makes it)")
    rank, world = distributed_rank()
    device = pick_device(rank)
    dvc_mode = not args.photos and args.images is None
    out = args.out or Path(p["out"])
    report = args.report or (Path("reports/reconstruct.json") if dvc_mode else out / "summary.json")

    if rank == 0:
        clear_owned_outputs(out, report)
    if world > 1:
        dist.barrier()
    faces, rejects = gather_faces(args, params)
    if not dvc_mode and rank == 0:
        print_rejects(rejects)
        if len(faces) == 0:
            raise SystemExit("no face to reconstruct")
    faces = faces.iloc[rank::world].reset_index(drop=True)
    model_path, model = Path(p["face_model"]), None
    method = args.method or p["method"]
    network = None
    if method != "fit":
        checkpoint = Path(p["checkpoint"])
        if checkpoint.exists():
            from pipeline.train.checkpoint import decoding_face_model, load_rnet
            network = load_rnet(checkpoint, device)
            try:
                model_path, model = decoding_face_model(checkpoint, model_path)
            except ValueError as err:
                raise SystemExit(str(err)) from None
        else:
            print(f"{checkpoint} not found: reconstructing by per-image fitting (method fit)", file=sys.stderr)
            method = "fit"
    decoder = FaceDecoder(model if model is not None else load_face_model(model_path)).to(device)
    lmk_w = landmark_weights().to(device)
    files = FaceOutputs(meshes=p["write_meshes"], overlays=p["write_overlays"], crops=p["write_crops"])

    start = time.perf_counter()
    with tqdm(total=len(faces), desc=f"reconstruct[{method}]", disable=rank != 0) as bar:
        progress = threading.Lock()

        unwritten: list[dict] = []  # reject rows of the faces whose files could not be written

        def write_files(chunk, chunk_rows, render, batch) -> None:  # runs on scoring threads, a slice each
            failed = write_face_files(out / "faces", chunk, chunk_rows, render, batch.photo, decoder, files)
            with progress:
                unwritten.extend(unwritten_rejects(chunk, failed))
                bar.update(len(chunk))

        rows = reconstruct_faces(decoder, faces, method, fit, lmk_w, network, p["refine_steps"], p["batch_size"],
                                 write_files)
    seconds = time.perf_counter() - start
    rows, rejects = drop_unwritten(rows, rejects, unwritten)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    part = out / (f"coefficients.rank{rank}.parquet" if world > 1 else "coefficients.parquet")
    table.to_parquet(part, index=False)
    if world > 1:
        if unwritten:  # this rank's faces whose files failed: rank 0 adds them to the rejects
            pd.DataFrame(unwritten).to_parquet(out / f"rejects.rank{rank}.parquet", index=False)
        dist.barrier()
        if rank == 0:
            parts = [out / f"coefficients.rank{r}.parquet" for r in range(world)]
            merged = pd.concat([pd.read_parquet(x) for x in parts], ignore_index=True)
            merged.to_parquet(out / "coefficients.parquet", index=False)
            faces_done = len(merged)
            for x in parts:
                x.unlink()
            rejects = merge_rank_rejects(out, rank, rejects)
        dist.destroy_process_group()
    else:
        faces_done = len(table)
    if rank == 0:
        summary = {"faces": faces_done, "rejected": len(rejects),
                   "method": method, "face_model": str(model_path), "seconds": round(seconds, 3),
                   "faces_per_s": round(len(faces) / seconds, 3) if seconds > 0 else None,
                   "masked_psnr_mean": float(table["masked_psnr"].mean()) if len(table) else None}
        if len(rejects):
            rejects.to_parquet(out / "rejects.parquet", index=False)
            summary["rejects_by_reason"] = rejects["reason"].value_counts().to_dict()
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
