"""Large collections (issue 15): preprocessing split over torchrun ranks equals one process, reconstruction
streams into one resumable part per shard, vertices rebuilt from the coefficients equal the stored ones, and the
training loader's workers give each face exactly once per epoch."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from conftest import repo_params
from pipeline.shards.ranks import rank_of

PHOTOS = {"000002.jpg": "a.jpg", "000037.jpg": "b.jpg", "vd051.png": "sub/c.png", "trump_hillary.jpg": "d.jpg"}
TABLES = ["crops", "crop_rejects", "landmarks", "landmarks_rejects", "masks", "masks_rejects"]


def make_photos(folder: Path, faces_dir: Path) -> None:
    """Four real photos (one with two faces, one in a subfolder) and one without a face (a reject)."""
    for source, name in PHOTOS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(faces_dir / source, folder / name)
    ramp = np.linspace(0, 255, 200, dtype=np.uint8)
    from PIL import Image
    Image.fromarray(np.dstack([np.tile(ramp, (150, 1))] * 3)).save(folder / "e.png")


def write_params(work: Path, photos: Path) -> Path:
    params = repo_params()
    params["data"]["images"] = str(photos)
    params["workers"] = 1
    params["crop"]["multi_face"] = "all"
    params["pack"].update(shard_rows=2, val_ratio=0.0)  # 5 faces: 3 train shards and an empty val shard
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def preprocess(work: Path, params: Path, ports: tuple[int, ...] | None = None) -> None:
    """The crop, landmarks and masks stages in `work`; with `ports` (one per stage) as gloo ranks, each stage its
    own rendezvous as its own torchrun launch would be: a stage that reused the last one's port could reach rank
    0's store of that stage while rank 0 was closing it (seen once: 'Failed to recv, got 0 bytes')."""
    from stages import crop, landmarks, masks

    os.chdir(work)
    for i, stage in enumerate((crop, landmarks, masks)):
        if ports is not None:
            os.environ["MASTER_PORT"] = str(ports[i])
        stage.main(["--params", str(params)])


def _rank_worker(rank: int, world: int, ports: tuple[int, ...], work: str, params: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    preprocess(Path(work), Path(params), ports)


def _free_ports(n: int) -> tuple[int, ...]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while chosen, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in sockets)
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, faces_dir):
    """The crop, landmarks and masks stages on the same photos in one process and in two gloo ranks, then pack
    in the single run's folder: {"one": folder, "two": folder}."""
    root = tmp_path_factory.mktemp("scale")
    photos = root / "photos"
    make_photos(photos, faces_dir)
    cwd = os.getcwd()
    try:
        out = {}
        for name in ("one", "two"):
            (root / name).mkdir()
            out[name] = root / name
        params = write_params(root, photos)
        preprocess(out["one"], params)
        mp.spawn(_rank_worker, args=(2, _free_ports(3), str(out["two"]), str(params)), nprocs=2, join=True)
        from stages import pack
        os.chdir(out["one"])
        pack.main(["--params", str(params)])
    finally:
        os.chdir(cwd)
    return out


def test_two_ranks_write_what_one_process_writes(runs):
    shares = {rank_of(name, 2) for name in [*PHOTOS.values(), "e.png"]}
    assert shares == {0, 1}, "both ranks must get photos for the comparison to mean anything"
    one, two = runs["one"] / "data" / "interim", runs["two"] / "data" / "interim"
    for table in TABLES:
        a, b = pq.read_table(one / f"{table}.parquet"), pq.read_table(two / f"{table}.parquet")
        assert a.equals(b), table
        assert (one / f"{table}.parquet").read_bytes() == (two / f"{table}.parquet").read_bytes(), table
    assert sorted(p.name for p in two.iterdir()) == sorted(f"{t}.parquet" for t in TABLES)  # parts merged, gone
    crops = pq.read_table(one / "crops.parquet").to_pandas()
    assert len(crops) == 5 and list(crops["id"]) == ["a.jpg#0", "b.jpg#0", "d.jpg#0", "d.jpg#1", "sub/c.png#0"]
    assert list(pq.read_table(one / "crop_rejects.parquet").to_pandas()["reason"]) == ["no face"]
    for stage in ("crop", "landmarks", "masks"):
        r1, r2 = (json.loads((runs[k] / "reports" / f"{stage}.json").read_text()) for k in ("one", "two"))
        assert {k: r1[k] for k in ("inputs", "outputs", "rejected")} == \
            {k: r2[k] for k in ("inputs", "outputs", "rejected")}, stage


# ---- streaming, resumable reconstruction

def reconstruct_params(work: Path, shards: Path, model: Path, **reconstruct) -> Path:
    params = repo_params()
    quick = dict(face_model=str(model), checkpoint=str(work / "no_rnet.pt"), method="fit", shards=str(shards),
                 landmark_steps=2, full_steps=2, batch_size=2, write_overlays=False, write_crops=False,
                 write_meshes=True)
    params["reconstruct"].update({**quick, **reconstruct})
    path = work / f"params-{len(list(work.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run(params: Path, out: Path) -> dict:
    from stages import reconstruct

    reconstruct.main(["--params", str(params), "--out", str(out), "--report", str(out.parent / "summary.json")])
    return json.loads((out.parent / "summary.json").read_text())


@pytest.fixture(scope="module")
def face_model_npz(tmp_path_factory, sfm) -> Path:
    from pipeline.face_model.format import save_face_model

    path = tmp_path_factory.mktemp("model") / "face_model.npz"
    save_face_model(sfm, path)
    return path


def test_an_interrupted_reconstruction_resumes_to_the_uninterrupted_table(runs, face_model_npz, tmp_path,
                                                                          monkeypatch):
    import stages.reconstruct
    from pipeline.face_model import FaceDecoder, load_face_model
    from pipeline.reconstruct.parts import meshes_from_coefficients, part_paths, read_reconstructions

    shards = runs["one"] / "data" / "shards"
    assert [pq.read_metadata(p).num_rows for p in sorted(shards.glob("*.parquet"))] == [2, 2, 1, 0]
    full = run(reconstruct_params(tmp_path, shards, face_model_npz, write_vertices=True), tmp_path / "full" / "out")
    expected = read_reconstructions(tmp_path / "full" / "out")
    assert full["faces"] == len(expected) == 5 and full["parts"] == 4 and "verts_model" in expected

    params = reconstruct_params(tmp_path, shards, face_model_npz, write_vertices=False)
    out = tmp_path / "stopped" / "out"
    real, calls = stages.reconstruct.reconstruct_stream, []

    def stopping_stream(*args, **kwargs):  # the run dies while the second part is being written
        calls.append(1)
        for rows in real(*args, **kwargs):
            if len(calls) == 2:
                raise KeyboardInterrupt
            yield rows

    monkeypatch.setattr(stages.reconstruct, "reconstruct_stream", stopping_stream)
    with pytest.raises(KeyboardInterrupt):
        run(params, out)
    assert [p.name for p in part_paths(out)] == ["part-train-00000.parquet"]
    assert sorted(p.name for p in (out / "coefficients").iterdir()) == ["part-train-00000.parquet"]  # no temporary
    monkeypatch.setattr(stages.reconstruct, "reconstruct_stream", real)
    resumed = run(params, out)
    assert (resumed["parts_resumed"], resumed["faces_reconstructed"], resumed["faces"]) == (1, 3, 5)
    table = read_reconstructions(out)
    assert "verts_model" not in table
    pd.testing.assert_frame_equal(table, expected.drop(columns="verts_model"))
    assert sorted(p.name for p in (out / "faces").iterdir()) == sorted(f"{s}.obj" for s in table["files_stem"])

    # vertices rebuilt from the coefficients are the ones the run with write_vertices stored
    decoder = FaceDecoder(load_face_model(face_model_npz))
    rebuilt = meshes_from_coefficients(decoder, table)
    stored = np.stack(expected["verts_model"]).reshape(rebuilt.shape)
    np.testing.assert_allclose(rebuilt, stored, atol=1e-4)
    assert np.abs(stored - stored.mean(0)).max() > 1.0  # the faces differ: the comparison is not of mean faces

    # a finished part whose params changed is stale: redone, never reused
    again = run(reconstruct_params(tmp_path, shards, face_model_npz, write_vertices=False, full_steps=3), out)
    assert (again["parts_resumed"], again["faces_reconstructed"]) == (0, 5)
    assert not np.allclose(np.stack(read_reconstructions(out)["coeff_id"]), np.stack(table["coeff_id"]))


# ---- the training loader with workers

def test_loader_workers_give_each_face_once_per_epoch(runs):
    from pipeline.shards import ShardDataset
    from pipeline.train.data import epoch_loader

    dataset = ShardDataset(sorted((runs["one"] / "data" / "shards").glob("*.parquet")))
    ids = [dataset[i]["id"] for i in range(len(dataset))]
    for epoch in (0, 1):
        orders = {}
        for workers in (0, 2):
            loader = epoch_loader(dataset, epoch, 0, batch_size=2, seed=0, rank=0, world_size=1, workers=workers)
            orders[workers] = [int(i) for batch in loader for i in batch["index"]]
        assert orders[0] == orders[2]  # workers change where batches are read, not which or in what order
        assert sorted(ids[i] for i in orders[2]) == sorted(ids)  # each face exactly once


# ---- the scale bench's collections

def test_replicated_shards_cycle_the_real_faces_under_unique_ids(runs, tmp_path):
    from pipeline.bench.scale import replicate_shards
    from pipeline.shards import read_faces

    sources = sorted((runs["one"] / "data" / "shards").glob("*.parquet"))
    real = read_faces(sources)
    paths = replicate_shards(sources, 12, tmp_path, shard_rows=5, row_group_rows=2)
    assert [pq.read_metadata(p).num_rows for p in paths] == [5, 5, 2]
    assert [pq.read_metadata(p).num_row_groups for p in paths] == [3, 3, 1]
    copies = read_faces(paths)
    assert copies["id"].is_unique and len(copies) == 12
    for i, row in copies.iterrows():
        original = real.iloc[i % len(real)]
        assert row["id"] == f"{original['id']}~{i // len(real)}" and row["crop"] == original["crop"]
