"""Scale: throughput and peak memory of the streaming reconstruction and of the shard Dataset as the collection
grows, and the training loader with and without worker processes.

For each N the collection is N faces replicated from the real shards (ids made unique), written as shards of
`shard_rows`; a fresh subprocess (`python -m pipeline.bench.scale`) then runs the stage's path over them, shard
by shard: iter_faces -> reconstruct_stream (method network: R-Net forward, the scoring render, table rows) ->
PartWriter, then one pass of ShardDataset over every face. Its peak resident memory (VmHWM) is its own, so runs
of different N do not contaminate each other. Flat memory: the peak at the largest N within a few % of the
smallest; steady throughput: img/s the same at every N.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..shards.pack import ShardWriter
from ..shards.tables import SHARD_SCHEMA


def replicate_shards(sources: Sequence[Path], n_faces: int, out_dir: Path, shard_rows: int,
                     row_group_rows: int) -> list[Path]:
    """`n_faces` rows cycled from the rows of `sources` (SHARD_SCHEMA shards) into train shards in `out_dir`;
    copy k of face 'x.jpg#0' is 'x.jpg#0~k' (ids stay unique). Returns the shard paths."""
    rows = pa.concat_tables([pq.read_table(p, schema=SHARD_SCHEMA) for p in sources]).to_pylist()
    if not rows:
        raise ValueError("no faces in the source shards to replicate")
    writer = ShardWriter(out_dir, "train", shard_rows, row_group_rows)
    try:
        for i in range(n_faces):
            row = rows[i % len(rows)]
            writer.write_row({**row, "id": f"{row['id']}~{i // len(rows)}"})
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.paths


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def measure(shards: list[Path], face_model: Path, checkpoint: Path, arch: str, batch_size: int,
            out: Path) -> dict:
    """In this (fresh) process: the network reconstruction of every face of `shards` streamed into one part
    per shard under `out`, then a ShardDataset pass over them. Returns {faces, reconstruct_img_s (after one
    untimed warm-up batch), dataset_img_s, peak_rss_mb}."""
    import torch

    from ..face_model import FaceDecoder, load_face_model
    from ..nets import build_rnet
    from ..reconstruct.fit import FitSettings
    from ..reconstruct.parts import PartWriter, part_path
    from ..reconstruct.stream import reconstruct_stream
    from ..shards import ShardDataset, iter_faces

    torch.manual_seed(0)
    model = load_face_model(face_model)
    decoder = FaceDecoder(model)
    if checkpoint.is_file():
        from ..train.checkpoint import decoding_face_model, load_rnet
        network = load_rnet(checkpoint)
        decoder = FaceDecoder(decoding_face_model(checkpoint, face_model)[1])
    else:  # the bench measures the data path: a random-init network costs the same
        network = build_rnet(arch, decoder.layout.size, None).eval()
    fit = FitSettings()
    warm = next(iter_faces(shards[0], batch_size))
    list(reconstruct_stream(decoder, [warm], "network", fit, network))

    faces, start = 0, time.perf_counter()
    for shard in shards:
        writer = PartWriter(part_path(out, shard.stem), shard.name)
        for rows in reconstruct_stream(decoder, iter_faces(shard, batch_size), "network", fit, network):
            writer.write([{k: v for k, v in row.items() if k != "verts_model"} for row in rows])
        writer.close(writer.rows_written, [])
        faces += writer.rows_written
    reconstruct_s = time.perf_counter() - start

    dataset = ShardDataset(shards)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    dataset_s = time.perf_counter() - start
    return {"faces": faces, "reconstruct_img_s": faces / reconstruct_s, "dataset_img_s": len(dataset) / dataset_s,
            "peak_rss_mb": peak_rss_mb()}


def scale_run(sources: Sequence[Path], sizes: Sequence[int], face_model: Path, checkpoint: Path, arch: str,
              batch_size: int, shard_rows: int, row_group_rows: int) -> dict:
    """measure() in a fresh subprocess for each collection size in `sizes` (faces replicated from `sources`).
    Returns per-size lists scale_faces, scale_peak_rss_mb, scale_img_s (reconstruction), scale_dataset_img_s,
    scale_seconds (the subprocess's wall time), and the ratios largest / smallest N: scale_rss_growth (peak RSS,
    - 1: 0.05 = 5 % more memory) and scale_img_s_ratio."""
    result: dict[str, list] = {"scale_faces": [], "scale_peak_rss_mb": [], "scale_img_s": [],
                               "scale_dataset_img_s": [], "scale_seconds": []}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
            shards = replicate_shards(sources, n, Path(tmp) / "shards", shard_rows, row_group_rows)
            command = [sys.executable, "-m", "pipeline.bench.scale", "--face-model", str(face_model),
                       "--checkpoint", str(checkpoint), "--arch", arch, "--batch-size", str(batch_size),
                       "--out", str(Path(tmp) / "out"), *map(str, shards)]
            start = time.perf_counter()
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            seconds = time.perf_counter() - start
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        for key, value in (("scale_faces", measured["faces"]), ("scale_peak_rss_mb", measured["peak_rss_mb"]),
                           ("scale_img_s", measured["reconstruct_img_s"]),
                           ("scale_dataset_img_s", measured["dataset_img_s"]), ("scale_seconds", seconds)):
            result[key].append(round(value, 3) if isinstance(value, float) else value)
    rss, img_s = result["scale_peak_rss_mb"], result["scale_img_s"]
    return {**result, "scale_rss_growth": round(rss[-1] / rss[0] - 1, 4),
            "scale_img_s_ratio": round(img_s[-1] / img_s[0], 4)}


def loader_img_s(shards: Sequence[Path], batch_size: int, workers: int, batches: int, seed: int = 0) -> float:
    """Images/s of the training loader (pipeline.train.data.epoch_loader: the shuffled epoch order over a
    ShardDataset, decoded and collated) with `workers` DataLoader processes, over its first `batches` batches
    (worker start-up included: each epoch starts its workers anew)."""
    from ..shards import ShardDataset
    from ..train.data import epoch_loader

    loader = epoch_loader(ShardDataset(shards), 0, 0, batch_size, seed, 0, 1, workers)
    start, seen = time.perf_counter(), 0
    for k, batch in enumerate(loader):
        seen += len(batch["index"])
        if k + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="one measure() run; prints its JSON (see the module docstring)")
    ap.add_argument("shards", nargs="+", type=Path)
    ap.add_argument("--face-model", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.shards, args.face_model, args.checkpoint, args.arch, args.batch_size, args.out)))


if __name__ == "__main__":
    main()
