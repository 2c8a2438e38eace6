"""Dense correspondence between MediaPipe's 468-point face mesh and a face model's surface.

MediaPipe's face-mesh network outputs 468 points in the vertex order of its canonical face model
(canonical_face_model.obj: 468 vertices, 898 triangles, Apache-2.0). Its frame is that of our model space
(docs/conventions.md): right-handed, +x the subject's left (vertex 33, the subject's right outer eye corner,
has x < 0 and u = 0.28 in the OBJ's texture, i.e. image left), +y up, +z out of the face; units are
centimetres (inter-ocular distance 8.9), which `read_canonical_obj` turns into mm.

`register_canonical` brings the canonical mesh onto a model's mean shape, once per face model:
1. a similarity (Umeyama) from the ANCHORS: canonical vertex -> iBUG-68 landmark vertex of the model;
2. similarity ICP: closest surface points of the canonical vertices that the model covers, plus the anchors;
3. a smooth non-rigid step: per-vertex displacements, Laplacian-regularised over the canonical mesh's edges,
   that pull each covered vertex onto the surface and each anchor onto its landmark vertex;
4. each deformed vertex's closest surface point: (triangle, barycentric).
A point's weight comes from the similarity stage alone (where the shapes differ, not where the deformation
has already closed the gap): 0 if its closest point lies on the model's outer border (the point is beyond
the model's mesh), else 1 up to FULL_WEIGHT_MM from the surface, falling linearly to 0 at ZERO_WEIGHT_MM.
The whole model mesh counts as face: the converters' meshes (SFM's head, BFM's front face) have no other surface
for MediaPipe's frontal points to land on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import factorized
from scipy.spatial import cKDTree

from .format import N_MESH468, FaceModel
from .sfm import similarity_fit

CM_TO_MM = 10.0
# canonical vertex -> 0-based iBUG-68 index, checked on the OBJ (tests/test_face_model.py): 33/133 and 263/362
# end MediaPipe's eye contours (mirror pairs, 33 at image left), 61/291 its outer lip contour, 152 is the lowest
# vertex. The nose tip is 4, the most anterior vertex (pronasale), as the models' landmark 30 is their most
# anterior vertex; the often quoted 1 lies 6.7 mm lower, on the tip's underside.
ANCHORS = {4: 30, 152: 8, 33: 36, 133: 39, 362: 42, 263: 45, 61: 48, 291: 54}
ICP_ITERS = 20
ICP_MAX_DIST_MM = 10.0      # closest-point pairs further apart than this are left out of the similarity fit
NONRIGID_ITERS = 10
SMOOTHNESS = 3.0           # weight of |d_i - d_j|^2 per canonical edge against |x_i + d_i - c_i|^2 per point
ANCHOR_WEIGHT = 100.0       # weight of |x_a + d_a - landmark_a|^2 per anchor
# Weights from the surface distance after the similarity. On SFM's mean the canonical face lies within 1.0 mm
# (mean) and 5.1 mm (max, the upper inner lip over the mouth slit) of the surface: face-to-face shape variation.
# At 10 mm, about the height of an eye opening, a point has no counterpart on the model.
FULL_WEIGHT_MM = 5.0
ZERO_WEIGHT_MM = 10.0


def read_canonical_obj(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """canonical_face_model.obj -> vertices (468, 3) float64 mm, triangles (898, 3) int64 (0-based, CCW from +z).
    Only `v` and `f` records are read; `f` corners may be `v/vt` pairs."""
    verts, tris = [], []
    for line in Path(path).read_text().splitlines():
        words = line.split()
        if words and words[0] == "v":
            verts.append([float(w) for w in words[1:4]])
        elif words and words[0] == "f":
            tris.append([int(w.split("/")[0]) - 1 for w in words[1:]])
    verts, tris = np.asarray(verts, np.float64) * CM_TO_MM, np.asarray(tris, np.int64)
    if verts.shape != (N_MESH468, 3) or tris.ndim != 2 or tris.shape[1] != 3:
        raise ValueError(f"{path}: expected {N_MESH468} vertices and triangles, got {verts.shape}, {tris.shape}")
    return verts, tris


def closest_on_triangles(points: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (N, 3) of the closest point to points[i] on triangle (a[i], b[i], c[i]); all (N, 3).
    Inside the triangle it is the plane projection, otherwise the closest point of the nearest edge."""
    ab, ac, ap = b - a, c - a, points - a
    d00, d01, d11 = (ab * ab).sum(1), (ab * ac).sum(1), (ac * ac).sum(1)
    d20, d21 = (ap * ab).sum(1), (ap * ac).sum(1)
    denom = d00 * d11 - d01 ** 2
    ok = denom > 1e-12 * np.maximum(d00 * d11, 1e-300)
    v = np.where(ok, (d11 * d20 - d01 * d21) / np.where(ok, denom, 1.0), -1.0)
    w = np.where(ok, (d00 * d21 - d01 * d20) / np.where(ok, denom, 1.0), -1.0)
    bary = np.stack([1.0 - v - w, v, w], 1)
    inside = ok & (bary >= 0).all(1)
    corners = (a, b, c)
    best, best_d = bary, np.full(len(points), np.inf)
    best_d[inside] = 0.0
    for i, j in ((0, 1), (1, 2), (2, 0)):
        edge = corners[j] - corners[i]
        t = np.clip(((points - corners[i]) * edge).sum(1) / np.maximum((edge * edge).sum(1), 1e-300), 0.0, 1.0)
        dist = (((corners[i] + t[:, None] * edge) - points) ** 2).sum(1)
        better = ~inside & (dist < best_d)
        cand = np.zeros_like(bary)
        cand[:, i], cand[:, j] = 1.0 - t, t
        best = np.where(better[:, None], cand, best)
        best_d = np.where(better, dist, best_d)
    return best


@dataclass(frozen=True)
class SurfacePoints:
    """Closest surface points of P query points: triangle (P,) int64, barycentric (P, 3) float64,
    point (P, 3) mm, distance (P,) mm."""
    triangle: np.ndarray
    barycentric: np.ndarray
    point: np.ndarray
    distance: np.ndarray


def _edges(tris: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected edges (E, 2) of tris (F, 3) and how many triangles use each, (E,)."""
    e = np.sort(tris[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(e, axis=0, return_counts=True)


def outer_border_edges(verts: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """(F, 3) bool: the edge opposite corner k of triangle f lies on the mesh's outer border, the longest
    boundary loop (holes such as a mouth slit are other loops). verts (V, 3) mm, tris (F, 3)."""
    edges, count = _edges(tris)
    border = edges[count == 1]
    n = len(verts)
    graph = sparse.coo_matrix((np.ones(len(border)), (border[:, 0], border[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    length = np.sqrt(((verts[border[:, 0]] - verts[border[:, 1]]) ** 2).sum(1))
    loop_len = np.bincount(label[border[:, 0]], weights=length, minlength=n)
    outer = border[label[border[:, 0]] == np.argmax(loop_len)]
    opposite = np.sort(tris[:, [1, 2, 2, 0, 0, 1]].reshape(-1, 3, 2), axis=2)  # edge opposite corner 0, 1, 2
    return np.isin(opposite[..., 0] * n + opposite[..., 1], outer[:, 0] * n + outer[:, 1])


class Surface:
    """A triangle mesh prepared for closest-point queries: verts (V, 3) mm, tris (F, 3) int64."""

    def __init__(self, verts: np.ndarray, tris: np.ndarray):
        self.verts = np.asarray(verts, np.float64)
        self.corners = self.verts[tris]  # (F, 3, 3)
        centroid = self.corners.mean(1)
        self.radius = np.sqrt(((self.corners - centroid[:, None]) ** 2).sum(-1)).max(1)
        # unreferenced vertices are not on the surface: their distance would not bound the closest point's
        self.centroid_tree, self.vertex_tree = cKDTree(centroid), cKDTree(self.verts[np.unique(tris)])
        self.border = outer_border_edges(self.verts, tris)
        # corner k of triangle f is an end of an outer-border edge (of this or another triangle)
        border_vertex = np.zeros(len(self.verts), bool)
        border_vertex[tris[:, [1, 2, 0]][self.border]] = True
        border_vertex[tris[:, [2, 0, 1]][self.border]] = True
        self.border_corner = border_vertex[tris]

    def closest(self, points: np.ndarray) -> SurfacePoints:
        """Exact closest points of points (P, 3) mm. The nearest vertex's distance d bounds the answer, so only
        triangles whose bounding sphere (centroid, radius) comes within d of a point are tried."""
        near, _ = self.vertex_tree.query(points)
        balls = self.centroid_tree.query_ball_point(points, near + self.radius.max() + 1e-9)
        q_idx = np.repeat(np.arange(len(points)), [len(b) for b in balls])
        t_idx = np.concatenate([np.asarray(b, np.int64) for b in balls])
        gap = np.sqrt(((points[q_idx] - self.corners[t_idx].mean(1)) ** 2).sum(1)) - self.radius[t_idx]
        keep = gap <= near[q_idx] + 1e-9
        q_idx, t_idx = q_idx[keep], t_idx[keep]
        corners = self.corners[t_idx]
        bary = closest_on_triangles(points[q_idx], corners[:, 0], corners[:, 1], corners[:, 2])
        dist = np.sqrt((((bary[:, :, None] * corners).sum(1) - points[q_idx]) ** 2).sum(1))
        order = np.lexsort((dist, q_idx))  # per query, nearest first
        first = order[np.r_[True, q_idx[order][1:] != q_idx[order][:-1]]]
        tri, bary = t_idx[first], bary[first]
        return SurfacePoints(tri, bary, (bary[:, :, None] * self.corners[tri]).sum(1), dist[first])

    def on_outer_border(self, surf: SurfacePoints, tol: float = 1e-9) -> np.ndarray:
        """(P,) bool: the closest point lies on the outer border: on a border edge (zero barycentric opposite it)
        or at a border vertex (whichever of its triangles reported it)."""
        bary = surf.barycentric
        return ((self.border[surf.triangle] & (bary <= tol)).any(1)
                | (self.border_corner[surf.triangle] & (bary >= 1 - tol)).any(1))


def _apply(sim: tuple[float, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The similarity (s, R (3, 3), t (3,)) applied to x (P, 3): s R x + t."""
    scale, rot, t = sim
    return x @ (scale * rot).T + t


def _icp_similarity(src: np.ndarray, anchor_idx: np.ndarray, anchor_dst: np.ndarray,
                    surface: Surface) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) taking src (P, 3) mm onto the surface: from the anchors src[anchor_idx] ->
    anchor_dst (A, 3), then ICP on closest points within ICP_MAX_DIST_MM and off the outer border, the anchors
    always included."""
    sim = similarity_fit(src[anchor_idx], anchor_dst)
    for _ in range(ICP_ITERS):
        surf = surface.closest(_apply(sim, src))
        keep = (surf.distance < ICP_MAX_DIST_MM) & ~surface.on_outer_border(surf)
        sim = similarity_fit(np.concatenate([src[keep], src[anchor_idx]]),
                             np.concatenate([surf.point[keep], anchor_dst]))
    return sim


def _laplacian(tris: np.ndarray, n: int) -> sparse.csr_matrix:
    """Graph Laplacian (n, n) of the mesh edges: sum over edges of |d_i - d_j|^2 = d^T L d."""
    edges, _ = _edges(tris)
    adj = sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    adj = (adj + adj.T).tocsr()
    return sparse.diags(np.asarray(adj.sum(1)).ravel()) - adj


def _nonrigid(x: np.ndarray, tris_x: np.ndarray, data_w: np.ndarray, anchor_idx: np.ndarray,
              anchor_dst: np.ndarray, surface: Surface) -> np.ndarray:
    """Deform x (P, 3) mm (a mesh with triangles tris_x): minimise over displacements d (P, 3)
    sum_i data_w_i |x_i + d_i - c_i|^2 + SMOOTHNESS d^T L d + ANCHOR_WEIGHT sum_a |x_a + d_a - anchor_dst_a|^2,
    c_i the closest surface point of x_i + d_i (re-found NONRIGID_ITERS times). Returns x + d (P, 3)."""
    a_w = np.zeros(len(x))
    a_w[anchor_idx] = ANCHOR_WEIGHT
    a_target = x.copy()
    a_target[anchor_idx] = anchor_dst
    solve = factorized((sparse.diags(data_w + a_w) + SMOOTHNESS * _laplacian(tris_x, len(x))).tocsc())
    y = x
    for _ in range(NONRIGID_ITERS):
        rhs = data_w[:, None] * (surface.closest(y).point - x) + a_w[:, None] * (a_target - x)
        y = x + np.stack([solve(rhs[:, k]) for k in range(3)], 1)
    return y


@dataclass(frozen=True)
class Registration:
    """The canonical mesh on a model's mean shape (P = 468, mm, model space).
    rigid: (P, 3) canonical vertices after the similarity; rigid_surface: their closest surface points;
    deformed: (P, 3) after the non-rigid step; surface: the closest points of `deformed`; weight: (P,) in [0, 1];
    scale: the similarity's scale (model mm per canonical mm)."""
    rigid: np.ndarray
    rigid_surface: SurfacePoints
    deformed: np.ndarray
    surface: SurfacePoints
    weight: np.ndarray
    scale: float


def point_weights(surface: Surface, rigid_surf: SurfacePoints) -> np.ndarray:
    """(P,) in [0, 1]: 0 on the outer border (beyond the mesh), else 1 up to FULL_WEIGHT_MM from the surface,
    linear to 0 at ZERO_WEIGHT_MM."""
    ramp = (ZERO_WEIGHT_MM - rigid_surf.distance) / (ZERO_WEIGHT_MM - FULL_WEIGHT_MM)
    return np.where(surface.on_outer_border(rigid_surf), 0.0, np.clip(ramp, 0.0, 1.0))


def register_canonical(canon_verts: np.ndarray, canon_tris: np.ndarray, model: FaceModel) -> Registration:
    """Register the canonical mesh (verts (468, 3) mm, tris (T, 3)) to model.mean_shape (module docstring)."""
    surface = Surface(model.mean_shape, model.triangles)
    anchor_idx = np.array(list(ANCHORS))
    anchor_dst = surface.verts[model.landmarks[list(ANCHORS.values())]]
    sim = _icp_similarity(canon_verts, anchor_idx, anchor_dst, surface)
    rigid = _apply(sim, canon_verts)
    rigid_surf = surface.closest(rigid)
    weight = point_weights(surface, rigid_surf)
    deformed = _nonrigid(rigid, canon_tris, (weight > 0).astype(np.float64), anchor_idx, anchor_dst, surface)
    return Registration(rigid, rigid_surf, deformed, surface.closest(deformed), weight, sim[0])


def with_mesh468(model: FaceModel, canonical_obj: str | Path) -> FaceModel:
    """A copy of `model` with the 468-point correspondence (mesh468_triangle, mesh468_barycentric,
    mesh468_weight) registered from canonical_face_model.obj; everything else unchanged."""
    canon_verts, canon_tris = read_canonical_obj(canonical_obj)
    reg = register_canonical(canon_verts, canon_tris, model)
    bary = np.clip(reg.surface.barycentric, 0.0, 1.0)
    bary = (bary / bary.sum(1, keepdims=True)).astype(np.float32)
    return replace(model, mesh468_triangle=reg.surface.triangle.astype(np.int64), mesh468_barycentric=bary,
                   mesh468_weight=reg.weight.astype(np.float32))
