"""Stage `reconstruct`: 3D faces for a dataset, a folder or single photos.

    python -m stages.reconstruct                          # DVC stage: the Parquet shards -> data/reconstructions
    python -m stages.reconstruct photo.jpg --out DIR      # one or more photos (crop/landmarks/masks run here)
    python -m stages.reconstruct --images DIR --out DIR   # a folder of photos
    torchrun --nproc-per-node N -m stages.reconstruct     # each rank takes every N-th shard (photos: face)

Output: <out>/coefficients/part-<shard>.parquet, one per shard (photos: part-photos[.rank-R-of-W]), written
atomically as each finishes; a rerun keeps the parts made from the same shard with the same params and models and
reconstructs only the rest (pipeline.reconstruct.parts). Read them with parts.read_reconstructions(out).

Methods (reconstruct.method): fit | network | network+fit; without a checkpoint the stage falls back to fit.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.face_model import FaceDecoder, load_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.reconstruct.fit import FitSettings
from pipeline.reconstruct.outputs import FaceOutputs, write_face_files
from pipeline.reconstruct.stream import reconstruct_stream
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
    """(rank, world size) under torchrun, (0, 1) otherwise; initialises the process group once (a rank that is
    done waits for the others at the last barrier: up to BARRIER_TIMEOUT)."""
    from pipeline.shards.ranks import BARRIER_TIMEOUT

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=BARRIER_TIMEOUT)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def pick_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def gather_photo_faces(args, params: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(faces table, rejects table) of the photos or folder given, preprocessed here as the stages do."""
    from pipeline.detect import CropSettings, LandmarkSettings, preprocess_photos
    from pipeline.detect.photo_io import PHOTO_EXTENSIONS
    from pipeline.segment import MaskSettings
    from pipeline.shards import screen_photos

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


def table_rows(rows: list[dict], unwritten: list[dict], vertices: bool) -> list[dict]:
    """The rows a part keeps: not the faces whose files failed (they are rejects, with their reason), and without
    verts_model unless `vertices` (meshes_from_coefficients rebuilds it)."""
    gone = {r["id"] for r in unwritten}
    return [{k: v for k, v in row.items() if vertices or k != "verts_model"} for row in rows if row["id"] not in gone]


def run_digest(p: dict, method: str, model_files: list[Path]) -> str:
    """What a part depends on besides its input: the reconstruct params (but where inputs and outputs are), the
    method actually run and the contents of the model files decoded with, as a SHA-1 hex digest."""
    import hashlib

    from pipeline.reconstruct.parts import digest_files

    settings = {k: v for k, v in p.items() if k not in ("out", "shards")}
    text = json.dumps({"params": settings, "method": method, "models": digest_files(model_files)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def clear_owned_outputs(out: Path, report: Path, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete what an earlier run into `out` left and this run rewrites: the parts of out/coefficients but those
    in `keep` (finished parts this run reuses), coefficients*.parquet, rejects.parquet, the summary report and the
    per-face files of out/faces (FACE_FILE_SUFFIXES, and the temporary files of an interrupted write): all of them
    when nothing is kept, else those of the faces of the parts that go. Any other file stays. A reused --out then
    never mixes two runs. Returns what went."""
    from pipeline.reconstruct.outputs import FACE_FILE_SUFFIXES
    from pipeline.reconstruct.parts import PART_DIR

    gone = [*out.glob("coefficients*.parquet"), *out.glob("coefficients*.parquet.tmp*"),
            *[x for x in (out / "rejects.parquet", report) if x.is_file()]]
    parts = out / PART_DIR
    stale = [x for x in parts.iterdir() if x.is_file() and x not in keep] if parts.is_dir() else []
    faces = out / "faces"
    if faces.is_dir():
        stems = None if not keep else {stem for x in stale for stem in part_stems(x)}
        for x in faces.iterdir():
            if not x.is_file():
                continue
            if x.name.startswith(".") and x.name.endswith(".tmp"):
                gone.append(x)
            elif x.name.endswith(FACE_FILE_SUFFIXES) and (stems is None or face_file_stem(x.name) in stems):
                gone.append(x)
    for x in [*gone, *stale]:
        x.unlink(missing_ok=True)
    return [*gone, *stale]


def part_stems(part: Path) -> list[str]:
    """The files_stem column of a part (its faces' per-face files), [] for a file that is not a readable part."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(part, columns=["files_stem"])["files_stem"].to_pylist()
    except (OSError, KeyError, ValueError):  # a temporary, a part of no rows (no columns), a truncated file
        return []


def face_file_stem(name: str) -> str:
    """'<stem>_overlay.png' -> '<stem>' (any of FACE_FILE_SUFFIXES)."""
    from pipeline.reconstruct.outputs import FACE_FILE_SUFFIXES

    return next(name[:-len(suffix)] for suffix in FACE_FILE_SUFFIXES if name.endswith(suffix))


class PartJob(NamedTuple):
    """One part to write: its name, its key (parts.shard_key), its input as a function giving the batches, and
    the number of faces in it."""
    name: str
    key: str
    batches: Callable[[], Iterator[pd.DataFrame]]
    faces: int


def shard_jobs(shards: list[Path], digest: str, batch_size: int) -> list[PartJob]:
    """A part per shard (part-<shard stem>), its faces streamed from the shard a batch at a time."""
    from pipeline.reconstruct.parts import shard_key
    from pipeline.shards import iter_faces
    from pipeline.shards.tables import count_rows

    return [PartJob(shard.stem, shard_key(shard, digest), functools.partial(iter_faces, shard, batch_size),
                    count_rows(shard)) for shard in shards]


def photos_job(faces: pd.DataFrame, digest: str, batch_size: int, rank: int, world: int) -> PartJob:
    """The one part of this rank's photos (part-photos, or part-photos.rank-RRRRR-of-WWWWW under torchrun)."""
    name = "photos" if world == 1 else f"photos.rank-{rank:05d}-of-{world:05d}"
    return PartJob(name, digest, lambda: (faces.iloc[lo:lo + batch_size] for lo in range(0, len(faces), batch_size)),
                   len(faces))


def main(argv=None) -> None:
    from pipeline.reconstruct.parts import PartWriter, is_current, part_metadata, part_path, part_paths, \
        read_reconstructions

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

    model_path, model = Path(p["face_model"]), None
    method = args.method or p["method"]
    network = None
    model_files = [model_path]
    if method != "fit":
        checkpoint = Path(p["checkpoint"])
        if checkpoint.exists():
            from pipeline.train.checkpoint import decoding_face_model, load_rnet
            network = load_rnet(checkpoint, device)
            try:
                model_path, model = decoding_face_model(checkpoint, model_path)
            except ValueError as err:
                raise SystemExit(str(err)) from None
            model_files = [model_path, checkpoint]
        else:
            print(f"{checkpoint} not found: reconstructing by per-image fitting (method fit)", file=sys.stderr)
            method = "fit"
    digest = run_digest(p, method, model_files)

    # DVC stage: a part per shard, shard i on rank i % world; a finished part made from the same shard by the
    # same params and models is kept, so an interrupted run resumes where it stopped
    jobs = shard_jobs(sorted(Path(p["shards"]).glob("*.parquet")), digest, p["batch_size"]) if dvc_mode else []
    if rank == 0:
        clear_owned_outputs(out, report, {part_path(out, j.name) for j in jobs if is_current(part_path(out, j.name),
                                                                                              j.key)})
    if world > 1:
        dist.barrier()
    if dvc_mode:
        rejects = pd.DataFrame(columns=["path", "stage", "reason", "detail", "id"])
        mine = [j for i, j in enumerate(jobs) if i % world == rank]
        todo = [j for j in mine if not is_current(part_path(out, j.name), j.key)]
    else:
        faces, rejects = gather_photo_faces(args, params)
        if rank == 0:
            print_rejects(rejects)
            if len(faces) == 0:
                raise SystemExit("no face to reconstruct")
        todo = [photos_job(faces.iloc[rank::world].reset_index(drop=True), digest, p["batch_size"], rank, world)]

    decoder = FaceDecoder(model if model is not None else load_face_model(model_path)).to(device)
    files = FaceOutputs(meshes=p["write_meshes"], overlays=p["write_overlays"], crops=p["write_crops"])

    start = time.perf_counter()
    n_done = n_written = 0  # faces reconstructed and parts written by this run
    with tqdm(total=sum(j.faces for j in todo), desc=f"reconstruct[{method}]", disable=rank != 0) as bar:
        progress = threading.Lock()
        unwritten: list[dict] = []  # reject rows of the faces of the current part whose files could not be written

        def write_files(chunk, chunk_rows, render, batch) -> None:  # runs on scoring threads, a slice each
            failed = write_face_files(out / "faces", chunk, chunk_rows, render, batch.photo, decoder, files)
            with progress:
                unwritten.extend(unwritten_rejects(chunk, failed))
                bar.update(len(chunk))

        for job in todo:
            unwritten.clear()
            writer = PartWriter(part_path(out, job.name), job.key)
            try:
                for rows in reconstruct_stream(decoder, job.batches(), method, fit, network,
                                               p["refine_steps"], write_files):
                    with progress:
                        writer.write(table_rows(rows, unwritten, p["write_vertices"]))
            except BaseException:
                writer.abort()
                raise
            writer.close(job.faces, unwritten)
            n_done += job.faces
            n_written += 1
    seconds = time.perf_counter() - start
    if world > 1:
        done = torch.tensor([n_done, n_written], dtype=torch.int64)
        dist.all_reduce(done)
        n_done, n_written = map(int, done.tolist())
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        parts = part_paths(out)
        part_rejects = [r for x in parts for r in part_metadata(x)["rejects"]]
        if part_rejects:  # faces whose files failed leave the table and join the rejects, with their reason
            extra = pd.DataFrame(part_rejects, columns=rejects.columns)
            rejects = extra if len(rejects) == 0 else pd.concat([rejects, extra], ignore_index=True)
        psnr = read_reconstructions(out, ["masked_psnr"])["masked_psnr"]
        summary = {"faces": len(psnr), "rejected": len(rejects),
                   "method": method, "face_model": str(model_path), "seconds": round(seconds, 3),
                   "faces_reconstructed": n_done, "parts": len(parts), "parts_resumed": len(parts) - n_written,
                   "faces_per_s": round(n_done / seconds, 3) if seconds > 0 and n_done else None,
                   "masked_psnr_mean": float(psnr.mean()) if len(psnr) else None}
        if len(rejects):
            rejects.to_parquet(out / "rejects.parquet", index=False)
            summary["rejects_by_reason"] = rejects["reason"].value_counts().to_dict()
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
