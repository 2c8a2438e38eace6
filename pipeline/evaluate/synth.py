"""A synthetic benchmark with exact ground truth: random faces of the face model, rendered and composited into
photo-like images.

Each face: identity, expression, albedo, pose and SH light drawn at random; rendered at the decoder camera's
224 x 224 (the same forward model the fit inverts); then placed into a larger canvas by a random similarity
(scale, in-plane rotation, shift) over a background patch cut from a real photo away from its face, so that
detection and crop alignment are part of the measured error. Ground truth: the coefficients, the mesh in model
space (mm) and the 68 model landmarks in canvas pixels, as the decoder projects them: the jaw points on the
face's silhouette, like a 2D annotator's (or dlib's), the iBUG / 300-W `.pts` convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import cv2
import numpy as np
import torch

from ..detect.alignment import transform_points
from ..face_model import CoeffLayout, FaceDecoder, FaceModel
from ..render import render
from ..render.face import render_face
from .metrics import check_shape

# A 5-point box (eyes to mouth) covers about half a face; growing it by this many box sizes on every side
# also covers the forehead, hair, chin and ears, which must stay out of the background patches.
FACE_MARGIN = 1.0
MIN_BACKGROUND_PX = 24  # smaller corner patches would be blown up into mush
# Reflectance factors of the painted features (see painted_albedo): dark brows and eyes, red lips.
BROW_FACTOR, EYE_FACTOR, LIP_FACTOR = 0.35, 0.2, (0.85, 0.5, 0.5)
BROW_RADIUS_MM = 4.0
BATCH = 8  # faces rendered together: bounds memory, keeps the CPU renderer's batches efficient


@dataclass(frozen=True)
class SynthSettings:
    """Sampling ranges. Coefficients ~ N(0, scale^2); angles uniform in +-max (degrees); canvas in px."""
    canvas_px: int = 320
    id_scale: float = 1.0
    exp_scale: float = 0.3
    # Blendshape expressions (SFM) are amounts of an expression: negative weights are anti-expressions no face
    # makes, so they are drawn as |N(0, exp_scale^2)|. PCA expression bases (BFM) are signed: set False.
    exp_nonnegative: bool = True
    alb_scale: float = 1.0
    yaw_max_deg: float = 60.0
    pitch_max_deg: float = 20.0
    roll_max_deg: float = 10.0
    light_dc_range: float = 0.25      # uniform offset of the ambient term (the decoder adds 0.8)
    light_tint_std: float = 0.05      # per-channel ambient colour
    light_band1_std: float = 0.1      # directional light (white); 0.1 keeps the dark side above ~0.4x ambient
    light_band2_std: float = 0.03
    scale_min: float = 0.75           # canvas px per render px
    scale_max: float = 1.05
    inplane_max_deg: float = 10.0     # in-plane rotation of the render in the canvas
    shift_max_px: float = 16.0        # offset of the face centre from the canvas centre
    noise_std: float = 0.01           # Gaussian pixel noise, in [0, 1] intensity units

    def __post_init__(self):
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        if self.canvas_px < 32:
            raise ValueError(f"canvas_px: expected >= 32, got {self.canvas_px}")


class SynthBatch(NamedTuple):
    images: np.ndarray       # (N, canvas, canvas, 3) uint8 RGB
    lmk_px: np.ndarray       # (N, 68, 2) float32 ground-truth landmarks, canvas px
    verts_model: np.ndarray  # (N, V, 3) float32 identity + expression mesh before pose, mm
    face_area_px: np.ndarray  # (N,) float32 face coverage in the canvas, px^2 (sum of the warped render mask)


def _inside_polygon(points_mm: np.ndarray, polygon_mm: np.ndarray, grow_mm: float) -> np.ndarray:
    """(N,) bool: points (N, 2) within grow_mm of (or inside) the polygon (K, 2), frontal x-y plane, mm."""
    poly = np.ascontiguousarray(polygon_mm, np.float32)
    return np.array([cv2.pointPolygonTest(poly, (float(x), float(y)), True) >= -grow_mm for x, y in points_mm])


def _near_polyline(points_mm: np.ndarray, line_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    """(N,) bool: points (N, 3) within radius_mm of the polyline through line_mm (K, 3), mm."""
    t = np.linspace(0.0, 1.0, 8)[:, None, None]
    samples = (line_mm[:-1] + t * (line_mm[1:] - line_mm[:-1])).reshape(-1, 3)
    return np.sqrt(((points_mm[:, None] - samples[None]) ** 2).sum(-1)).min(1) <= radius_mm


def feature_vertices(model: FaceModel) -> dict[str, np.ndarray]:
    """(V,) bool vertex sets of the facial features, located from the mean shape's landmark vertices and
    front-facing only (the back rim of the mask overlaps the eyes in x-y): 'brows' (within BROW_RADIUS_MM of the
    brow lines 17-21, 22-26), 'eyes' (inside the eye polygons 36-41, 42-47 in the frontal x-y view, grown by
    1.5 mm), 'lips' (inside the outer lip polygon 48-59 grown by 0.5 mm, outside the inner one 60-67) and
    'inner_mouth' (inside the inner lip polygon 60-67)."""
    mean = model.mean_shape.astype(np.float64)
    lmk = mean[model.landmarks]
    front = mean[:, 2] > np.percentile(mean[:, 2], 20)
    brows = _near_polyline(mean, lmk[17:22], BROW_RADIUS_MM) | _near_polyline(mean, lmk[22:27], BROW_RADIUS_MM)
    eyes = _inside_polygon(mean[:, :2], lmk[36:42, :2], 1.5) | _inside_polygon(mean[:, :2], lmk[42:48, :2], 1.5)
    inner_mouth = _inside_polygon(mean[:, :2], lmk[60:68, :2], 0.0)
    lips = _inside_polygon(mean[:, :2], lmk[48:60, :2], 0.5) & ~inner_mouth
    return {"brows": brows & front, "eyes": eyes & front, "lips": lips & front, "inner_mouth": inner_mouth & front}


def painted_albedo(model: FaceModel) -> np.ndarray:
    """The model's mean albedo (V, 3) in [0, 1] with brows and eyes darkened and lips reddened (feature_vertices).

    Why: a face model without a colour model (SFM, K_alb = 0) renders as a uniform skin mask, in which dlib's
    detector finds no eyes and misses most faces; real faces and a learned albedo model have these features."""
    features = feature_vertices(model)
    albedo = model.mean_albedo.copy()
    albedo[features["brows"]] *= BROW_FACTOR
    albedo[features["eyes"]] *= EYE_FACTOR
    albedo[features["lips"]] *= np.asarray(LIP_FACTOR, np.float32)
    return albedo


TRUE_REGIONS = ("skin", "surface")


def true_region_weights(model: FaceModel, kind: str) -> np.ndarray:
    """(V,) float32 in [0, 1]: vertex weights of a synthetic face's true region, with the eye and inner-mouth
    vertices (feature_vertices) at 0. kind 'skin': the model's face_region (its skin weights; the SFM's is 0 on
    the brows, eyes, lips and mouth); 'surface': every vertex (the whole rendered face, brows and lips included,
    as the masks' outlines mean it)."""
    if kind not in TRUE_REGIONS:
        raise ValueError(f"kind must be one of {TRUE_REGIONS}, got {kind!r}")
    features = feature_vertices(model)
    weights = model.face_region.astype(np.float32).copy() if kind == "skin" else np.ones(model.n_verts, np.float32)
    weights[features["eyes"] | features["inner_mouth"]] = 0.0
    return weights


def true_region_in_crop(decoder: FaceDecoder, coeffs: np.ndarray, vertex_weights: np.ndarray,
                        render_to_crop: np.ndarray, size_px: int) -> np.ndarray:
    """The true face region of synthetic faces in their aligned crops: (N, size_px, size_px) bool.

    The faces (coeffs (N, C) float32, as in truth.parquet) are rendered at the decoder camera's size with
    vertex_weights (V,) (true_region_weights) as their colour, so the z-buffer keeps only the visible surface; a
    pixel is true face where the interpolated weight is >= 0.5. render_to_crop: (N, 2, 3) render px -> crop px
    (the crop's photo -> crop transform after the truth's render -> canvas one); warped bilinearly, kept >= 0.5.
    """
    n = len(coeffs)
    check_shape("coeffs", np.asarray(coeffs), (n, decoder.layout.size))
    check_shape("render_to_crop", np.asarray(render_to_crop), (n, 2, 3))
    with torch.no_grad():
        decoded = decoder(torch.as_tensor(coeffs, dtype=torch.float32))
        check_shape("vertex_weights", np.asarray(vertex_weights), (decoded.verts_px.shape[1],))
        colors = torch.as_tensor(vertex_weights, dtype=torch.float32).view(1, -1, 1).expand(n, -1, 3).contiguous()
        size = decoder.camera.size_px
        weights = render(decoded.verts_px, decoder.triangles, colors, size, size).image[:, 0].cpu().numpy()
    region = (weights >= 0.5).astype(np.float32)
    return np.stack([cv2.warpAffine(r, np.asarray(m, np.float64), (size_px, size_px), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0) >= 0.5
                     for r, m in zip(region, render_to_crop)])


def sample_coefficients(layout: CoeffLayout, settings: SynthSettings, rng: np.random.Generator) -> np.ndarray:
    """One random face: (layout.size,) float32 coefficients (rot in radians, trans 0: the face is centred in the
    224 render; the canvas similarity moves it)."""
    id_ = rng.normal(0.0, settings.id_scale, layout.k_id)
    exp = rng.normal(0.0, settings.exp_scale, layout.k_exp)
    exp = np.abs(exp) if settings.exp_nonnegative else exp
    alb = rng.normal(0.0, settings.alb_scale, layout.k_alb)
    limits = np.radians([settings.pitch_max_deg, settings.yaw_max_deg, settings.roll_max_deg])
    rot = rng.uniform(-limits, limits)
    sh = np.zeros((3, 9))
    sh[:, 0] = rng.uniform(-settings.light_dc_range, settings.light_dc_range) + rng.normal(
        0.0, settings.light_tint_std, 3)
    sh[:, 1:4] = rng.normal(0.0, settings.light_band1_std, 3)
    sh[:, 4:9] = rng.normal(0.0, settings.light_band2_std, 5)
    parts = {"id": id_, "exp": exp, "alb": alb, "rot": rot, "sh": sh.reshape(-1), "trans": np.zeros(3)}
    return np.concatenate([parts[name] for name in layout.sizes]).astype(np.float32)


def sample_canvas_transform(settings: SynthSettings, render_px: int, rng: np.random.Generator) -> np.ndarray:
    """A random similarity (2, 3) float64 from render px to canvas px: x_canvas = M @ [x, y, 1]. The render's
    centre lands within shift_max_px of the canvas centre."""
    scale = rng.uniform(settings.scale_min, settings.scale_max)
    angle = math.radians(rng.uniform(-settings.inplane_max_deg, settings.inplane_max_deg))
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    render_centre = np.full(2, (render_px - 1) / 2.0)
    canvas_centre = np.full(2, (settings.canvas_px - 1) / 2.0) + rng.uniform(-1, 1, 2) * settings.shift_max_px
    return np.concatenate([rot, (canvas_centre - rot @ render_centre)[:, None]], axis=1)


def read_five_points(path: str | Path) -> np.ndarray:
    """A detections/NAME.txt file (5 lines 'x y': eyes, nose, mouth corners, photo px) -> (5, 2) float64."""
    points = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if points.shape != (5, 2):
        raise ValueError(f"{path}: expected 5 lines of 'x y', got shape {points.shape}")
    return points


def background_square(face_box: np.ndarray, width: int, height: int) -> tuple[int, int, int]:
    """The largest square anchored at an image corner that avoids face_box (x0, y0, x1, y1) px, grown by
    FACE_MARGIN box sizes. Returns (x0, y0, side) px. A corner square avoids the box if it ends before the box
    starts along either axis, so its side is the larger of the two free gaps (capped by the image)."""
    x0, y0, x1, y1 = np.asarray(face_box, np.float64)
    grow = FACE_MARGIN * max(x1 - x0, y1 - y0)
    x0, y0, x1, y1 = x0 - grow, y0 - grow, x1 + grow, y1 + grow
    free_left, free_top = max(0.0, x0), max(0.0, y0)
    free_right, free_bottom = max(0.0, width - x1), max(0.0, height - y1)
    cap = min(width, height)
    corners = [  # (side, x0 of the square, y0 of the square)
        (min(cap, int(max(free_left, free_top))), 0, 0),
        (min(cap, int(max(free_right, free_top))), None, 0),
        (min(cap, int(max(free_left, free_bottom))), 0, None),
        (min(cap, int(max(free_right, free_bottom))), None, None),
    ]
    side, sx, sy = max(corners, key=lambda c: c[0])
    return (width - side if sx is None else sx), (height - side if sy is None else sy), side


def background_patch(photo: np.ndarray, five_px: np.ndarray, size_px: int, rng: np.random.Generator) -> np.ndarray:
    """A (size_px, size_px, 3) uint8 background from a corner of photo (H, W, 3) uint8 away from the face whose
    5 points are five_px (5, 2) px, resized and randomly rotated by a multiple of 90 degrees and mirrored.
    ValueError if no corner square of MIN_BACKGROUND_PX avoids the face."""
    check_shape("photo", photo, (None, None, 3))
    check_shape("five_px", np.asarray(five_px), (5, 2))
    box = np.concatenate([np.min(five_px, 0), np.max(five_px, 0)])
    x0, y0, side = background_square(box, photo.shape[1], photo.shape[0])
    if side < MIN_BACKGROUND_PX:
        raise ValueError(f"no face-free corner of at least {MIN_BACKGROUND_PX} px (best: {side} px)")
    patch = cv2.resize(photo[y0:y0 + side, x0:x0 + side], (size_px, size_px), interpolation=cv2.INTER_CUBIC)
    patch = np.rot90(patch, k=int(rng.integers(4)))
    return np.ascontiguousarray(patch[:, ::-1] if rng.random() < 0.5 else patch)


def composite(render_rgb: np.ndarray, mask: np.ndarray, background: np.ndarray, transform: np.ndarray,
              noise_std: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Place a render into a canvas: render_rgb (S, S, 3) float in [0, 1], 0 outside the face; mask (S, S) in
    [0, 1]; background (C, C, 3) uint8; transform (2, 3) render px -> canvas px. Returns the (C, C, 3) uint8
    image and the face area in canvas px^2. The render is already premultiplied by its coverage (0 outside), so
    bilinear warping of image and mask and `warped + (1 - warped_mask) * background` blends the edges exactly."""
    check_shape("background", background, (None, None, 3))
    size = background.shape[0]
    check_shape("background", background, (size, size, 3))
    check_shape("render_rgb", render_rgb, (None, None, 3))
    check_shape("mask", mask, render_rgb.shape[:2])
    warp = dict(dsize=(size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    face = cv2.warpAffine(np.ascontiguousarray(render_rgb, np.float32), transform, **warp)
    alpha = cv2.warpAffine(np.ascontiguousarray(mask, np.float32), transform, **warp)[..., None]
    image = face + (1.0 - alpha) * (background.astype(np.float32) / 255.0)
    image = image + rng.normal(0.0, noise_std, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), float(alpha.sum())


def render_synthetic(decoder: FaceDecoder, coeffs: np.ndarray, backgrounds: np.ndarray, transforms: np.ndarray,
                     noise_std: float, rng: np.random.Generator) -> SynthBatch:
    """Render N faces and composite them. coeffs: (N, C) float32; backgrounds: (N, canvas, canvas, 3) uint8;
    transforms: (N, 2, 3) render px -> canvas px; noise_std: pixel noise in [0, 1] units. Returns SynthBatch."""
    n = len(coeffs)
    check_shape("coeffs", np.asarray(coeffs), (n, decoder.layout.size))
    check_shape("backgrounds", backgrounds, (n, None, None, 3))
    check_shape("transforms", np.asarray(transforms), (n, 2, 3))
    with torch.no_grad():
        face = render_face(decoder, torch.as_tensor(coeffs, dtype=torch.float32))
    renders = face.image.permute(0, 2, 3, 1).cpu().numpy()
    masks = face.mask[:, 0].cpu().numpy()
    lmk_render = face.decoded.lmk_px.cpu().numpy()
    images, lmk, areas = [], [], []
    for i in range(n):
        image, area = composite(renders[i], masks[i], backgrounds[i], transforms[i], noise_std, rng)
        images.append(image)
        lmk.append(transform_points(lmk_render[i], transforms[i]))
        areas.append(area)
    return SynthBatch(np.stack(images), np.stack(lmk).astype(np.float32),
                      face.decoded.verts_model.cpu().numpy().astype(np.float32), np.asarray(areas, np.float32))


def drawing_model(model: FaceModel) -> FaceModel:
    """The model faces are drawn from: without a colour model (K_alb = 0) the uniform skin gets painted brows, eyes
    and lips (painted_albedo says why); otherwise the model itself."""
    if model.k_alb:
        return model
    return model.with_albedo(painted_albedo(model), model.albedo_basis, model.version + "+painted-features")


def background_sources(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(name, photo (H, W, 3) uint8 RGB, five points (5, 2) px)] for each photo in `folder` with a
    detections/NAME.txt."""
    sources = []
    for note in sorted((Path(folder) / "detections").glob("*.txt")):
        photos = [p for p in Path(folder).glob(f"{note.stem}.*") if p.is_file()]
        bgr = cv2.imread(str(photos[0])) if photos else None
        if bgr is not None:
            sources.append((photos[0].name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), read_five_points(note)))
    return sources


def draw_faces(decoder: FaceDecoder, model_name: str, settings: SynthSettings,
               sources: list[tuple[str, np.ndarray, np.ndarray]], count: int,
               rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray, dict]]:
    """`count` random faces of the decoder's model over background patches of `sources` (background_sources):
    yields (file name synth_NNNN.png, image (canvas, canvas, 3) uint8 RGB, truth row) per face, rendered BATCH at
    a time. The row's columns are those of the synth stage's truth.parquet (stages/synth.py)."""
    for lo in range(0, count, BATCH):
        n = min(BATCH, count - lo)
        coeffs = np.stack([sample_coefficients(decoder.layout, settings, rng) for _ in range(n)])
        transforms = np.stack([sample_canvas_transform(settings, decoder.camera.size_px, rng) for _ in range(n)])
        picks = rng.integers(len(sources), size=n)
        backgrounds = np.stack([background_patch(sources[k][1], sources[k][2], settings.canvas_px, rng)
                                for k in picks])
        batch = render_synthetic(decoder, coeffs, backgrounds, transforms, settings.noise_std, rng)
        groups = decoder.layout.split(torch.from_numpy(coeffs))
        for i in range(n):
            pitch, yaw, roll = np.degrees(groups.rot[i].numpy())
            row = {"file": f"synth_{lo + i:04d}.png"}
            row.update({g: getattr(groups, g)[i].numpy().copy() for g in groups._fields})
            row.update(pitch_deg=float(pitch), yaw_deg=float(yaw), roll_deg=float(roll),
                       canvas_rot_deg=float(math.degrees(math.atan2(transforms[i][1, 0], transforms[i][0, 0]))),
                       canvas_scale=float(np.hypot(transforms[i][0, 0], transforms[i][1, 0])),
                       transform=transforms[i].reshape(-1).astype(np.float32),
                       lmk_px=batch.lmk_px[i].reshape(-1), verts_model=batch.verts_model[i].reshape(-1),
                       face_area_px=float(batch.face_area_px[i]), background=sources[picks[i]][0],
                       canvas_px=settings.canvas_px, face_model=model_name)
            yield row["file"], batch.images[i], row
