"""Coefficients -> mesh: shape and albedo models, rotation, SH shading and the perspective camera.

Spaces and units are those of docs/conventions.md: model space in mm, camera space in world units
(decimetres, camera at z = 10), image space in pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .format import FaceModel

MM_TO_WORLD = 0.01
N_SH = 27
# Deep3DFaceRecon adds 0.8 to every channel's DC SH coefficient, so zero coefficients give soft ambient light.
SH_DC_INIT = 0.8


class Coeffs(NamedTuple):
    """The named groups of a coefficient vector; each (B, K) for its K."""
    id: torch.Tensor
    exp: torch.Tensor
    alb: torch.Tensor
    rot: torch.Tensor    # (B, 3) pitch, yaw, roll in radians
    sh: torch.Tensor     # (B, 27) 9 SH bands x 3 colour channels, channel-major (r0..r8, g0..g8, b0..b8)
    trans: torch.Tensor  # (B, 3) world units


@dataclass(frozen=True)
class CoeffLayout:
    """Sizes of the coefficient groups in the flat vector `id | exp | alb | rot | sh | trans`."""
    k_id: int
    k_exp: int
    k_alb: int

    @classmethod
    def of(cls, model: FaceModel) -> "CoeffLayout":
        return cls(model.k_id, model.k_exp, model.k_alb)

    @property
    def sizes(self) -> dict[str, int]:
        return {"id": self.k_id, "exp": self.k_exp, "alb": self.k_alb, "rot": 3, "sh": N_SH, "trans": 3}

    @property
    def size(self) -> int:
        return sum(self.sizes.values())

    def split(self, coeffs: torch.Tensor) -> Coeffs:
        """coeffs: (B, size) -> Coeffs of views into it."""
        if coeffs.ndim != 2 or coeffs.shape[1] != self.size:
            raise ValueError(f"coeffs: expected (B, {self.size}) for layout {self.sizes}, got {tuple(coeffs.shape)}")
        return Coeffs(*torch.split(coeffs, list(self.sizes.values()), dim=1))

    def join(self, parts: Coeffs) -> torch.Tensor:
        """Coeffs -> (B, size); the inverse of split."""
        return torch.cat(list(parts), dim=1)

    def zeros(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The mean face, frontal, ambient light, zero translation: (batch, size)."""
        return torch.zeros(batch, self.size, device=device, dtype=dtype)


@dataclass(frozen=True)
class Camera:
    """Pinhole camera of Deep3DFaceRecon: focal in px, square image of `size_px`, centre on the image centre."""
    focal_px: float = 1015.0
    size_px: int = 224
    distance: float = 10.0  # camera z in world units, looking down -z

    @property
    def center_px(self) -> float:
        return (self.size_px - 1) / 2.0


def euler_to_rotation(angles: torch.Tensor) -> torch.Tensor:
    """angles: (B, 3) pitch, yaw, roll in radians -> R: (B, 3, 3) = Rz(roll) @ Ry(yaw) @ Rx(pitch)."""
    if angles.ndim != 2 or angles.shape[1] != 3:
        raise ValueError(f"angles: expected (B, 3), got {tuple(angles.shape)}")
    x, y, z = angles.unbind(1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    cx, sx, cy, sy, cz, sz = x.cos(), x.sin(), y.cos(), y.sin(), z.cos(), z.sin()
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def vertex_normals(verts: torch.Tensor, tris: torch.Tensor) -> torch.Tensor:
    """verts: (B, V, 3), tris: (F, 3) int64 -> unit normals (B, V, 3): area-weighted mean of face normals."""
    v0, v1, v2 = (verts.index_select(1, tris[:, i]) for i in range(3))
    face_n = torch.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 x area, so the sum is area-weighted
    # Summed as rows of a (V, B * 3) table: index_add_ along dim 0 adds whole rows, ~5x faster on CPU than along
    # dim 1, in the same order (corner by corner), so the normals and their gradients are the same to the last
    # bit. (Gathering from such a table too would be faster still, but it changes the order in which autograd
    # sums the gradients reaching `verts`, and so the last bits of every fit.)
    batch, n_tris, _ = face_n.shape
    corner_n = face_n.permute(1, 0, 2).reshape(n_tris, batch * 3).repeat_interleave(3, dim=0)
    normals = face_n.new_zeros(verts.shape[1], batch * 3).index_add_(0, tris.reshape(-1), corner_n)
    normals = normals.view(verts.shape[1], batch, 3).permute(1, 0, 2).contiguous()
    return nn.functional.normalize(normals, dim=-1, eps=1e-12)


_SH_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_SH_C = (1 / math.sqrt(4 * math.pi), math.sqrt(3.0) / math.sqrt(4 * math.pi), 3 * math.sqrt(5.0) / math.sqrt(12 * math.pi))


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """normals: (B, V, 3) unit -> (B, V, 9) the first 3 SH bands, Lambertian-convolved (Deep3DFaceRecon)."""
    nx, ny, nz = normals.unbind(-1)
    a, c = _SH_A, _SH_C
    return torch.stack([
        torch.full_like(nx, a[0] * c[0]),
        -a[1] * c[1] * ny, a[1] * c[1] * nz, -a[1] * c[1] * nx,
        a[2] * c[2] * nx * ny, -a[2] * c[2] * ny * nz,
        0.5 * a[2] * c[2] / math.sqrt(3.0) * (3 * nz ** 2 - 1),
        -a[2] * c[2] * nx * nz, 0.5 * a[2] * c[2] * (nx ** 2 - ny ** 2),
    ], dim=-1)


def sh_shading(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """normals: (B, V, 3) unit, camera space; sh: (B, 27) -> irradiance (B, V, 3) per colour channel."""
    if sh.ndim != 2 or sh.shape[1] != N_SH:
        raise ValueError(f"sh: expected (B, {N_SH}), got {tuple(sh.shape)}")
    gamma = sh.view(-1, 3, 9) + sh.new_tensor([SH_DC_INIT] + [0.0] * 8)
    return torch.einsum("bvk,bck->bvc", sh_basis(normals), gamma)


def project(verts_cam: torch.Tensor, camera: Camera) -> torch.Tensor:
    """verts_cam: (B, V, 3) world units -> verts_px: (B, V, 3) x_px, y_px and positive depth (world units)."""
    depth = camera.distance - verts_cam[..., 2]
    x_px = camera.center_px + camera.focal_px * verts_cam[..., 0] / depth
    y_px = camera.center_px - camera.focal_px * verts_cam[..., 1] / depth
    return torch.stack([x_px, y_px, depth], dim=-1)


# iBUG jaw points 0-7 lie on the subject's right (-x) outline, 9-16 on the left; 8 (chin) is fixed.
JAW_RIGHT, JAW_LEFT = tuple(range(0, 8)), tuple(range(9, 17))
JAW_BAND_MM = 3.0
JAW_MIN_X_FRACTION = 0.35


def jaw_contour_candidates(mean_shape: np.ndarray, landmarks: np.ndarray, band_mm: float = JAW_BAND_MM) -> np.ndarray:
    """For each jaw landmark, the vertices of its horizontal row on its side of the face.

    mean_shape: (V, 3) mm; landmarks: (68,) vertex ids. Returns (16, K) int64 for jaw points 0-7 then 9-16,
    padded with -1: the vertices within band_mm of the landmark's height with x on the landmark's side.
    2D annotators put jaw points on the face's silhouette, which slides across these rows as the head turns
    (eos's contour fitting does the same with hand-made lists); a fixed vertex only matches frontal faces.
    """
    rows = []
    for j in JAW_RIGHT + JAW_LEFT:
        x_j, y_j = mean_shape[landmarks[j], :2]
        # |x| > 0.35 |x_j| keeps the nose out of the upper rows, where it could outreach the far cheek
        row = np.flatnonzero((np.abs(mean_shape[:, 1] - y_j) < band_mm)
                             & (mean_shape[:, 0] * np.sign(x_j) > JAW_MIN_X_FRACTION * abs(x_j)))
        rows.append(np.union1d(row, [landmarks[j]]))
    k = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, k - len(r)), constant_values=-1) for r in rows]).astype(np.int64)


def silhouette_jaw_px(cand_px: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """cand_px: (B, 16, K, 2) projected candidates; candidates: (16, K) ids (-1 = padding) -> (B, 16, 2) the
    outermost candidate in image x: the leftmost for the subject's right jaw, the rightmost for the left."""
    side = torch.cat([cand_px.new_full((len(JAW_RIGHT),), 1.0), cand_px.new_full((len(JAW_LEFT),), -1.0)])
    key = (cand_px[..., 0] * side[:, None]).masked_fill(candidates < 0, float("inf"))
    pick = key.argmin(dim=-1)  # the selection is discrete; gradients flow through the picked vertex's position
    return cand_px.gather(2, pick[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)


class Decoded(NamedTuple):
    verts_model: torch.Tensor  # (B, V, 3) mm, identity + expression, before pose
    verts_cam: torch.Tensor    # (B, V, 3) world units, posed
    verts_px: torch.Tensor     # (B, V, 3) pixels + depth
    normals_cam: torch.Tensor  # (B, V, 3) unit
    albedo: torch.Tensor       # (B, V, 3) reflectance
    colors: torch.Tensor       # (B, V, 3) albedo x SH irradiance
    lmk_px: torch.Tensor       # (B, 68, 2) projected landmarks (jaw points on the silhouette)


class FaceDecoder(nn.Module):
    """The face model on a device: coefficients (B, C) -> Decoded mesh. Bases are buffers; `trainable`
    names the arrays ('mean_albedo', 'albedo_basis', 'id_basis', 'exp_basis') that become parameters."""

    def __init__(self, model: FaceModel, camera: Camera = Camera(), trainable: tuple[str, ...] = ()):
        super().__init__()
        self.layout = CoeffLayout.of(model)
        self.camera = camera
        arrays = {
            "mean_shape": model.mean_shape, "id_basis": model.id_basis, "exp_basis": model.exp_basis,
            "mean_albedo": model.mean_albedo, "albedo_basis": model.albedo_basis,
            "face_region": model.face_region,
        }
        unknown = set(trainable) - {"mean_albedo", "albedo_basis", "id_basis", "exp_basis"}
        if unknown:
            raise ValueError(f"trainable: unknown face model arrays {sorted(unknown)}")
        for key, value in arrays.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            if key in trainable:
                self.register_parameter(key, nn.Parameter(tensor))
            else:
                self.register_buffer(key, tensor)
        self.register_buffer("triangles", torch.from_numpy(model.triangles))
        self.register_buffer("landmarks", torch.from_numpy(model.landmarks))
        jaw = (model.jaw_candidates if model.jaw_candidates.size
               else jaw_contour_candidates(model.mean_shape, model.landmarks))
        self.register_buffer("jaw_candidates", torch.from_numpy(jaw))
        # The 468-point correspondence (empty when not derived) is fixed data of the face model, never trained:
        # kept out of the state dict so that snapshots from before it existed still load.
        # mesh468_vertices (U,): the corner vertices used; mesh468_corners (468, 3): each point's corners among them
        vertices, corners = np.unique(model.triangles[model.mesh468_triangle], return_inverse=True)
        self.register_buffer("mesh468_vertices", torch.from_numpy(vertices), persistent=False)
        self.register_buffer("mesh468_corners", torch.from_numpy(corners.reshape(-1, 3)), persistent=False)
        self.register_buffer("mesh468_barycentric", torch.from_numpy(model.mesh468_barycentric), persistent=False)
        self.register_buffer("mesh468_weight", torch.from_numpy(model.mesh468_weight), persistent=False)
        # the expression coefficients' interval (format.py exp_range; infinite for PCA expression models)
        self.exp_lo, self.exp_hi = (float(v) for v in model.exp_range)

    def expression_weights(self, exp_coeff: torch.Tensor) -> torch.Tensor:
        """exp_coeff: (B, K_exp) -> the weights the decoder applies (B, K_exp): clamped to exp_range. Outside it
        a coefficient gets no gradient through the mesh, only from the coefficient prior, which pulls it back to
        the neutral 0 (a network's raw output); fits project their iterates into the range (project_coefficients_)."""
        return exp_coeff.clamp(self.exp_lo, self.exp_hi)

    def project_coefficients_(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Clamp, in place, the expression entries of coeffs (B, C) to exp_range (projected gradient descent for
        fits with bounded expression weights); returns coeffs."""
        with torch.no_grad():
            self.layout.split(coeffs).exp.clamp_(self.exp_lo, self.exp_hi)
        return coeffs

    def shape(self, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
        """id_coeff: (B, K_id), exp_coeff: (B, K_exp) -> verts_model (B, V, 3) mm."""
        offsets = id_coeff @ self.id_basis.T + self.expression_weights(exp_coeff) @ self.exp_basis.T
        return self.mean_shape + offsets.view(id_coeff.shape[0], -1, 3)

    def albedo(self, alb_coeff: torch.Tensor) -> torch.Tensor:
        """alb_coeff: (B, K_alb) -> reflectance (B, V, 3), unclamped (the reflectance loss keeps it sane)."""
        return self.mean_albedo + (alb_coeff @ self.albedo_basis.T).view(alb_coeff.shape[0], -1, 3)

    def pose(self, verts_model: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        """verts_model: (B, V, 3) mm, rot: (B, 3) rad, trans: (B, 3) world -> verts_cam (B, V, 3) world."""
        rotation = euler_to_rotation(rot)
        return (verts_model * MM_TO_WORLD) @ rotation.transpose(1, 2) + trans[:, None, :]

    def _landmark_vertex_ids(self) -> torch.Tensor:
        """(68 + 16 K,) the landmark vertices, then the jaw candidates (padding mapped to vertex 0)."""
        return torch.cat([self.landmarks, self.jaw_candidates.clamp_min(0).reshape(-1)])

    def _landmarks_from(self, px: torch.Tensor) -> torch.Tensor:
        """px: (B, 68 + 16 K, 2) projections of _landmark_vertex_ids -> (B, 68, 2), jaw on the silhouette."""
        n = len(self.landmarks)
        jaw = silhouette_jaw_px(px[:, n:].unflatten(1, self.jaw_candidates.shape), self.jaw_candidates)
        jaw_ids = torch.tensor(JAW_RIGHT + JAW_LEFT, device=px.device)
        return px[:, :n].index_copy(1, jaw_ids, jaw)

    def vertices_px(self, c: Coeffs, ids: torch.Tensor, depth: bool = False) -> torch.Tensor:
        """The projections (B, N, 2) px of the vertices ids (N,) int64, decoding only those vertices; with
        depth, (B, N, 3): x_px, y_px and the camera depth (world units), as `project`."""
        rows = (ids[:, None] * 3 + torch.arange(3, device=ids.device)).reshape(-1)
        offsets = c.id @ self.id_basis[rows].T + self.expression_weights(c.exp) @ self.exp_basis[rows].T
        verts_model = self.mean_shape[ids] + offsets.view(-1, len(ids), 3)
        projected = project(self.pose(verts_model, c.rot, c.trans), self.camera)
        return projected if depth else projected[..., :2]

    def landmark_px(self, c: Coeffs) -> torch.Tensor:
        """The projected 68 landmarks (B, 68, 2) px, jaw points on the silhouette (the 2D 300-W convention),
        from split coefficients, without decoding the whole mesh."""
        return self._landmarks_from(self.vertices_px(c, self._landmark_vertex_ids()))

    def landmark3d_px(self, c: Coeffs) -> torch.Tensor:
        """The projected 68 landmark vertices (B, 68, 2) px, jaw points NOT moved to the silhouette: the fixed
        3D points of the AFLW2000-3D convention (landmark_px is the 2D silhouette convention)."""
        return self.vertices_px(c, self.landmarks)

    @property
    def has_mesh468(self) -> bool:
        """Whether the face model carries the MediaPipe 468-point correspondence."""
        return self.mesh468_corners.shape[0] > 0

    def mesh468_px(self, c: Coeffs) -> torch.Tensor:
        """MediaPipe's 468 face-mesh points on this model, projected: (B, 468, 2) px. Each point is the
        barycentric interpolation of its triangle's three projected corners (decoding only those vertices);
        the exact projection of the interpolated 3D point differs by the perspective across one triangle,
        < 0.01 px for a face at the default camera. Weigh residuals by `mesh468_weight` (468,)."""
        if not self.has_mesh468:
            raise ValueError("this face model has no MediaPipe 468-point correspondence (mesh468_* arrays are "
                             "empty): add it with pipeline.face_model.mediapipe_mesh.with_mesh468, or rerun "
                             "`dvc repro face_model`")
        corners_px = self.vertices_px(c, self.mesh468_vertices)[:, self.mesh468_corners]  # (B, 468, 3, 2)
        return (corners_px * self.mesh468_barycentric[None, :, :, None]).sum(2)

    def mesh468_xyz_px(self, c: Coeffs) -> torch.Tensor:
        """This model's face mesh as MediaPipe's face-mesh network reports one: (B, 468, 3) x, y px (mesh468_px)
        and z in px, + away from the camera: the camera depth x focal / the points' mean depth (x and y's scale
        at the face), up to an offset per face, which the network's z leaves open too."""
        if not self.has_mesh468:
            raise ValueError("this face model has no MediaPipe 468-point correspondence (rerun `dvc repro "
                             "face_model`)")
        corners = self.vertices_px(c, self.mesh468_vertices, depth=True)[:, self.mesh468_corners]  # (B, 468, 3, 3)
        points = (corners * self.mesh468_barycentric[None, :, :, None]).sum(2)
        z_px = points[..., 2] * self.camera.focal_px / points[..., 2].mean(dim=1, keepdim=True)
        return torch.cat([points[..., :2], z_px[..., None]], dim=-1)

    def forward(self, coeffs: torch.Tensor) -> Decoded:
        """coeffs: (B, layout.size) -> Decoded (see its fields for shapes and units)."""
        c = self.layout.split(coeffs)
        verts_model = self.shape(c.id, c.exp)
        verts_cam = self.pose(verts_model, c.rot, c.trans)
        verts_px = project(verts_cam, self.camera)
        normals = vertex_normals(verts_cam, self.triangles)
        albedo = self.albedo(c.alb)
        colors = albedo * sh_shading(normals, c.sh)
        return Decoded(verts_model, verts_cam, verts_px, normals, albedo, colors,
                       self._landmarks_from(verts_px[:, self._landmark_vertex_ids(), :2]))
