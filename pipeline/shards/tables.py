"""Parquet tables of the preprocessing stages: their schemas, atomic row-group writing and streaming reads.

Every table is keyed by the face id `"<photo path relative to the input folder>#<face index>"`; images are
stored as encoded bytes in columns (JPEG crops, PNG masks), never as one file per face.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

N_LANDMARKS = 68  # the iBUG / 300-W points, in their order
N_MESH = 468


def _ibug_flip() -> tuple[int, ...]:
    """The 68-point iBUG index permutation of a horizontal mirror: the point labelled i after mirroring is
    the mirror image of the point labelled perm[i] before (0-based)."""
    pairs = [(i, 16 - i) for i in range(8)]                      # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]                # brows
    pairs += [(31, 35), (32, 34)]                                # nostrils; bridge 27-30 and tip 33 stay
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes (corner to corner)
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips; 51, 57 stay
    pairs += [(60, 64), (61, 63), (65, 67)]                      # inner lips; 62, 66 stay
    perm = list(range(68))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


IBUG_FLIP = _ibug_flip()

_FACE_META = [
    ("id", pa.string()),
    ("source", pa.string()),        # photo path as listed (relative to the working directory)
    ("face_index", pa.int32()),     # 0 = largest detection of the photo
]
_PHOTO_META = [
    ("score", pa.float32()),        # detection score (BlazeFace confidence, HOG decision value or MMOD confidence)
    ("detector", pa.string()),      # blazeface_full | blazeface_short | hog | cnn
    ("width", pa.int32()),          # original photo size, px, after EXIF orientation
    ("height", pa.int32()),
]
TRANSFORM = pa.list_(pa.float64(), 6)                  # 2x3 similarity, original-photo px -> crop px, row-major
LANDMARKS = pa.list_(pa.float32(), 2 * N_LANDMARKS)    # (68, 2) crop px, row-major (x0, y0, x1, y1, ...)
MESH = pa.list_(pa.float32(), 3 * N_MESH)              # (468, 3) MediaPipe face mesh, crop px (z: + away from camera)
_MESH_COLUMNS = [("mesh", MESH), ("mesh_score", pa.float32())]  # face-presence confidence of the mesh, [0, 1]
_LANDMARK_COLUMNS = [
    ("landmarks", LANDMARKS),                          # the 68 points the fit uses (landmarks.source)
    ("dlib_landmarks", LANDMARKS),                     # dlib's 68 points on the crop
    ("landmarks_source", pa.string()),                 # which points `landmarks` are: "dlib" | "mesh"
]

CROPS_SCHEMA = pa.schema(_FACE_META + [
    ("crop", pa.binary()),                             # 224x224 RGB JPEG
    ("transform", TRANSFORM),
    ("box_crop", pa.list_(pa.float32(), 4)),           # detection box mapped into the crop: left, top, right, bottom
] + _MESH_COLUMNS + _PHOTO_META)
LANDMARKS_SCHEMA = pa.schema([("id", pa.string())] + _LANDMARK_COLUMNS + [("score", pa.float32())])
MASKS_SCHEMA = pa.schema([("id", pa.string()), ("mask", pa.binary()),
                          ("method", pa.string()),      # the method that made the mask: mesh | skin | bisenet
                          ("fallback", pa.string())])   # why not masks.method (a mesh fallback), null if it was
SHARD_SCHEMA = pa.schema(_FACE_META + [("crop", pa.binary())] + _LANDMARK_COLUMNS + _MESH_COLUMNS + [
    ("mask", pa.binary()),                             # 224x224 uint8 PNG, soft face weights 0..255
    ("transform", TRANSFORM),
] + _PHOTO_META)
REJECTS_SCHEMA = pa.schema([
    ("path", pa.string()),      # the input photo
    ("stage", pa.string()),     # crop | landmarks | masks
    ("reason", pa.string()),    # short category, e.g. "no face", "truncated or corrupt image"
    ("detail", pa.string()),    # the underlying message, for debugging
    ("id", pa.string()),        # the face id for per-face rejects, null for whole-photo rejects
])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the `<path>.tmp-<pid>` files that writers of `path` killed mid-write (SIGKILL, out of memory) left:
    those of processes no longer running, and this process's own. Returns what went."""
    gone = []
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


class TableWriter:
    """Write rows to a Parquet file in row groups of `row_group_rows`, atomically.

    Rows go to `<path>.tmp-<pid>` and the file replaces `path` only on a clean close, so readers never see a
    half-written table and a crash leaves the previous version. A file is written even with zero rows, so the
    schema is always there for downstream readers. Use as a context manager.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, row_group_rows: int = 64):
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
        self.path = Path(path)
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.rows_written = 0
        self._buffer: list[dict] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self._tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._writer = pq.ParquetWriter(self._tmp, schema)

    def write_rows(self, rows: Iterable[dict]) -> None:
        """Append rows ({column: value}; fixed-size lists as sequences or numpy arrays). A generator is consumed
        one row group at a time, so a stream of rows is never held in memory."""
        for row in rows:
            self._buffer.append(row)
            if len(self._buffer) == self.row_group_rows:
                self._flush(self._buffer)
                self._buffer = []

    def _flush(self, rows: list[dict]) -> None:
        self._writer.write_table(pa.Table.from_pylist(rows, schema=self.schema), row_group_size=len(rows))
        self.rows_written += len(rows)

    def close(self) -> None:
        """Write the last partial row group and move the file into place."""
        if self._buffer:
            self._flush(self._buffer)
            self._buffer = []
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file; `path` keeps its previous content."""
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_table(rows: Iterable[dict], path: str | Path, schema: pa.Schema, row_group_rows: int = 64) -> int:
    """Write all `rows` to `path` atomically (see TableWriter); returns the number of rows."""
    with TableWriter(path, schema, row_group_rows) as writer:
        writer.write_rows(rows)
    return writer.rows_written


def iter_rows(path: str | Path, columns: list[str] | None = None, batch_rows: int = 256) -> Iterator[dict]:
    """Stream the rows of a Parquet file as dicts ({column: python value}), reading `batch_rows` at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns):
        yield from batch.to_pylist()


def count_rows(path: str | Path) -> int:
    """Number of rows of a Parquet file, from its footer."""
    return pq.read_metadata(path).num_rows


def join_in_order(left: Iterable[dict], right: Iterable[dict], key: str = "id") -> Iterator[dict]:
    """Streaming join of two tables whose `right` keys are a subsequence of the `left` keys in the same order,
    as every stage keeps its input's order and only drops rejected rows. Yields one merged row ({**left row,
    **right row}) per right row; left rows without a partner are skipped. Raises ValueError when a right key is
    missing from `left` or out of its order."""
    left_rows = iter(left)
    for right_row in right:
        for left_row in left_rows:
            if left_row[key] == right_row[key]:
                yield {**left_row, **right_row}
                break
        else:
            raise ValueError(f"{key} {right_row[key]!r} is missing from the left table or out of its order")
