"""Renderer benchmark helpers for the `bench` stage: test scenes and images/s of forward + backward.

Throughput = batch / median seconds of one step, a step being render + a scalar loss on the image +
backward to vertex positions and colours, after warm-up steps. The peer is deodr (PyPI, C++, CPU), which
renders one image at a time through the same per-vertex-colour, no-antialiasing path.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import eos
import numpy as np
import torch
from deodr.differentiable_renderer import Scene2D, renderScene, renderSceneB

from ..face_model import MM_TO_WORLD, Camera, project, vertex_normals
from ..render import render
from .timing import median_seconds

BFM_FRONT_VERTS = 35709
BFM_FRONT_TRIS = 70789
# The benchmark loss is a fixed random weighting of the image's pixels and channels: every rendered pixel
# carries a gradient, and the loss itself costs one dot product (deodr gets the same image gradient).
LOSS_SEED = 0


class Scene(NamedTuple):
    """One mesh in image space: verts_px (1, V, 3) x_px, y_px, depth; tris (F, 3) int64; colors (1, V, 3)."""
    verts_px: torch.Tensor
    tris: torch.Tensor
    colors: torch.Tensor

    def repeat(self, batch: int) -> "Scene":
        """The same mesh `batch` times: verts_px (batch, V, 3), colors (batch, V, 3), contiguous."""
        return Scene(self.verts_px.repeat(batch, 1, 1), self.tris, self.colors.repeat(batch, 1, 1))


def _shaded_skin(facing: torch.Tensor) -> torch.Tensor:
    """facing: (1, V, 1) in [0, 1], how squarely each vertex faces the camera -> (1, V, 3) skin-tone RGB."""
    return facing.new_tensor([0.72, 0.53, 0.44]) * (0.3 + 0.7 * facing)


def sfm_mean_face_scene(sfm_model_path: str | Path, device: torch.device | str = "cpu",
                        camera: Camera = Camera()) -> Scene:
    """The Surrey Face Model mean (eos .bin, mm), recentred, scaled mm -> world and projected by the
    conventions' camera (z = 10, f = 1015 px, 224 px crop): the face fills most of the crop.
    3448 vertices, 6736 triangles; colours: skin tone shaded by the vertex normals."""
    shape = eos.morphablemodel.load_model(str(sfm_model_path)).get_shape_model()
    mean_mm = np.asarray(shape.get_mean(), dtype=np.float32).reshape(-1, 3)
    verts_cam = torch.from_numpy((mean_mm - mean_mm.mean(0)) * MM_TO_WORLD).to(device)[None]
    tris = torch.from_numpy(np.asarray(shape.get_triangle_list(), dtype=np.int64)).to(device)
    colors = _shaded_skin(vertex_normals(verts_cam, tris)[..., 2:].clamp_min(0))
    return Scene(project(verts_cam, camera), tris, colors)


def _row_widths(n_rows: int, n_verts: int, end_widths: tuple[int, int]) -> np.ndarray:
    """Vertices per row (n_rows,) int64 of an elliptical outline, summing exactly to n_verts, with the given
    first and last row widths."""
    t = np.linspace(-0.8, 0.8, n_rows)[1:-1]
    profile = np.sqrt(1 - t ** 2)
    target = profile / profile.sum() * (n_verts - sum(end_widths))
    widths = np.floor(target).astype(np.int64)
    widths[np.argsort(widths - target)[: n_verts - sum(end_widths) - widths.sum()]] += 1  # largest remainders
    return np.concatenate([[end_widths[0]], widths, [end_widths[1]]])


def _zip_rows(upper: np.ndarray, lower: np.ndarray, upper_x: np.ndarray, lower_x: np.ndarray) -> np.ndarray:
    """Triangulate the strip between two rows of vertex ids (sorted by x): (len(upper) + len(lower) - 2, 3),
    every triangle wound the same way (positive signed area in y-down image coordinates)."""
    steps_x = np.concatenate([upper_x[1:], lower_x[1:]])
    order = np.argsort(steps_x, kind="stable")
    from_upper = order < len(upper) - 1
    i = np.cumsum(from_upper) - from_upper  # upper-row steps taken before this one
    j = np.cumsum(~from_upper) - ~from_upper
    upper_step = np.stack([upper[i], upper[np.minimum(i + 1, len(upper) - 1)], lower[j]], 1)
    lower_step = np.stack([upper[i], lower[np.minimum(j + 1, len(lower) - 1)], lower[j]], 1)
    return np.where(from_upper[:, None], upper_step, lower_step)


def synthetic_bfm_size_mesh(device: torch.device | str = "cpu") -> Scene:
    """A face-sized dome mesh with the BFM front face's counts (35,709 vertices, 70,789 triangles) at a
    face crop's screen scale: an ellipse of about 150 x 185 px centred in the 224 px crop, 0.34 px^2 per
    triangle like the BFM. Rows of vertices zipped into strips; by Euler's formula for a disc,
    F = 2V - (boundary vertices) - 2, so 200 rows with end rows of 115 and 116 vertices give the counts.
    Returns Scene: verts_px (1, 35709, 3) px + depth (9.5..10.5), tris (70789, 3) int64, colors (1, 35709, 3)."""
    n_rows, half_w, half_h, centre_x, centre_y = 200, 75.0, 92.5, 111.5, 118.0
    widths = _row_widths(n_rows, BFM_FRONT_VERTS, (115, 116))
    rows, tris, xs, ys = [], [], [], []
    start = 0
    for r, width in enumerate(widths):
        t = -0.8 + 1.6 * r / (n_rows - 1)
        half_row = half_w * np.sqrt(1 - t ** 2)
        rows.append(np.arange(start, start + width))
        xs.append(centre_x + np.linspace(-half_row, half_row, width))
        ys.append(np.full(width, centre_y + t * half_h / 0.8))
        start += width
    for r in range(n_rows - 1):
        tris.append(_zip_rows(rows[r], rows[r + 1], xs[r], xs[r + 1]))
    x, y = np.concatenate(xs), np.concatenate(ys)
    radius2 = ((x - centre_x) / half_w) ** 2 + ((y - centre_y) / half_h) ** 2
    height_world = np.sqrt(np.clip(1 - radius2, 0, None))  # a dome bulging 1 world unit toward the camera
    verts_px = torch.tensor(np.stack([x, y, 10.5 - height_world], 1), dtype=torch.float32, device=device)[None]
    tris = torch.tensor(np.concatenate(tris), dtype=torch.int64, device=device)
    facing = torch.tensor(np.clip(1 - radius2, 0, 1), dtype=torch.float32, device=device)[None, :, None]
    return Scene(verts_px, tris, _shaded_skin(facing))


def _loss_weights(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """(B, C, H, W) float32 weights of the benchmark loss sum(weights * image), fixed by LOSS_SEED."""
    generator = torch.Generator().manual_seed(LOSS_SEED)
    return torch.rand(batch, channels, height, width, generator=generator) / (batch * channels * height * width)


def _check_scene(verts_px: torch.Tensor, colors: torch.Tensor, repeats: int) -> None:
    if verts_px.ndim != 3 or verts_px.shape[2] != 3 or colors.shape[:2] != verts_px.shape[:2]:
        raise ValueError(f"verts_px (B, V, 3) / colors (B, V, C): got {tuple(verts_px.shape)} / {tuple(colors.shape)}")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")


def render_throughput(verts_px: torch.Tensor, tris: torch.Tensor, colors: torch.Tensor, height: int, width: int,
                      repeats: int = 5, warmup: int = 2) -> float:
    """Images/s of `render` forward + backward on the inputs' device.

    verts_px: (B, V, 3) x_px, y_px, depth; tris: (F, 3); colors: (B, V, C). Loss: sum(weights * image)
    with the fixed weights of _loss_weights; gradients to verts_px and colors.
    Returns B / median step seconds over `repeats` timed steps after `warmup` steps.
    """
    _check_scene(verts_px, colors, repeats)
    device = verts_px.device
    weights = _loss_weights(verts_px.shape[0], colors.shape[2], height, width).to(device).view(-1)

    def step() -> None:
        verts = verts_px.detach().requires_grad_(True)
        vertex_colors = colors.detach().requires_grad_(True)
        out = render(verts, tris, vertex_colors, height, width)
        torch.dot(out.image.reshape(-1), weights).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return verts_px.shape[0] / median_seconds(step, repeats, warmup)


def _deodr_scene(verts_px: np.ndarray, tris: np.ndarray, colors: np.ndarray, height: int, width: int,
                 clockwise: bool) -> Scene2D:
    """One mesh as deodr's 2.5D scene: per-vertex colours, no texture, no antialiased edges (no edge flags),
    integer pixel centres like ours. verts_px (V, 3), tris (F, 3) uint32, colors (V, C), float64."""
    n_verts, n_tris = len(verts_px), len(tris)
    channels = colors.shape[1]
    return Scene2D(
        faces=tris, faces_uv=tris, ij=np.ascontiguousarray(verts_px[:, :2]),
        depths=np.ascontiguousarray(verts_px[:, 2]), textured=np.zeros(n_tris, bool), uv=np.zeros((n_verts, 2)),
        shade=np.zeros(n_verts), colors=colors, shaded=np.zeros(n_tris, bool), edgeflags=np.zeros((n_tris, 3), bool),
        height=height, width=width, nb_colors=channels, texture=np.zeros((0, 0, channels)),
        background_color=np.zeros(channels), clockwise=clockwise, backface_culling=True, integer_pixel_centers=True)


def deodr_throughput(verts_px: torch.Tensor, tris: torch.Tensor, colors: torch.Tensor, height: int, width: int,
                     repeats: int = 5, warmup: int = 1) -> float:
    """Images/s of deodr forward + backward, rendering the B images one at a time (the same loss and
    gradients as render_throughput, in deodr's float64).

    deodr computes gradients only with back-face culling, so it is told the winding that most of the mesh's
    triangles have on screen (the front) and skips the others, which can only favour it.
    verts_px: (B, V, 3); tris: (F, 3); colors: (B, V, C). Returns B / median step seconds.
    """
    _check_scene(verts_px, colors, repeats)
    verts = verts_px.detach().double().cpu().numpy()
    vertex_colors = colors.detach().double().cpu().numpy()
    faces = np.ascontiguousarray(tris.cpu().numpy().astype(np.uint32))
    grad_images = _loss_weights(*colors.shape[::2], height, width).permute(0, 2, 3, 1).double().contiguous().numpy()
    edge_a, edge_b = (verts[0][faces[:, k], :2] - verts[0][faces[:, 0], :2] for k in (1, 2))
    signed_area2 = edge_a[:, 0] * edge_b[:, 1] - edge_a[:, 1] * edge_b[:, 0]
    # deodr keeps triangles of negative signed area unless clockwise, positive ones if clockwise.
    clockwise = bool((signed_area2 > 0).sum() > (signed_area2 < 0).sum())

    def step() -> None:
        for item, item_colors, grad_image in zip(verts, vertex_colors, grad_images):
            scene = _deodr_scene(item, faces, item_colors, height, width, clockwise)
            image = np.zeros((height, width, item_colors.shape[1]))
            z_buffer = np.zeros((height, width))
            renderScene(scene, 1.0, image, z_buffer, check_valid=False)
            renderSceneB(scene, 1.0, image, z_buffer, grad_image, check_valid=False)

    return verts.shape[0] / median_seconds(step, repeats, warmup)
