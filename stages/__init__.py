"""One thin CLI script per DVC stage (`python -m stages.<name>`).

The library's process settings (OpenMP's passive waiting, MKL's fixed code path: pipeline/__init__.py) are made
here, by importing it before any stage imports torch.
"""
import pipeline  # noqa: F401  (sets OMP_WAIT_POLICY and MKL_CBWR)

# -- params.yaml: read once per stage, checked before any work ----------------------------------------------------
# PARAM_CHECKS holds one line per setting: `section.key` (nested: `section.sub.key`) -> a check. A key that is
# missing here is not checked (new settings work before anyone lists them); a listed key must be present. A
# mapping check applies to each value of a mapping whose keys are free (e.g. reconstruct.loss_weights: every
# weight a number >= 0, new terms included).
from pathlib import Path as _Path  # noqa: E402


def _int(lo=None, hi=None):
    def check(v):
        ok = isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
        return None if ok else "an int" + _range(lo, hi)
    return check


def _num(lo=None, hi=None, above=None, below=None):
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf") and (
            lo is None or v >= lo) and (hi is None or v <= hi) and (above is None or v > above) and (
            below is None or v < below)
        return None if ok else "a number" + _range(lo, hi, above, below)
    return check


def _range(lo=None, hi=None, above=None, below=None) -> str:
    parts = [f">= {lo}" if lo is not None else "", f"> {above}" if above is not None else "",
             f"<= {hi}" if hi is not None else "", f"< {below}" if below is not None else ""]
    return "".join(f" {p}" if i == 0 else f" and {p}" for i, p in enumerate(p for p in parts if p))


def _bool(v):
    return None if isinstance(v, bool) else "true or false"


def _str(v):
    return None if isinstance(v, str) else "a string"


def _choice(*options):
    def check(v):
        return None if v in options else "one of " + ", ".join(map(str, options))
    return check


def _list_of(item):
    def check(v):
        return None if isinstance(v, list) and all(item(x) is None for x in v) else f"a list, each {item(object())}"
    return check


class _each_value:
    """A mapping with free keys, each value checked by `item` (errors name the key: section.key.sub)."""

    def __init__(self, item):
        self.item = item

    def __call__(self, v):
        return None if isinstance(v, dict) else "a mapping"


_STEPS, _POS_INT, _SIZE = _int(0), _int(1), _int(0)
PARAM_CHECKS: dict[str, object] = {
    "workers": _int(0),
    "data.images": _str,
    "face_model.source": _choice("sfm", "bfm", "ict"),
    "face_model.ict_area": _choice("full", "narrow"),
    "face_model.sfm_albedo_rgb": _list_of(_num(0, 1)), "face_model.landmarks": _choice("fitted", "model_file"),
    "crop.detectors": _list_of(_str),  # the names: pipeline.detect.crop.CropSettings (the list grows with detectors)
    "crop.blazeface_min_score": _num(0, 1), "crop.mesh_passes": _POS_INT,
    "crop.multi_face": _choice("largest", "all"),
    "crop.upsample": _int(0), "crop.min_score": _num(), "crop.min_face_px": _SIZE,
    "crop.max_pixels": _POS_INT, "crop.detect_max_side_px": _SIZE, "crop.jpeg_quality": _int(1, 100),
    "landmarks.max_template_px": _num(above=0), "landmarks.source": _choice("dlib", "mesh", "fused"),
    "landmarks.fuse_max_disagreement": _num(above=0), "landmarks.min_mesh_score": _num(0, 1),
    "landmarks.profile_yaw_deg": _num(0, 90),
    "masks.method": _choice("mesh", "skin", "bisenet"), "masks.mesh_obj": _str, "masks.min_mesh_score": _num(0, 1),
    "masks.skin_gate": _num(0, 1), "mask_comparison.synth_faces": _POS_INT, "mask_comparison.skin_gate": _num(0, 1),
    "masks.face_classes": _list_of(_str), "masks.bisenet_weights": _str, "masks.forehead_lift": _num(0),
    "masks.feather_px": _num(0), "masks.min_coverage": _num(0, below=1),
    "pack.val_ratio": _num(0, 1), "pack.shard_rows": _POS_INT, "pack.row_group_rows": _POS_INT,
    "albedo.components": _POS_INT, "albedo.batch_size": _POS_INT, "albedo.landmark_steps": _STEPS,
    "albedo.full_steps": _STEPS, "albedo.lr": _num(above=0), "albedo.prior_weight": _num(0),
    "reconstruct.method": _choice("fit", "network", "network+fit"),
    "reconstruct.shards": _str, "reconstruct.out": _str, "reconstruct.face_model": _str,
    "reconstruct.checkpoint": _str, "reconstruct.batch_size": _POS_INT, "reconstruct.landmark_steps": _STEPS,
    "reconstruct.full_steps": _STEPS, "reconstruct.refine_steps": _STEPS, "reconstruct.lr": _num(above=0),
    "reconstruct.landmark_stage_weight": _num(0), "reconstruct.landmark_stage_coefficient": _num(0),
    "reconstruct.landmark_stage_mesh_weight": _num(0), "reconstruct.pose_from_mesh": _bool,
    "reconstruct.jaw_weight": _num(0), "reconstruct.nose_weight": _num(0), "reconstruct.mouth_weight": _num(0),
    "reconstruct.loss_weights": _each_value(_num(0)),
    "reconstruct.identity_net": _choice("dlib", "arcface", "none"), "reconstruct.identity_weights": _str,
    "reconstruct.write_meshes": _bool, "reconstruct.write_overlays": _bool, "reconstruct.write_crops": _bool,
    "reconstruct.write_vertices": _bool,
    "train.face_model": _str, "train.shards": _str, "train.device": _choice("auto", "cpu", "cuda"),
    "train.resume": _bool, "train.arch": _choice("resnet18", "resnet50"), "train.init_weights": _str,
    "train.identity_net": _choice("dlib", "arcface", "none"), "train.identity_weights": _str, "train.epochs": _POS_INT, "train.batch_size": _POS_INT,
    "train.lr": _num(above=0), "train.lr_decay": _num(above=0), "train.lr_decay_epochs": _POS_INT,
    "train.grad_clip": _num(0), "train.seed": _int(0), "train.loader_workers": _int(0),
    "train.loss": _each_value(_num(0)), "train.nose_weight": _num(0), "train.mouth_weight": _num(0),
    "train.augment.shift_px": _num(0), "train.augment.scale": _num(0, below=1),
    "train.augment.rotation_deg": _num(0, 180), "train.augment.flip": _num(0, 1),
    "train.trainable": _list_of(_str), "train.face_model_lr": _num(0), "train.face_model_reg": _num(0),
    "train.max_nonfinite": _int(0), "train.checkpoint_every": _POS_INT, "train.eval_every": _POS_INT,
    "report.title": _str, "report.max_faces": _int(0), "report.thumb_px": _POS_INT,
    "report.jpeg_quality": _int(1, 100), "report.metrics": _each_value(_str),
    "model_comparison.synthetic_faces": _POS_INT, "model_comparison.seed": _int(0),
    "model_comparison.yaw_max_deg": _num(0, 90), "model_comparison.full_steps": _STEPS,
    "face_model.ict_source": _str,
    "synth.count": _POS_INT, "synth.seed": _int(0), "synth.face_model": _str, "synth.backgrounds": _str,
    "evaluate.sfm_model": _str,
    "evaluate.alignment": _choice("rigid", "similarity"), "evaluate.eos_iterations": _int(0),
    "evaluate.eos_lambda_identity": _num(0), "evaluate.eos_lambda_expressions": _num(0),
    "bench.size_px": _POS_INT, "bench.batch": _POS_INT, "bench.reconstruct_batches": _POS_INT,
    "bench.repeats": _POS_INT, "bench.scale_faces": _list_of(_POS_INT), "bench.scale_shard_rows": _POS_INT,
    "bench.loader_batches": _POS_INT,
}


def param_errors(params: dict, *sections: str) -> list[str]:
    """What is wrong with `params` in `sections` (as a stage's `params:` in dvc.yaml: "reconstruct", "workers",
    "synth.face_model"), one line per setting: 'reconstruct.full_steps must be an int >= 0, got -5'."""
    errors = []
    for name, check in PARAM_CHECKS.items():
        if not any(name == s or name.startswith(s + ".") for s in sections):
            continue
        value, path = params, name.split(".")
        for i, key in enumerate(path):
            if not isinstance(value, dict):
                errors.append(f"{'.'.join(path[:i])} must be a mapping, got {value!r}")
                break
            if key not in value:
                errors.append(f"{name} is missing")
                break
            value = value[key]
        else:
            problem = check(value)
            if problem is not None:
                errors.append(f"{name} must be {problem}, got {value!r}")
            elif isinstance(check, _each_value):
                errors += [f"{name}.{key} must be {check.item(x)}, got {x!r}" for key, x in value.items()
                           if check.item(x) is not None]
    return list(dict.fromkeys(errors))


def read_params(path, *sections: str) -> dict:
    """params.yaml at `path`, its `sections` checked (param_errors): a missing or unreadable file, or any bad
    setting, stops the stage with a message naming it, before any work."""
    path = _Path(path)
    if not path.is_file():
        raise SystemExit(f"--params: no such file: {path}")
    import yaml

    try:
        params = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SystemExit(f"--params {path}: cannot read it: {error}") from None
    if not isinstance(params, dict):
        raise SystemExit(f"--params {path}: expected a mapping of sections, got {type(params).__name__}")
    errors = param_errors(params, *sections)
    if errors:
        raise SystemExit(f"{path}: bad parameters:\n  " + "\n  ".join(errors))
    return params


def build_settings(cls, values: dict, section: str):
    """cls(**values) for a settings class that checks its own values (CropSettings, ...): its refusal (an
    unknown key, a value it does not accept) stops the stage with the message, before any work."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"bad parameters in {section}: {error}") from None
