"""Parquet shards: byte-exact round trip, shard/row-group layout, the stable split, atomic writes and the torch
Dataset under a multi-worker DataLoader, on faces preprocessed from real photos."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.detect import CropSettings, LandmarkSettings, preprocess_photo
from pipeline.segment import MaskSettings
from pipeline.shards import (SHARD_SCHEMA, ShardDataset, TableWriter, decode_grey, decode_rgb, join_in_order,
                             read_faces, split_of, write_shards)

PHOTOS = ("000002.jpg", "000033.jpg", "trump_hillary.jpg", "vd051.png", "000125.jpg")


@pytest.fixture(scope="module")
def faces(faces_dir):
    """6 faces (trump_hillary.jpg gives two) as SHARD_SCHEMA rows."""
    rows = []
    for name in PHOTOS:
        found, rejects = preprocess_photo(faces_dir / name, CropSettings(multi_face="all"), LandmarkSettings(),
                                          MaskSettings(), root=faces_dir)
        assert not rejects, rejects
        rows += found
    assert len(rows) == 6
    return rows


@pytest.fixture
def shards(tmp_path, faces):
    """The faces written with 2 rows per shard, 1 row per row group, about half in val."""
    return write_shards(faces, tmp_path, val_ratio=0.5, shard_rows=2, row_group_rows=1)


def test_shards_round_trip_byte_exactly(shards, faces):
    table = read_faces(shards["train"] + shards["val"])
    assert sorted(table["id"]) == sorted(f["id"] for f in faces)
    for face in faces:
        row = table[table["id"] == face["id"]].iloc[0]
        assert row["crop"] == face["crop"] and row["mask"] == face["mask"]
        assert row["landmarks"].dtype == np.float32 and np.array_equal(row["landmarks"], face["landmarks"])
        assert np.array_equal(row["transform"], face["transform"])
        assert (row["source"], row["face_index"], row["width"], row["height"]) == (
            face["source"], face["face_index"], face["width"], face["height"])


def test_shard_files_hold_shard_rows_in_row_groups_and_follow_the_split(shards, faces):
    for split, paths in shards.items():
        n_rows = sum(split_of(f["id"], 0.5) == split for f in faces)
        assert [p.name for p in paths] == [f"{split}-{i:05d}.parquet" for i in range(max(1, -(-n_rows // 2)))]
        for path in paths:
            meta = pq.read_metadata(path)
            assert meta.num_rows <= 2 and all(meta.row_group(g).num_rows == 1 for g in range(meta.num_row_groups))
            assert pq.read_schema(path).equals(SHARD_SCHEMA)
            assert all(split_of(i, 0.5) == split for i in pq.read_table(path, columns=["id"])["id"].to_pylist())
    assert {split_of(f["id"], 0.5) for f in faces} == {"train", "val"}  # the fixture exercises both splits


def test_an_empty_split_still_gets_a_shard_and_stale_shards_go(tmp_path, faces, shards):
    out = next(iter(shards["train"])).parent
    rewritten = write_shards(faces[:1], out, val_ratio=0.0, shard_rows=2, row_group_rows=1)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["train-00000.parquet", "val-00000.parquet"]
    empty = pq.read_table(rewritten["val"][0])
    assert empty.num_rows == 0 and empty.schema.equals(SHARD_SCHEMA)
    assert len(read_faces(rewritten["val"])) == 0 and list(read_faces([]).columns) == SHARD_SCHEMA.names


def test_split_is_a_stable_hash_of_the_id():
    ids = [f"photos/{i:05d}.jpg#0" for i in range(5000)]
    val = [split_of(i, 0.1) == "val" for i in ids]
    assert abs(np.mean(val) - 0.1) < 0.015
    assert [split_of(i, 0.1) for i in ids[:50]] == [split_of(i, 0.1) for i in ids[:50]]
    assert all(split_of(i, 0.2) == "val" for i, v in zip(ids, val) if v)  # a larger ratio only adds to val
    with pytest.raises(ValueError, match="val_ratio"):
        split_of("a#0", 1.5)


def test_table_writer_leaves_the_previous_file_on_failure(tmp_path, faces):
    path = tmp_path / "t.parquet"
    with TableWriter(path, SHARD_SCHEMA, 2) as writer:
        writer.write_rows(faces[:3])
    with pytest.raises(RuntimeError), TableWriter(path, SHARD_SCHEMA, 2) as writer:
        writer.write_rows(faces)
        raise RuntimeError("crash mid-write")
    assert pq.read_metadata(path).num_rows == 3 and list(tmp_path.iterdir()) == [path]


def test_join_in_order_pairs_rows_and_refuses_reordered_tables():
    left = [{"id": "a", "x": 1}, {"id": "b", "x": 2}, {"id": "c", "x": 3}]
    assert list(join_in_order(left, [{"id": "a", "y": 1}, {"id": "c", "y": 3}])) == [
        {"id": "a", "x": 1, "y": 1}, {"id": "c", "x": 3, "y": 3}]
    with pytest.raises(ValueError, match="'a' is missing"):
        list(join_in_order(left, [{"id": "c"}, {"id": "a"}]))


def test_dataset_items_are_the_decoded_faces(shards, faces):
    paths = shards["train"] + shards["val"]
    dataset = ShardDataset(paths)
    table = read_faces(paths)
    assert len(dataset) == len(faces)
    for index in (0, len(dataset) - 1, -1):
        item, row = dataset[index], table.iloc[index]
        assert item["id"] == row["id"]
        assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        assert torch.equal((item["image"] * 255).round().byte().permute(1, 2, 0),
                           torch.from_numpy(decode_rgb(row["crop"])))
        assert item["mask"].shape == (1, 224, 224)
        assert torch.equal((item["mask"][0] * 255).round().byte(), torch.from_numpy(decode_grey(row["mask"])))
        assert torch.equal(item["lmk_px"], torch.from_numpy(row["landmarks"].reshape(68, 2)))
        assert item["transform"].shape == (2, 3)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_works_under_a_dataloader_with_two_workers(shards, faces):
    dataset = ShardDataset(shards["train"] + shards["val"])
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 224, 224) and batch["lmk_px"].shape[1:] == (68, 2)
        seen += batch["id"]
    assert sorted(seen) == sorted(f["id"] for f in faces)


def test_workers_leave_out_the_callers_main_unless_the_task_needs_it():
    """Pool workers must not re-run the caller's script (the bench imports torch: seconds per pool), yet a task
    defined in __main__ still gets it."""
    import math
    import subprocess
    import sys
    import textwrap

    from pipeline.shards.parallel import _refers_to_main, map_parallel

    assert list(map_parallel(math.sqrt, [4.0, 9.0, 16.0, 25.0], workers=2, chunk_size=1, total=4)) == [2, 3, 4, 5]
    assert not _refers_to_main(math.sqrt, [Path("a.jpg")])
    script = textwrap.dedent("""
        import os, sys
        from pipeline.shards.parallel import _refers_to_main, map_parallel
        print("main imported", os.getpid(), flush=True)
        def square(x):
            return x * x
        if __name__ == "__main__":
            assert _refers_to_main(square)
            assert list(map_parallel(square, range(4), 2, 1, total=4)) == [0, 1, 4, 9]
    """)
    # run as a file: a task defined in the caller's script needs the script imported in the workers
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "caller.py"
        path.write_text(script + textwrap.indent(textwrap.dedent("""
            import math
            list(map_parallel(math.sqrt, range(4), 2, 1, total=4))
        """), "    "))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    # once in the caller, once in each of the 2 workers of the `square` pool, never in the `math.sqrt` pool
    assert run.stdout.count("main imported") == 3, run.stdout
