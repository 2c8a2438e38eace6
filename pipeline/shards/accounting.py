"""Where every input went: the reject type and rows, and the per-stage metrics report (reports/<stage>.json)."""
from __future__ import annotations

import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PROCESSING_ERROR = "processing error"


class Rejected(ValueError):
    """A photo (or one face of it) that preprocessing refuses. str(error) is the reject reason, a short category
    such as "no face" that reports count by; `detail` says what exactly went wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def reject_row(path: str, stage: str, error: Exception, face_id: str | None = None) -> dict:
    """A row of the rejects tables (REJECTS_SCHEMA). Any exception other than Rejected is recorded as a
    'processing error' with its type and message, so one bad input never stops a run and is never lost."""
    if isinstance(error, Rejected):
        reason, detail = error.reason, error.detail
    else:
        reason, detail = PROCESSING_ERROR, f"{type(error).__name__}: {error}"
    return {"path": path, "stage": stage, "reason": reason, "detail": detail, "id": face_id}


@dataclass
class StageReport:
    """Counts and speed of one stage run. `inputs`: photos (crop) or faces (later stages) read; `outputs`:
    faces written; `rejects`: reject rows (see reject_row); `extra`: stage-specific counts for the report."""
    stage: str
    inputs: int = 0
    outputs: int = 0
    seconds: float = 0.0
    rejects: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready metrics: inputs, outputs, rejected, rejects_by_reason, seconds, images_per_s (inputs/s),
        then the extra counts."""
        by_reason = Counter(r["reason"] for r in self.rejects)
        return {"stage": self.stage, "inputs": self.inputs, "outputs": self.outputs, "rejected": len(self.rejects),
                "rejects_by_reason": dict(sorted(by_reason.items())), "seconds": round(self.seconds, 3),
                "images_per_s": round(self.inputs / self.seconds, 3) if self.seconds > 0 else None, **self.extra}

    def write_json(self, path: str | Path) -> None:
        """Write as_dict() to `path` (a DVC metrics file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")


# reasons of the entries screen_photos refuses ("unreadable file" as pipeline.detect.photo_io's)
UNREADABLE_FILE = "unreadable file"
NOT_A_FILE = "not a file"
UNREADABLE_FOLDER = "unreadable folder"


def screen_photos(folder: str | Path, extensions: tuple[str, ...], stage: str = "crop") -> tuple[list[Path],
                                                                                                 list[dict]]:
    """Every entry under `folder` (recursively; symlinked folders are not followed) whose name ends in one of
    `extensions` (any case): (the regular files this process can open, sorted; a reject row for each other
    one). A folder named x.jpg is 'not a file'; a dangling symlink, a symlink loop or a file it may not read is
    an 'unreadable file'; a subfolder it cannot list is an 'unreadable folder'. Nothing is skipped silently."""
    photos: list[Path] = []
    rejects: list[dict] = []

    def unlistable(error: OSError) -> None:
        rejects.append(reject_row(str(error.filename), stage, Rejected(UNREADABLE_FOLDER, str(error))))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):
        for name in sorted(dirnames + filenames):
            if os.path.splitext(name)[1].lower() not in extensions:
                continue
            path = Path(dirpath) / name
            try:
                info = path.stat()  # follows the symlink: a dangling one or a loop raises here
                if not stat.S_ISREG(info.st_mode):
                    raise Rejected(NOT_A_FILE, "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file")
                os.close(os.open(path, os.O_RDONLY))
            except Rejected as error:
                rejects.append(reject_row(str(path), stage, error))
            except OSError as error:
                what = "broken symlink: " if path.is_symlink() else ""
                rejects.append(reject_row(str(path), stage, Rejected(UNREADABLE_FILE, f"{what}{error}")))
            else:
                photos.append(path)
    return sorted(photos), sorted(rejects, key=lambda r: r["path"])
