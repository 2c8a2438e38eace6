"""Per-image analysis-by-synthesis: optimise coefficients of many faces at once with the training losses.

Coarse to fine, as classic 3DMM fitting: the pose starts from the face mesh's 3D points (a similarity fitted
between the model's 468 corresponding points and the mesh, so a profile face starts in profile), then pose,
translation, identity and expression are fitted against the landmarks alone (the 68 points and the 468 mesh
points; no rendering, cheap), then every group against the full hybrid loss, which keeps both landmark terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..face_model import Coeffs, Decoded, FaceDecoder
from ..face_model.decode import MM_TO_WORLD
from ..losses import identity_distance, landmark_loss, landmark_weights
from ..losses.hybrid import IdentityTarget, LossWeights, hybrid_loss
from ..nets.identity import IdentityFeatures, check_identity_net, five_points_torch, load_identity_features
from ..render.face import FaceRender, render_face

LANDMARK_STAGE_GROUPS = ("id", "exp", "rot", "trans")


def fitting_weights() -> LossWeights:
    """The full stage's default weights: Deep3DFaceRecon's, with a weak, robust landmark term and no mesh term,
    chosen on the four annotated photos and the 60-face synthetic benchmark (yaw to 90 deg) together.

    With FitSettings' per-point weights (jaw 0, even inner points): inner-51 landmark NME on the photos /
    synthetic vertex error / synthetic NME by landmark weight: 2e-4: 2.51 % / 4.42 mm / 4.9 %; 5e-4: 2.40 % /
    4.65 mm / 5.4 %; 7e-4: 2.41 % / 4.87 mm / 5.8 %; 1e-3: 2.33 % / 5.04 mm / 6.2 %; 2e-3: 2.28 % / 5.54 mm /
    7.1 %; 1e-2 (jaw 0.1, landmark-stage prior 1e-4, no mesh points): 2.27 % / 6.58 mm / 8.1 % (against the
    previous defaults, Deep3DFaceRecon's point weights and 2e-4: 2.54 % / 5.00 mm / 6.1 %). A stronger term
    helps the photos and costs the renders: dlib's and the mesh's points sit 4-5 % NME from the model's own
    landmark vertices even on frontal renders, and the shape bends to meet them; 5e-4 is better than the old
    defaults on both. The mesh term in the full stage made both worse (photos 3.32 % against 3.09 % with mesh
    2e-4, earlier vertex tables). Those figures are with the skin-model masks; with the ungated mesh masks (the
    `masks` default since) the same trade runs lower: 3e-4: 2.35 % / 4.72 mm / 4.7 %; 4e-4: 2.30 % / 4.72 mm /
    4.9 %; 5e-4: 2.28 % / 4.80 mm / 5.0 %; 7e-4: 2.23 % / 5.17 mm / 5.4 %."""
    return LossWeights(landmark=4.0e-4, mesh=0.0, landmark_delta_px=4.0)


@dataclass(frozen=True)
class FitSettings:
    landmark_steps: int = 100
    # 200 full steps: 3.65 mm against 3.95 mm at 100 on the seed-1 synthetic benchmark (cosine lr decay: 3.89)
    full_steps: int = 200
    # Adam moves each coefficient by about lr per step: identity coefficients are ~N(0, 1), so lr = 0.01
    # could not reach them in a hundred steps (measured: 4.0 mm vs 2.3 mm rigid-aligned error at lr = 0.05).
    lr: float = 5.0e-2
    weights: LossWeights = field(default_factory=fitting_weights)
    # The landmark stage has its own landmark weight (Deep3DFaceRecon's) and prior: without the prior identity
    # absorbs landmark noise (1e-3: 4.98 mm, 1e-2: 3.65 mm, 3e-2: 4.22 mm on the seed-1 benchmark).
    landmark_stage_weight: float = 1.6e-3
    landmark_stage_coefficient: float = 1.0e-2
    # the 468 mesh points in the landmark stage: 4e-4 (a quarter of the 68 points' weight) against 1.6e-3:
    # 5.08 vs 5.68 mm synthetic vertex error at equal photo NME (3.09 vs 3.08 %)
    landmark_stage_mesh_weight: float = 4.0e-4
    pose_from_mesh: bool = True                 # start the pose from the mesh's 3D points (else frontal)
    # Per-point weights of both stages' 68-point term (point_weights). Deep3DFaceRecon's (jaw 1, nose and inner
    # mouth 20, R-Net's training keeps them) cost the fit on both benchmarks: at full-stage landmark weight 2e-4,
    # photos 2.54 -> 2.51 % inner NME and renders 5.00 -> 4.42 mm (NME 6.1 -> 4.9 %) with jaw 0.1 and even inner
    # points (x20 lets 11 points outweigh the other 40 inner ones); at 5e-4, Deep3DFaceRecon's 2.41 % / 5.45 mm
    # (NME 7.0 %), jaw 0 with nose and mouth x20 2.55 % / 5.17 mm. Jaw 0, 0.1, 0.3 (even inner points) at
    # 5e-4: 2.40 / 2.39 / 2.42 %, 4.65 / 4.80 / 4.79 mm; nose and mouth 3 (jaw 0.1): 2.40 %, 4.81 mm. With jaw 0
    # the jaw follows the photometric term and the landmark stage's mesh points (the face oval), not the
    # detectors' 2D outline.
    jaw_weight: float = 0.0
    nose_weight: float = 1.0
    mouth_weight: float = 1.0
    # the recogniser of the full stage's identity term (weights.identity): dlib (its ResNet; weights "" = the
    # face_recognition_models copy), arcface (IR-SE50, weights required) or none (the term is off)
    identity_net: str = "none"
    identity_weights: str = ""

    def __post_init__(self):
        try:
            check_identity_net(self.identity_net, self.identity_weights)
        except ValueError as error:
            raise ValueError(f"reconstruct.{error}") from None
        for name in ("landmark_steps", "full_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"reconstruct.{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "landmark_stage_weight", "landmark_stage_coefficient", "landmark_stage_mesh_weight",
                     "jaw_weight", "nose_weight", "mouth_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"reconstruct.{name} must be a number >= 0, got {value!r}")

    @classmethod
    def from_params(cls, section: dict) -> "FitSettings":
        """From the plain `reconstruct` parameter section (landmark_steps, full_steps, lr, loss_weights,
        landmark_stage_weight, landmark_stage_coefficient, landmark_stage_mesh_weight, pose_from_mesh,
        jaw_weight, nose_weight, mouth_weight, identity_net, identity_weights)."""
        return cls(landmark_steps=section["landmark_steps"], full_steps=section["full_steps"], lr=section["lr"],
                   weights=LossWeights(**section["loss_weights"]),
                   landmark_stage_weight=section["landmark_stage_weight"],
                   landmark_stage_coefficient=section["landmark_stage_coefficient"],
                   landmark_stage_mesh_weight=section["landmark_stage_mesh_weight"],
                   pose_from_mesh=section["pose_from_mesh"], jaw_weight=section["jaw_weight"],
                   nose_weight=section["nose_weight"], mouth_weight=section["mouth_weight"],
                   identity_net=section["identity_net"],
                   identity_weights=section["identity_weights"])

    def point_weights(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(68,) float32 per-point weights of the 68-point landmark term (landmark_weights) on `device`."""
        return landmark_weights(self.nose_weight, self.mouth_weight, self.jaw_weight).to(device)

    def identity_features(self, device: torch.device) -> IdentityFeatures | None:
        """The full stage's recogniser on `device` (loaded once per process), None when the term is off."""
        if self.weights.identity <= 0 or self.full_steps == 0:
            return None
        return load_identity_features(self.identity_net, self.identity_weights, str(device))


def _check_batch(photo: torch.Tensor, face_mask: torch.Tensor, lmk_px: torch.Tensor, mesh_px: torch.Tensor | None,
                 size: int) -> None:
    b = photo.shape[0]
    if photo.shape != (b, 3, size, size):
        raise ValueError(f"photo: expected (B, 3, {size}, {size}), got {tuple(photo.shape)}")
    if face_mask.shape != (b, 1, size, size):
        raise ValueError(f"face_mask: expected ({b}, 1, {size}, {size}), got {tuple(face_mask.shape)}")
    if lmk_px.shape != (b, 68, 2):
        raise ValueError(f"lmk_px: expected ({b}, 68, 2), got {tuple(lmk_px.shape)}")
    if mesh_px is not None and mesh_px.shape != (b, 468, 3):
        raise ValueError(f"mesh_px: expected ({b}, 468, 3), got {tuple(mesh_px.shape)}")


def _group_mask(decoder: FaceDecoder, groups: tuple[str, ...], like: torch.Tensor) -> torch.Tensor:
    """(1, C) 1.0 on the coefficient entries of `groups`, 0.0 elsewhere."""
    parts = [torch.full((1, k), float(name in groups), device=like.device, dtype=like.dtype)
             for name, k in decoder.layout.sizes.items()]
    return torch.cat(parts, dim=1)


def _rotation_to_euler(rotation: torch.Tensor) -> torch.Tensor:
    """rotation: (B, 3, 3) = Rz(roll) @ Ry(yaw) @ Rx(pitch) -> (B, 3) pitch, yaw, roll in radians."""
    yaw = torch.asin((-rotation[:, 2, 0]).clamp(-1.0, 1.0))
    pitch = torch.atan2(rotation[:, 2, 1], rotation[:, 2, 2])
    roll = torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0])
    return torch.stack([pitch, yaw, roll], dim=1)


def pose_from_mesh(decoder: FaceDecoder, mesh_px: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """`start` (B, C) with rotation and translation set from a detected face mesh.

    mesh_px: (B, 468, 3) crop px: x right, y down, z away from the camera in px (MediaPipe's axes). A weighted
    similarity (Umeyama; weights FaceDecoder.mesh468_weight) maps the model's 468 corresponding points of its
    mean shape (mm; x right, y up, z towards the camera) onto the mesh flipped to those axes. Its rotation is the
    pose; under the weak-perspective reading of the camera its scale s (px per mm) gives the depth,
    f * MM_TO_WORLD / s = distance - t_z, and the mesh centroid gives t_x, t_y. Identity and expression stay as in
    `start`: the landmark stage fits them, and the pose with them.
    """
    corners_mm = decoder.mean_shape[decoder.mesh468_vertices][decoder.mesh468_corners]  # (468, 3 corners, 3)
    src = (corners_mm * decoder.mesh468_barycentric[..., None]).sum(1).to(mesh_px.dtype)  # (468, 3) mm
    dst = mesh_px * mesh_px.new_tensor([1.0, -1.0, -1.0])
    w = (decoder.mesh468_weight / decoder.mesh468_weight.sum()).to(mesh_px.dtype)
    mu_src, mu_dst = w @ src, torch.einsum("n,bnd->bd", w, dst)
    a, b = src - mu_src, dst - mu_dst[:, None]
    cov = torch.einsum("n,bni,nj->bij", w, b, a)
    u, sig, vt = torch.linalg.svd(cov)
    d = torch.ones_like(sig)
    d[:, -1] = torch.sign(torch.linalg.det(u @ vt))
    rotation = u @ torch.diag_embed(d) @ vt
    scale = (sig * d).sum(1) / (w @ (a ** 2).sum(1))  # crop px per mm
    camera = decoder.camera
    depth = camera.focal_px * MM_TO_WORLD / scale  # distance - t_z, world units
    # the model origin sits at the mesh centroid minus the rotated, scaled model centroid (px, y up)
    origin_px = mu_dst - scale[:, None] * torch.einsum("bij,j->bi", rotation, mu_src)
    trans = torch.stack([(origin_px[:, 0] - camera.center_px) * depth / camera.focal_px,
                         (origin_px[:, 1] + camera.center_px) * depth / camera.focal_px,
                         camera.distance - depth], dim=1)
    c = decoder.layout.split(start.detach().clone())
    c.rot.copy_(_rotation_to_euler(rotation))
    c.trans.copy_(trans)
    return decoder.layout.join(c)


def fit_coefficients(decoder: FaceDecoder, photo: torch.Tensor, face_mask: torch.Tensor, lmk_px: torch.Tensor,
                     settings: FitSettings, init: torch.Tensor | None = None,
                     mesh_px: torch.Tensor | None = None) -> torch.Tensor:
    """Fit B faces jointly (one tensor, one optimiser; the loss is a per-face sum so faces stay independent).

    photo: (B, 3, S, S) crops in [0, 1]; face_mask: (B, 1, S, S) in [0, 1]; lmk_px: (B, 68, 2) crop pixels,
    weighted per point by settings.point_weights() in both stages; init: (B, C) start coefficients (default:
    the mean face, posed from the mesh when settings.pose_from_mesh, else frontal); mesh_px: (B, 468, 3) the
    detected face mesh, crop px (None: no mesh terms; they also need the face model's 468-point correspondence).
    Returns coefficients (B, C), detached.
    """
    size = decoder.camera.size_px
    _check_batch(photo, face_mask, lmk_px, mesh_px, size)
    if mesh_px is not None and not decoder.has_mesh468:
        mesh_px = None  # a face model without the correspondence (an old or user-made .npz) fits the 68 alone
    b = photo.shape[0]
    coeffs = decoder.layout.zeros(b, photo.device, photo.dtype) if init is None else init.detach().clone()
    if init is None and mesh_px is not None and settings.pose_from_mesh:
        coeffs = pose_from_mesh(decoder, mesh_px, coeffs)
    mesh_xy = mesh_px[..., :2] if mesh_px is not None else None
    w = settings.weights
    lmk_weights = settings.point_weights(photo.device)
    features = settings.identity_features(photo.device)
    # the photo's chip is cut by the detected landmarks' five points (the landmark stage has brought the model's
    # onto them), so its features are computed once, not at every step as with the render's moving points
    identity = None if features is None else IdentityTarget.of(features, photo, five_points_torch(lmk_px))
    if settings.landmark_steps > 0:
        coeffs = fit_to_landmarks(decoder, coeffs, lmk_px, lmk_weights, settings.landmark_steps, settings.lr,
                                  settings.landmark_stage_weight, settings.landmark_stage_coefficient,
                                  mesh_xy, settings.landmark_stage_mesh_weight, w.landmark_delta_px)
    coeffs.requires_grad_(True)

    # A gradient spike (a pixel on a nearly edge-on triangle: barycentric derivatives grow as 1 / area) fills
    # Adam's momentum, which can then walk a face off for tens of steps (seen on the annotated photo: a face at
    # 25 deg yaw turned to 57 deg, its loss x2.6, landmarks 100 px off). Each face keeps its lowest-loss iterate.
    opt = torch.optim.Adam([coeffs], lr=settings.lr)
    best, best_loss = coeffs.detach().clone(), torch.full((b,), float("inf"), device=coeffs.device, dtype=coeffs.dtype)
    for step in range(settings.full_steps + 1):
        face = render_face(decoder, coeffs)
        terms = per_face_terms(decoder, face, coeffs, photo, face_mask, lmk_px, lmk_weights, w, mesh_xy, identity)
        loss = face_totals(terms, w)
        with torch.no_grad():
            improved = loss < best_loss
            best[improved], best_loss[improved] = coeffs[improved], loss[improved]
        if step == settings.full_steps:  # the last step's result is scored, not stepped from
            break
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # faces stay independent: each face's loss depends on its own coefficients only
        opt.step()
        decoder.project_coefficients_(coeffs)  # bounded expression weights (ICT: [0, 1]) stay in their range
    return best


def fit_to_landmarks(decoder: FaceDecoder, start: torch.Tensor, lmk_px: torch.Tensor, lmk_weights: torch.Tensor,
                     steps: int, lr: float, landmark_weight: float, coefficient_weight: float,
                     mesh_px: torch.Tensor | None = None, mesh_weight: float = 0.0,
                     delta_px: float = 0.0) -> torch.Tensor:
    """The landmark stage: Adam on pose, translation, identity and expression (LANDMARK_STAGE_GROUPS) against
    landmarks alone, no rendering. start: (B, C); lmk_px: (B, 68, 2) crop px; lmk_weights: (68,); mesh_px:
    (B, 468, 2) the detected face mesh, crop px, or None. The loss per face is landmark_weight x landmark_loss
    + mesh_weight x the mesh points' landmark_loss (weights FaceDecoder.mesh468_weight) + coefficient_weight x
    (|id|^2 + |exp|^2); delta_px > 0 makes the point terms robust. Returns (B, C), detached."""
    coeffs = start.detach().clone().requires_grad_(True)
    b = coeffs.shape[0]
    grad_mask = _group_mask(decoder, LANDMARK_STAGE_GROUPS, coeffs)
    use_mesh = mesh_px is not None and mesh_weight > 0
    opt = torch.optim.Adam([coeffs], lr=lr)
    for _ in range(steps):
        c = decoder.layout.split(coeffs)
        lmk = decoder.landmark_px(c)
        loss = landmark_weight * landmark_loss(lmk, lmk_px, lmk_weights, delta_px)
        if use_mesh:
            loss = loss + mesh_weight * landmark_loss(decoder.mesh468_px(c), mesh_px, decoder.mesh468_weight, delta_px)
        loss = b * (loss + coefficient_weight * (c.id.square().sum() + c.exp.square().sum()) / b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        coeffs.grad.mul_(grad_mask)
        opt.step()
        decoder.project_coefficients_(coeffs)
    return coeffs.detach()


def face_totals(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """Each face's weighted hybrid loss (B,) from its unweighted terms {name: (B,)} (per_face_terms)."""
    return sum(getattr(weights, name) * value for name, value in terms.items())


def per_face_terms(decoder: FaceDecoder, face: FaceRender, coeffs: torch.Tensor, photo: torch.Tensor,
                   face_mask: torch.Tensor, lmk_px: torch.Tensor, lmk_weights: torch.Tensor,
                   weights: LossWeights, mesh_px: torch.Tensor | None = None,
                   identity: IdentityTarget | None = None) -> dict[str, torch.Tensor]:
    """The unweighted hybrid loss terms of each face of a rendered batch: {name: (B,)}. face: the render of
    coeffs (B, C); mesh_px: (B, 468, 2) crop px or None (no "mesh" term); identity: the photo's side of the identity
    term (recogniser, five points, features) or None (no "identity" term, as with weights.identity = 0); the other
    tensors as in fit_coefficients.
    Rendering once and mapping hybrid_loss over the faces as batches of one (torch.func.vmap: the same terms as a
    loop over faces, in a few batched ops) keeps this cheap."""
    with_mesh = mesh_px is not None and weights.mesh > 0 and decoder.has_mesh468
    mesh_pred = decoder.mesh468_px(decoder.layout.split(coeffs)) if with_mesh else lmk_px[:, :0]
    mesh_target = mesh_px if with_mesh else lmk_px[:, :0]

    def one_face(face_i: FaceRender, coeffs_i: Coeffs, photo_i, face_mask_i, lmk_px_i, mesh_pred_i, mesh_i):
        face_1 = FaceRender(Decoded(*(t[None] for t in face_i.decoded)), *(t[None] for t in face_i[1:]))
        _, terms = hybrid_loss(face_1, Coeffs(*(t[None] for t in coeffs_i)), photo_i[None], face_mask_i[None],
                               lmk_px_i[None], lmk_weights, decoder.face_region, weights,
                               mesh_pred_px=mesh_pred_i[None] if with_mesh else None,
                               mesh_px=mesh_i[None] if with_mesh else None, mesh_weights=decoder.mesh468_weight)
        return terms

    terms = torch.func.vmap(one_face)(face, decoder.layout.split(coeffs), photo, face_mask, lmk_px, mesh_pred,
                                      mesh_target)
    if identity is not None and weights.identity > 0:  # batched: the recogniser runs once per step
        terms["identity"] = identity_distance(identity.render_features(face, photo), identity.photo_features)
    return terms
