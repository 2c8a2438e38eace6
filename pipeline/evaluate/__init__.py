"""Evaluation: metrics, ground-truth readers, the synthetic benchmark and the eos peer.

Modules: metrics (landmark NME, masked PSNR, aligned vertex error), annotations (.pts / AFLW2000-3D readers),
now (NoW-style scan-to-mesh error), synth (synthetic faces with ground truth; needs the renderer),
eos_baseline (the eos peer; needs eos-py), benchmark (per-face scores and the metrics.json summary).
"""
from .annotations import Annotation, find_annotations, read_aflw2000_mat, read_annotation, read_pts
from .metrics import aligned_vertex_error, landmark_nme, masked_psnr, region_error_stats, weighted_procrustes
from .now import closest_points_on_triangles, point_to_mesh_distance, scan_to_mesh_distance

__all__ = ["Annotation", "aligned_vertex_error", "closest_points_on_triangles", "find_annotations", "landmark_nme",
           "masked_psnr", "point_to_mesh_distance", "read_aflw2000_mat", "read_annotation", "read_pts",
           "region_error_stats", "scan_to_mesh_distance", "weighted_procrustes"]
