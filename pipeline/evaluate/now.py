"""NoW-style scan-to-mesh error (Sanyal et al. 2019): align the predicted mesh to the scan from landmarks, then
measure the distance from every scan point to the closest point of the mesh surface (exact, not vertex-only).

The NoW benchmark refines the landmark alignment with a scan-to-mesh ICP; this module stops at the landmark
alignment, so its numbers are an upper bound of NoW's for the same prediction.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .metrics import check_shape, weighted_procrustes

# Points per chunk of the candidate search: bounds the (point, triangle) pair arrays to a few MB.
POINTS_PER_CHUNK = 2048


def closest_points_on_triangles(points: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest point of triangle (a[i], b[i], c[i]) to points[i], for all i at once.

    points, a, b, c: (M, 3) float64, any length unit. Returns (M, 3) in the same unit. Voronoi-region
    classification of Ericson, Real-Time Collision Detection (2005), sec. 5.1.5; degenerate triangles fall
    back to the nearest of their edge and vertex regions.
    """
    ab, ac = b - a, c - a
    ap, bp, cp = points - a, points - b, points - c
    d1, d2 = (ab * ap).sum(1), (ac * ap).sum(1)
    d3, d4 = (ab * bp).sum(1), (ac * bp).sum(1)
    d5, d6 = (ab * cp).sum(1), (ac * cp).sum(1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2

    def ratio(num, den):
        # Branches are evaluated everywhere and then selected; a zero denominator only occurs where its
        # branch is not selected (or the triangle is degenerate, where 0 picks the branch's start point).
        return np.divide(num, den, out=np.zeros_like(num), where=den != 0)[:, None]

    in_face = va + vb + vc
    candidates = [
        ((d1 <= 0) & (d2 <= 0), a),
        ((d3 >= 0) & (d4 <= d3), b),
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + ratio(d1, d1 - d3) * ab),
        ((d6 >= 0) & (d5 <= d6), c),
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + ratio(d2, d2 - d6) * ac),
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), b + ratio(d4 - d3, (d4 - d3) + (d5 - d6)) * (c - b)),
    ]
    out = a + ratio(vb, in_face) * ab + ratio(vc, in_face) * ac
    for mask, point in reversed(candidates):  # the first matching region wins, as in Ericson's early returns
        out = np.where(mask[:, None], point, out)
    return out


def point_to_mesh_distance(points: np.ndarray, verts: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """Exact distance (P,) from each point to the surface of the triangle mesh, in the unit of the inputs.

    points: (P, 3); verts: (V, 3); tris: (F, 3) int vertex indices. Only triangles that can beat the nearest
    vertex are tested: a triangle whose centroid is farther than (nearest-vertex distance + the largest
    centroid-to-corner radius) from the point cannot contain a closer point, so the pruning is exact.
    """
    points, verts = np.asarray(points, np.float64), np.asarray(verts, np.float64)
    tris = np.asarray(tris)
    check_shape("points", points, (None, 3))
    check_shape("verts", verts, (None, 3))
    check_shape("tris", tris, (None, 3))
    if len(tris) == 0 or tris.min() < 0 or tris.max() >= len(verts):
        raise ValueError(f"tris: expected vertex indices in [0, {len(verts)}) and at least one triangle")
    corners = verts[tris]                                  # (F, 3, 3)
    centroids = corners.mean(1)
    radius = np.linalg.norm(corners - centroids[:, None], axis=-1).max()
    # Only vertices that a triangle uses lie on the surface, so only they bound the distance from above.
    vertex_dist, _ = cKDTree(verts[np.unique(tris)]).query(points)
    centroid_tree = cKDTree(centroids)
    out = np.empty(len(points))
    for lo in range(0, len(points), POINTS_PER_CHUNK):
        chunk = points[lo:lo + POINTS_PER_CHUNK]
        # The 1e-9 relative slack keeps floating-point ties inside the ball.
        bound = (vertex_dist[lo:lo + POINTS_PER_CHUNK] + radius) * (1 + 1e-9)
        hits = centroid_tree.query_ball_point(chunk, bound)
        counts = np.array([len(h) for h in hits])
        point_idx = np.repeat(np.arange(len(chunk)), counts)
        tri_idx = np.concatenate(hits).astype(np.int64)
        c = corners[tri_idx]
        nearest = closest_points_on_triangles(chunk[point_idx], c[:, 0], c[:, 1], c[:, 2])
        dist = np.linalg.norm(nearest - chunk[point_idx], axis=1)
        best = np.full(len(chunk), np.inf)
        np.minimum.at(best, point_idx, dist)
        out[lo:lo + len(chunk)] = best
    return out


def scan_to_mesh_distance(scan_pts: np.ndarray, mesh_verts: np.ndarray, tris: np.ndarray, scan_lmk: np.ndarray,
                          mesh_lmk: np.ndarray, mode: str = "rigid") -> np.ndarray:
    """NoW-style error: distance (P,) from each scan point to the predicted mesh after a landmark alignment.

    scan_pts: (P, 3) scan points, mm; mesh_verts: (V, 3) predicted mesh, mm; tris: (F, 3) int;
    scan_lmk: (K, 3) landmark positions on the scan (NoW: 7); mesh_lmk: (K, 3) the same landmarks on the mesh.
    The mesh is moved onto the scan by the least-squares 'rigid' (NoW's evaluation of metric reconstructions)
    or 'similarity' transform between the landmark sets. Returns mm.
    """
    scan_lmk, mesh_lmk = np.asarray(scan_lmk, np.float64), np.asarray(mesh_lmk, np.float64)
    check_shape("scan_lmk", scan_lmk, (None, 3))
    check_shape("mesh_lmk", mesh_lmk, scan_lmk.shape)
    if len(scan_lmk) < 3:
        raise ValueError(f"scan_lmk: at least 3 landmarks are needed to fix a rotation, got {len(scan_lmk)}")
    scale, rot, t = weighted_procrustes(mesh_lmk, scan_lmk, np.ones(len(scan_lmk)), mode)
    aligned = scale * np.asarray(mesh_verts, np.float64) @ rot.T + t
    return point_to_mesh_distance(scan_pts, aligned, tris)
