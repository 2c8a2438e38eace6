"""The peer baseline: eos (Huber et al. 2016) fitting the Surrey Face Model to 68 landmarks.

`eos.fitting.fit_shape_and_pose` alternates a scaled-orthographic camera estimate, a linear identity fit, an
expression-blendshape fit and the jaw-contour correspondence search (the contour landmarks iBUG 1-8 and 10-17
slide along the model's contour vertices). Its mesh is in eos's own SFM frame (mm, NOT recentred like our
models/face_model.npz); vertex errors are alignment-invariant, so the frames need not agree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .metrics import check_shape

N_LANDMARKS = 68
SFM_VERTS = 3448


@dataclass(frozen=True)
class EosFit:
    verts_mm: np.ndarray  # (3448, 3) float32 identity + expression mesh, eos's SFM model frame, mm
    lmk_px: np.ndarray    # (68, 2) float32 the fitted mesh's landmark vertices projected into the photo, px
    yaw_deg: float        # eos's head pose estimate, degrees
    seconds: float        # wall time of the fit alone (model loading excluded)


class EosFitter:
    """eos with the SFM 3448 shape model and its 6 expression blendshapes, loaded once for many fits.

    sfm_dir: folder with sfm_shape_3448.bin, expression_blendshapes_3448.bin, ibug_to_sfm.txt,
    sfm_model_contours.json and sfm_3448_edge_topology.json (../shared/face_models/sfm).
    landmark_vertices: (68,) int SFM vertex of each iBUG landmark, for projecting the fitted mesh's 68 points
    (eos maps only some landmarks itself); the SFM face model's `landmarks` array.
    iterations, lambda_identity, lambda_expressions: eos's fitting settings (its defaults: 5, 30, 30).
    """

    def __init__(self, sfm_dir: str | Path, landmark_vertices: np.ndarray, iterations: int = 5,
                 lambda_identity: float = 30.0, lambda_expressions: float = 30.0):
        import eos  # imported here: only the evaluation needs the peer library

        landmark_vertices = np.asarray(landmark_vertices, np.int64)
        check_shape("landmark_vertices", landmark_vertices, (N_LANDMARKS,))
        if landmark_vertices.min() < 0 or landmark_vertices.max() >= SFM_VERTS:
            raise ValueError(f"landmark_vertices: expected SFM vertex indices in [0, {SFM_VERTS})")
        sfm_dir = Path(sfm_dir)
        shape = eos.morphablemodel.load_model(str(sfm_dir / "sfm_shape_3448.bin"))
        blendshapes = eos.morphablemodel.load_blendshapes(str(sfm_dir / "expression_blendshapes_3448.bin"))
        self._eos = eos
        self._model = eos.morphablemodel.MorphableModel(
            shape.get_shape_model(), blendshapes, color_model=eos.morphablemodel.PcaModel(),
            vertex_definitions=None, texture_coordinates=shape.get_texture_coordinates())
        mapping = str(sfm_dir / "ibug_to_sfm.txt")
        self._mapper = eos.core.LandmarkMapper(mapping)
        self._edges = eos.morphablemodel.load_edge_topology(str(sfm_dir / "sfm_3448_edge_topology.json"))
        self._contour_landmarks = eos.fitting.ContourLandmarks.load(mapping)
        self._model_contour = eos.fitting.ModelContour.load(str(sfm_dir / "sfm_model_contours.json"))
        self._landmark_vertices = landmark_vertices
        self._settings = dict(num_iterations=iterations, lambda_identity=lambda_identity,
                              lambda_expressions=lambda_expressions)

    def fit(self, lmk_px: np.ndarray, width: int, height: int) -> EosFit:
        """lmk_px: (68, 2) iBUG landmarks in photo px (0-based; eos is offset-agnostic since its camera is fitted
        to the same points); width, height: the photo's size in px. Returns the EosFit."""
        lmk_px = np.asarray(lmk_px, np.float32)
        check_shape("lmk_px", lmk_px, (N_LANDMARKS, 2))
        if not np.isfinite(lmk_px).all():
            raise ValueError("lmk_px: contains NaN or Inf")
        # eos names iBUG landmarks by their 1-based number, as in ibug_to_sfm.txt.
        landmarks = [self._eos.core.Landmark(str(i + 1), p) for i, p in enumerate(lmk_px)]
        start = time.perf_counter()
        mesh, pose, _, _ = self._eos.fitting.fit_shape_and_pose(
            self._model, landmarks, self._mapper, int(width), int(height), self._edges, self._contour_landmarks,
            self._model_contour, **self._settings)
        seconds = time.perf_counter() - start
        verts = np.asarray(mesh.vertices, np.float64)
        lmk_fit = project_eos(verts[self._landmark_vertices], np.asarray(pose.get_modelview()),
                              np.asarray(pose.get_projection()), width, height)
        yaw_deg = float(pose.get_yaw_pitch_roll()[0])
        return EosFit(verts.astype(np.float32), lmk_fit.astype(np.float32), yaw_deg, seconds)


def project_eos(points_mm: np.ndarray, modelview: np.ndarray, projection: np.ndarray, width: int,
                height: int) -> np.ndarray:
    """eos's camera: points_mm (N, 3) model frame -> (N, 2) photo px. modelview, projection: (4, 4) OpenGL-style
    matrices of eos.fitting.RenderingParameters; the viewport maps clip x in [-1, 1] to [0, width] and clip y to
    [height, 0] (image y points down), as eos's own fitting does."""
    check_shape("points_mm", np.asarray(points_mm), (None, 3))
    homogeneous = np.concatenate([points_mm, np.ones((len(points_mm), 1))], axis=1)
    clip = homogeneous @ (projection @ modelview).T
    x_px = (clip[:, 0] + 1.0) * width / 2.0
    y_px = height - (clip[:, 1] + 1.0) * height / 2.0
    return np.stack([x_px, y_px], axis=1)
