"""Differentiable rasterizer: exact coverage against a plain-loop reference, the top-left fill rule,
depth order, perspective-correct interpolation, gradients against finite differences, edge cases and
the real Surrey Face Model mesh."""
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.render import interpolate, rasterize, render

raster_module = sys.modules["pipeline.render.rasterize"]

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SFM_MODEL = SHARED / "face_models" / "sfm" / "sfm_shape_3448.bin"


# ---- plain-loop reference: exact rational arithmetic, D3D top-left rule stated geometrically ----

def _cross(o, a, b):
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _owns(p, q, r, point) -> bool:
    """Is `point` on the inner side of edge p->q of triangle (p, q, r), a point on the edge's line counting
    only for a top edge (horizontal, triangle below it; y grows down) or a left edge (triangle to its right)?"""
    side_point, side_r = _cross(p, q, point), _cross(p, q, r)
    if side_point != 0:
        return (side_point > 0) == (side_r > 0)
    if p[1] == q[1]:
        return r[1] > p[1]
    x_of_edge_at_r = p[0] + (r[1] - p[1]) * (q[0] - p[0]) / (q[1] - p[1])
    return r[0] > x_of_edge_at_r


def reference_raster(verts_px: torch.Tensor, tris: torch.Tensor, height: int, width: int):
    """One mesh (V, 3) -> tri_id (H, W) int, depth (H, W), bary (H, W, 3) by looping over pixels and triangles."""
    verts = [tuple(Fraction(c) for c in v) for v in verts_px.double().tolist()]
    tri_id = np.full((height, width), -1)
    depth = np.zeros((height, width))
    bary = np.zeros((height, width, 3))
    for i in range(height):
        for j in range(width):
            point, best = (Fraction(j), Fraction(i)), None
            for f, corner_ids in enumerate(tris.tolist()):
                a, b, c = (verts[k] for k in corner_ids)
                area = _cross(a, b, c)
                if area == 0 or min(a[2], b[2], c[2]) <= 0:
                    continue
                if not (_owns(a, b, c, point) and _owns(b, c, a, point) and _owns(c, a, b, point)):
                    continue
                lam = [_cross(point, b, c) / area, _cross(point, c, a) / area, _cross(point, a, b) / area]
                inv_depth = sum(l / v[2] for l, v in zip(lam, (a, b, c)))
                if best is None or 1 / inv_depth < best[0]:
                    best = (1 / inv_depth, f, [l / v[2] / inv_depth for l, v in zip(lam, (a, b, c))])
            if best is not None:
                depth[i, j], tri_id[i, j], bary[i, j] = float(best[0]), best[1], [float(x) for x in best[2]]
    return tri_id, depth, bary


def quarter_grid_scene(seed: int, n_tris: int, height: int, width: int):
    """Random triangles with corners on a 1/4-px grid (pixel centres often lie exactly on edges and corners),
    some partly off-screen, random winding; triangle f's depths lie in [1 + f, 1.75 + f] (no near ties)."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.stack([torch.randint(-12, 4 * width + 12, (n_tris, 3), generator=gen),
                      torch.randint(-12, 4 * height + 12, (n_tris, 3), generator=gen)], dim=-1) / 4
    depth = 1 + torch.arange(n_tris)[:, None] + torch.randint(0, 7, (n_tris, 3), generator=gen) / 8
    verts = torch.cat([xy, depth[..., None]], dim=-1).reshape(-1, 3)
    return verts, torch.arange(3 * n_tris).view(-1, 3)


def grid_mesh(rows: int, cols: int, spacing: float, jitter_seed: int | None, flip_seed: int | None):
    """A (rows x cols)-vertex grid mesh over the image on a 1/4-px lattice, on the plane depth = 2 + 0.05 x;
    optional lattice jitter and random per-triangle winding flips. Returns verts (V, 3), tris (F, 3)."""
    yy, xx = torch.meshgrid(torch.arange(rows) * spacing, torch.arange(cols) * spacing, indexing="ij")
    xy = torch.stack([xx, yy], -1).reshape(-1, 2) - 0.75
    if jitter_seed is not None:
        xy = xy + torch.randint(-2, 3, xy.shape, generator=torch.Generator().manual_seed(jitter_seed)) / 4
    verts = torch.cat([xy, 2 + 0.05 * xy[:, :1]], dim=1)
    idx = torch.arange(rows * cols).view(rows, cols)
    a, b, c, d = idx[:-1, :-1].reshape(-1), idx[:-1, 1:].reshape(-1), idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1)
    tris = torch.cat([torch.stack([a, b, c], 1), torch.stack([b, d, c], 1)])
    if flip_seed is not None:
        flip = torch.rand(len(tris), generator=torch.Generator().manual_seed(flip_seed)) < 0.5
        tris[flip] = tris[flip].flip(1)
    return verts, tris


def hit_counts(verts: torch.Tensor, tris: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) number of triangles that draw each pixel, each triangle rasterized on its own."""
    masks = [render(verts[None], tris[f:f + 1], torch.ones(1, len(verts), 1), height, width).mask[0, 0]
             for f in range(len(tris))]
    return torch.stack(masks).sum(0)


@pytest.fixture(params=["compiled", "batched"])
def visibility_pass(request, monkeypatch):
    """Run a test with each z-buffer pass on the CPU: the compiled one CPUs use and the batched torch one GPUs
    use (identical by design)."""
    monkeypatch.setattr(raster_module, "COMPILED_ON_CPU", request.param == "compiled")
    return request.param


# ---- coverage and the fill rule ----

@pytest.mark.usefixtures("visibility_pass")
def test_right_triangles_cover_the_hand_enumerated_pixels():
    # Square [0, 4]^2 split along its anti-diagonal; pixel centres lie on all five edges.
    verts = torch.tensor([[0.0, 0, 1], [4, 0, 1], [0, 4, 1], [4, 4, 1]])
    upper_left, lower_right = torch.tensor([[0, 1, 2]]), torch.tensor([[1, 3, 2]])
    cover_ul = render(verts[None], upper_left, torch.ones(1, 4, 1), 6, 6).mask[0, 0]
    cover_lr = render(verts[None], lower_right, torch.ones(1, 4, 1), 6, 6).mask[0, 0]
    # Top edge y = 0 and left edge x = 0 are owned; the hypotenuse is a right edge of the upper-left
    # triangle but a left edge of the lower-right one; x = 4 and y = 4 are right / bottom edges.
    expected_ul = {(i, j) for i in range(6) for j in range(6) if i + j < 4}
    expected_lr = {(i, j) for i in range(4) for j in range(4) if i + j >= 4}
    assert {tuple(p) for p in cover_ul.nonzero().tolist()} == expected_ul
    assert {tuple(p) for p in cover_lr.nonzero().tolist()} == expected_lr
    for tris in (upper_left, lower_right):  # the other winding draws the same pixels
        flipped = render(verts[None], tris.flip(1), torch.ones(1, 4, 1), 6, 6).mask[0, 0]
        assert torch.equal(flipped, render(verts[None], tris, torch.ones(1, 4, 1), 6, 6).mask[0, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.usefixtures("visibility_pass")
def test_random_triangles_match_the_reference_rasterizer(seed):
    height, width = 9, 11
    verts, tris = quarter_grid_scene(seed, 14, height, width)
    frags = rasterize(verts[None], tris, height, width)
    ref_id, ref_depth, ref_bary = reference_raster(verts, tris, height, width)
    assert (ref_id >= 0).sum() > 40  # the scene really covers pixels, with overlaps
    np.testing.assert_array_equal(frags.tri_id[0].numpy(), ref_id)
    np.testing.assert_allclose(frags.depth[0].numpy(), ref_depth, rtol=1e-5, atol=0)
    np.testing.assert_allclose(frags.bary[0].numpy(), ref_bary, atol=1e-5)


@pytest.mark.parametrize("jitter_seed, flip_seed", [(None, None), (3, None), (4, 5)])
@pytest.mark.usefixtures("visibility_pass")
def test_shared_edges_are_drawn_exactly_once(jitter_seed, flip_seed):
    height, width = 10, 10
    verts, tris = grid_mesh(4, 4, 3.5, jitter_seed, flip_seed)
    counts = hit_counts(verts, tris, height, width)
    union = counts > 0
    assert union.sum() > 60
    assert counts[union].eq(1).all(), f"pixels drawn twice:\n{counts}"
    ref_id, _, _ = reference_raster(verts, tris, height, width)
    frags = rasterize(verts[None], tris, height, width)
    np.testing.assert_array_equal(frags.tri_id[0].numpy(), ref_id)
    assert torch.equal(frags.tri_id[0] >= 0, union)  # no gaps: the mesh draws every pixel some triangle draws


@pytest.mark.parametrize("spokes", [8, 7])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.usefixtures("visibility_pass")
def test_fan_around_a_vertex_on_a_pixel_centre_draws_it_once(spokes, reverse):
    angle = torch.arange(spokes) * (2 * torch.pi / spokes) + 0.3 * (spokes % 2)
    ring = torch.stack([6 + 4.5 * angle.cos(), 6 + 4.5 * angle.sin()], 1)
    ring = torch.round(ring * 4) / 4 if spokes % 2 else torch.round(ring)  # on the lattice the reference uses
    verts = torch.cat([torch.tensor([[6.0, 6.0]]), ring], 0)
    verts = torch.cat([verts, torch.full((len(verts), 1), 3.0)], 1)
    tris = torch.tensor([[0, 1 + k, 1 + (k + 1) % spokes] for k in range(spokes)])
    if reverse:
        tris = tris.flip(1)
    counts = hit_counts(verts, tris, 13, 13)
    assert counts[6, 6] == 1
    assert counts[counts > 0].eq(1).all(), f"pixels drawn twice:\n{counts}"
    ref_id, _, _ = reference_raster(verts, tris, 13, 13)
    np.testing.assert_array_equal(rasterize(verts[None], tris, 13, 13).tri_id[0].numpy(), ref_id)


# ---- depth order and perspective-correct interpolation ----

@pytest.mark.usefixtures("visibility_pass")
def test_nearer_triangle_wins_with_exact_depth_in_either_order():
    verts = torch.tensor([[1.2, 1.3, 5.0], [14.7, 2.1, 5.0], [3.3, 13.6, 5.0],     # far, big
                          [4.1, 4.4, 2.0], [12.6, 5.2, 2.0], [6.3, 11.8, 2.0]])   # near, inside the far one
    colors = torch.tensor([[1.0, 0, 0]] * 3 + [[0.0, 1, 0]] * 3)
    for tris, near_id in ((torch.tensor([[0, 1, 2], [3, 4, 5]]), 1), (torch.tensor([[3, 5, 4], [0, 2, 1]]), 0)):
        out = render(verts[None], tris, colors[None], 16, 16)
        near_only = render(verts[None, 3:], torch.tensor([[0, 1, 2]]), colors[None, 3:], 16, 16).mask[0, 0] > 0
        assert near_only.sum() > 20
        assert (out.tri_id[0, 0][near_only] == near_id).all()
        torch.testing.assert_close(out.depth[0, 0][near_only], torch.full((int(near_only.sum()),), 2.0))
        far_visible = (out.mask[0, 0] > 0) & ~near_only
        torch.testing.assert_close(out.depth[0, 0][far_visible], torch.full((int(far_visible.sum()),), 5.0))
        assert torch.equal(out.image[0, 1] > 0, near_only) and torch.equal(out.image[0, 0] > 0, far_visible)


def test_depth_and_interpolated_position_follow_the_pinhole_ray_plane_intersection():
    focal, centre, size = 80.0, 15.5, 32
    verts_cam = torch.tensor([[-0.30, -0.25, 1.6], [0.35, -0.15, 3.2], [-0.05, 0.40, 2.1]], dtype=torch.float64)
    verts_px = torch.stack([centre + focal * verts_cam[:, 0] / verts_cam[:, 2],
                            centre + focal * verts_cam[:, 1] / verts_cam[:, 2], verts_cam[:, 2]], 1)
    tris = torch.tensor([[0, 1, 2]])
    frags = rasterize(verts_px[None], tris, size, size)
    covered = frags.tri_id[0] == 0
    assert covered.sum() > 150
    rows, cols = covered.nonzero().double().unbind(1)
    rays = torch.stack([(cols - centre) / focal, (rows - centre) / focal, torch.ones_like(rows)], 1)
    normal = torch.linalg.cross(verts_cam[1] - verts_cam[0], verts_cam[2] - verts_cam[0])
    depth_exact = (normal @ verts_cam[0]) / (rays @ normal)  # ray t * (x, y, 1) meets the plane at depth t
    torch.testing.assert_close(frags.depth[0][covered], depth_exact, rtol=1e-9, atol=0)
    position = interpolate(verts_cam[None], frags, tris)[0][covered]
    torch.testing.assert_close(position, rays * depth_exact[:, None], rtol=1e-9, atol=1e-12)


# ---- gradients ----

def _gradcheck_scene():
    """Two overlapping triangles at different depths on 9 x 9 px, float64; corners sit 3e-4 px off the 1/256 px
    snapping lattice and no edge passes within 1e-3 px of a pixel centre, so a +-1e-6 perturbation changes no
    pixel's triangle."""
    lattice = torch.tensor([[0.6, 0.9, 2.0], [8.4, 1.7, 2.5], [2.2, 7.9, 3.0],
                            [3.4, 2.6, 1.5], [8.3, 4.1, 1.8], [4.3, 8.2, 1.6]], dtype=torch.float64)
    verts = torch.round(lattice * 256) / 256
    verts[:, :2] += 3e-4
    colors = torch.rand(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tris = torch.tensor([[0, 1, 2], [3, 5, 4]])
    centres = torch.stack(torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="xy"), -1).view(-1, 1, 2)
    for a, b in ((0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3)):
        direction = (verts[b, :2] - verts[a, :2]) / (verts[b, :2] - verts[a, :2]).norm()
        offset = centres.double() - verts[a, :2]
        distance = (offset[..., 0] * direction[1] - offset[..., 1] * direction[0]).abs()
        assert distance.min() > 1e-3, "the scene must keep pixel centres off its edges"
    return verts[None].clone(), tris, colors[None].clone()


def test_render_gradients_match_finite_differences():
    """Interior gradients only: coverage is piecewise constant in the vertex positions, so without an
    antialiasing step (nvdiffrast's `antialias`) a silhouette pixel's change of triangle has zero
    derivative almost everywhere and a Dirac at the crossing. The scene keeps every pixel's triangle fixed
    under the finite-difference step, where the analytic gradient (barycentrics and perspective) is exact."""
    verts, tris, colors = _gradcheck_scene()
    counts = hit_counts(verts[0].float(), tris, 9, 9)
    assert (counts == 2).sum() > 5 and (counts == 1).sum() > 20  # overlap and single coverage both present

    def shade(verts_px, vertex_colors):
        out = render(verts_px, tris, vertex_colors, 9, 9)
        return out.image, out.depth

    verts.requires_grad_(True)
    colors.requires_grad_(True)
    assert torch.autograd.gradcheck(shade, (verts, colors), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_rasterize_interpolate_gradients_match_finite_differences():
    verts, tris, colors = _gradcheck_scene()

    def shade(verts_px, vertex_colors):
        frags = rasterize(verts_px, tris, 9, 9)
        return interpolate(vertex_colors, frags, tris), frags.depth, frags.bary

    verts.requires_grad_(True)
    colors.requires_grad_(True)
    assert torch.autograd.gradcheck(shade, (verts, colors), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- edge cases ----

def test_one_triangle_covering_the_whole_image_in_any_chunking(monkeypatch):
    verts = torch.tensor([[[-900.0, -700.0, 2.0], [2500.0, -650.0, 4.0], [-850.0, 3100.0, 3.0]]])
    tris = torch.tensor([[0, 2, 1]])
    frags = rasterize(verts, tris, 40, 56)
    assert (frags.tri_id == 0).all()
    torch.testing.assert_close(frags.bary.sum(-1), torch.ones(1, 40, 56))
    monkeypatch.setattr(raster_module, "COMPILED_ON_CPU", False)
    monkeypatch.setattr(raster_module, "CANDIDATES_PER_CHUNK", 100)
    small_chunks = rasterize(verts, tris, 40, 56)
    assert torch.equal(small_chunks.tri_id, frags.tri_id) and torch.equal(small_chunks.depth, frags.depth)
    ref_id, ref_depth, ref_bary = reference_raster(verts[0], tris, 5, 7)
    np.testing.assert_allclose(frags.depth[0, :5, :7].numpy(), ref_depth, rtol=1e-5)
    np.testing.assert_allclose(frags.bary[0, :5, :7].numpy(), ref_bary, atol=1e-5)


def test_batched_pass_in_any_chunking_matches_the_compiled_pass_on_a_mixed_scene(monkeypatch):
    verts, tris = quarter_grid_scene(7, 40, 24, 30)
    # A far background triangle with far-off corners: its edge equations need int64, the others int32.
    verts = torch.cat([verts, torch.tensor([[-3e4, -2e4, 99.0], [4e4, -1e4, 99.0], [0.5, 5e4, 99.0]])])
    tris = torch.cat([tris, torch.tensor([[len(verts) - 3, len(verts) - 2, len(verts) - 1]])])
    compiled = rasterize(verts[None].repeat(2, 1, 1), tris, 24, 30)
    assert (compiled.tri_id == 40).sum() > 0 and (compiled.tri_id == -1).sum() == 0
    monkeypatch.setattr(raster_module, "COMPILED_ON_CPU", False)
    for chunk in (1, 37, 1000, 1 << 21):
        monkeypatch.setattr(raster_module, "CANDIDATES_PER_CHUNK", chunk)
        chunked = rasterize(verts[None].repeat(2, 1, 1), tris, 24, 30)
        assert torch.equal(chunked.tri_id, compiled.tri_id) and torch.equal(chunked.depth, compiled.depth)


@pytest.mark.usefixtures("visibility_pass")
def test_offscreen_behind_camera_degenerate_and_nan_triangles_are_skipped():
    good = [[2.0, 2.0, 3.0], [9.0, 2.5, 3.0], [3.0, 9.0, 3.0]]
    cases = {
        "off-screen": [[-30.0, -5.0, 3.0], [-12.0, -4.0, 3.0], [-20.0, 6.0, 3.0]],
        "behind camera": [[1.0, 1.0, 2.0], [10.0, 1.0, -1.0], [1.0, 10.0, 2.0]],
        "on the camera plane": [[1.0, 1.0, 2.0], [10.0, 1.0, 0.0], [1.0, 10.0, 2.0]],
        "collinear": [[0.0, 0.0, 2.0], [5.0, 5.0, 2.0], [10.0, 10.0, 2.0]],
        "repeated corner": [[3.0, 3.0, 2.0], [3.0, 3.0, 2.0], [8.0, 1.0, 2.0]],
        "nan": [[1.0, 1.0, 2.0], [float("nan"), 1.0, 2.0], [1.0, 10.0, 2.0]],
        "inf depth": [[1.0, 1.0, 2.0], [10.0, 1.0, float("inf")], [1.0, 10.0, 2.0]],
    }
    tris = torch.tensor([[0, 1, 2], [3, 4, 5]])
    alone = render(torch.tensor([good]), tris[:1], torch.ones(1, 3, 3), 12, 12)
    for name, bad in cases.items():
        verts = torch.tensor([good + bad], requires_grad=True)
        out = render(verts, tris, torch.ones(1, 6, 3), 12, 12)
        assert torch.equal(out.tri_id, alone.tri_id), name
        out.image.sum().backward()
        assert torch.isfinite(verts.grad).all(), name


@pytest.mark.usefixtures("visibility_pass")
def test_partly_offscreen_and_behind_camera_mesh_matches_reference():
    verts = torch.tensor([[-6.0, 3.0, 2.0], [7.5, -4.0, 2.5], [16.25, 9.0, 3.0], [2.0, 14.0, 1.5], [5.0, 6.0, -1.0]])
    tris = torch.tensor([[0, 1, 3], [1, 2, 3], [0, 1, 4]])
    ref_id, ref_depth, _ = reference_raster(verts, tris, 10, 12)
    frags = rasterize(verts[None], tris, 10, 12)
    np.testing.assert_array_equal(frags.tri_id[0].numpy(), ref_id)
    np.testing.assert_allclose(frags.depth[0].numpy(), ref_depth, rtol=1e-5)


@pytest.mark.usefixtures("visibility_pass")
def test_batch_items_render_independently():
    verts, tris = quarter_grid_scene(11, 10, 12, 12)
    batch = torch.stack([verts, verts + torch.tensor([2.5, -1.25, 0.0]), verts.flip(0)])
    colors = torch.rand(3, len(verts), 3, generator=torch.Generator().manual_seed(1))
    out = render(batch, tris, colors, 12, 12)
    for b in range(3):
        single = render(batch[b:b + 1], tris, colors[b:b + 1], 12, 12)
        assert torch.equal(out.tri_id[b], single.tri_id[0])
        torch.testing.assert_close(out.image[b], single.image[0])
    assert not torch.equal(out.tri_id[0], out.tri_id[1]) and not torch.equal(out.tri_id[0], out.tri_id[2])
    # the image is channels_last in memory (like decoded photos) and equals interpolate's (B, H, W, C) colours
    assert out.image.is_contiguous(memory_format=torch.channels_last)
    frags = rasterize(batch, tris, 12, 12)
    torch.testing.assert_close(out.image, interpolate(colors, frags, tris).permute(0, 3, 1, 2))


def test_bad_inputs_raise_clear_errors():
    verts, tris, colors = torch.rand(1, 4, 3), torch.tensor([[0, 1, 2]]), torch.rand(1, 4, 3)
    with pytest.raises(ValueError, match="verts_px"):
        render(verts[0], tris, colors, 8, 8)
    with pytest.raises(ValueError, match="tris"):
        render(verts, torch.tensor([[0, 1, 4]]), colors, 8, 8)
    with pytest.raises(ValueError, match="tris"):
        render(verts, tris.float(), colors, 8, 8)
    with pytest.raises(ValueError, match="colors"):
        render(verts, tris, colors[:, :3], 8, 8)
    with pytest.raises(ValueError, match="height"):
        rasterize(verts, tris, 0, 8)
    with pytest.raises(ValueError, match="attr"):
        interpolate(colors[0], rasterize(verts, tris, 8, 8), tris)


# ---- the real mesh ----

@pytest.fixture(scope="module")
def sfm_face_px():
    """Surrey Face Model mean, recentred, mm -> world (x 0.01), projected by the conventions' camera at
    224 px: verts_px (1, 3448, 3), tris (6736, 3)."""
    eos = pytest.importorskip("eos")
    shape = eos.morphablemodel.load_model(str(SFM_MODEL)).get_shape_model()
    mean_world = np.asarray(shape.get_mean(), dtype=np.float64).reshape(-1, 3)
    mean_world = (mean_world - mean_world.mean(0)) * 0.01
    depth = 10.0 - mean_world[:, 2]
    verts_px = np.stack([111.5 + 1015.0 * mean_world[:, 0] / depth, 111.5 - 1015.0 * mean_world[:, 1] / depth,
                         depth], 1)
    tris = np.asarray(shape.get_triangle_list(), dtype=np.int64)
    return torch.tensor(verts_px, dtype=torch.float32)[None], torch.from_numpy(tris)


def reference_window(verts: torch.Tensor, tris: torch.Tensor, top: int, left: int, size: int) -> np.ndarray:
    """Reference tri_id (size, size) of the window at (top, left) of a big mesh, from the triangles whose
    bounding box meets it (ids of the full mesh)."""
    corners = verts[tris][..., :2]
    lo, hi = corners.min(1).values, corners.max(1).values
    near = ((lo[:, 0] <= left + size) & (hi[:, 0] >= left - 1) & (lo[:, 1] <= top + size)
            & (hi[:, 1] >= top - 1)).nonzero().squeeze(1)
    used, local_tris = torch.unique(tris[near], return_inverse=True)
    local = verts[used] - torch.tensor([float(left), float(top), 0.0])
    tri_id, _, _ = reference_raster(local, local_tris, size, size)
    return np.where(tri_id >= 0, near.numpy()[tri_id], -1)


@pytest.mark.usefixtures("visibility_pass")
def test_real_face_mesh_matches_reference_and_has_no_cracks(sfm_face_px):
    cv2 = pytest.importorskip("cv2")
    verts, tris = sfm_face_px
    verts = torch.cat([torch.round(verts[..., :2] * 256) / 256, verts[..., 2:]], -1)  # on the reference's lattice
    out = render(verts, tris, torch.ones_like(verts), 224, 224)
    mask = out.mask[0, 0].numpy() > 0
    assert 15000 < mask.sum() < 40000  # the face fills most of the crop
    for top, left in ((60, 95), (140, 100)):  # eye corner / nose side and the lips, small dense triangles
        np.testing.assert_array_equal(out.tri_id[0, 0, top:top + 8, left:left + 8].numpy(),
                                      reference_window(verts[0], tris, top, left, 8))
    # OpenCV's conservative fill of every triangle, one pixel in from every silhouette: a pixel there that
    # the render leaves empty is a crack along one of the ~10k shared edges, unless the exact reference
    # leaves it empty too (a true slit of the mesh, as between the lips).
    fill = np.zeros((224, 224), np.uint8)
    for triangle in np.round(verts[0, :, :2].numpy()[tris.numpy()] * 256).astype(np.int32):
        cv2.fillConvexPoly(fill, triangle, 1, lineType=cv2.LINE_8, shift=8)
    interior = cv2.erode(fill, np.ones((3, 3), np.uint8)) > 0
    assert interior.sum() > 0.9 * mask.sum()
    disputed = np.argwhere(interior & ~mask)
    assert len(disputed) < 10
    for row, col in disputed:
        assert reference_window(verts[0], tris, int(row), int(col), 1)[0, 0] == -1, (row, col)
    # Each pixel's depth is its triangle's perspective interpolation: within the triangle's corner depths.
    covered = out.mask[0, 0] > 0
    corner_depth = verts[0, :, 2][tris[out.tri_id[0, 0][covered]]]
    depth = out.depth[0, 0][covered]
    assert (depth >= corner_depth.min(1).values - 1e-5).all() and (depth <= corner_depth.max(1).values + 1e-5).all()


def test_real_face_mirrored_in_batch_renders_the_mirror_image(sfm_face_px):
    verts, tris = sfm_face_px
    verts = torch.cat([torch.round(verts[..., :2] * 256) / 256, verts[..., 2:]], -1)  # exact mirror below
    mirrored = verts.clone()
    mirrored[..., 0] = 223 - mirrored[..., 0]  # x -> 223 - x maps column j to 223 - j and flips every winding
    out = render(torch.cat([verts, mirrored]), tris, torch.ones(2, verts.shape[1], 3), 224, 224)
    assert torch.equal(out.mask[1, 0], out.mask[0, 0].flip(-1))
    torch.testing.assert_close(out.depth[1, 0], out.depth[0, 0].flip(-1))
    assert torch.equal(out.tri_id[0], render(verts, tris, torch.ones_like(verts), 224, 224).tri_id[0])


def posed_faces(verts_px: torch.Tensor, yaws_deg: list[float], seed: int) -> torch.Tensor:
    """The conventions' 224 px camera's face (1, V, 3) turned by each yaw about its centre, shifted by random
    sub-pixel amounts -> (len(yaws_deg), V, 3): self-occlusion, and corners off the 1/256 px lattice."""
    x_cam = (verts_px[0, :, 0] - 111.5) * verts_px[0, :, 2] / 1015.0
    y_cam = (verts_px[0, :, 1] - 111.5) * verts_px[0, :, 2] / 1015.0
    z_cam = verts_px[0, :, 2] - 10.0
    shifts = torch.rand(len(yaws_deg), 2, generator=torch.Generator().manual_seed(seed)) * 6 - 3
    posed = []
    for yaw, shift in zip(torch.tensor(yaws_deg).deg2rad(), shifts):
        x_turned, depth = x_cam * yaw.cos() + z_cam * yaw.sin(), 10.0 - x_cam * yaw.sin() + z_cam * yaw.cos()
        posed.append(torch.stack([111.5 + 1015.0 * x_turned / depth + shift[0],
                                  111.5 + 1015.0 * y_cam / depth + shift[1], depth], 1))
    return torch.stack(posed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_and_torch_passes_agree_to_the_last_bit_on_posed_faces(sfm_face_px, dtype, monkeypatch):
    verts, tris = sfm_face_px
    batch = posed_faces(verts, [-60.0, -25.0, 0.0, 10.0, 45.0, 80.0], seed=4).to(dtype)
    batch[5, :, :2] = batch[5, :, :2] * 3 - 250  # a close-up, mostly off-screen
    colors = torch.rand(batch.shape[:2] + (3,), generator=torch.Generator().manual_seed(5), dtype=dtype)
    compiled = rasterize(batch, tris, 224, 224)
    compiled_render = render(batch, tris, colors, 224, 224)  # no gradient needed: compiled shading
    assert ((compiled.tri_id >= 0).sum((1, 2)) > 5000).all()
    threads = torch.get_num_threads()
    try:  # shading splits the covered pixels over threads: one thread gives the same result
        torch.set_num_threads(1)
        assert torch.equal(render(batch, tris, colors, 224, 224).image, compiled_render.image)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(raster_module, "COMPILED_ON_CPU", False)
    batched = rasterize(batch, tris, 224, 224)
    assert torch.equal(batched.tri_id, compiled.tri_id)
    assert torch.equal(batched.depth, compiled.depth) and torch.equal(batched.bary, compiled.bary)
    torch_render = render(batch, tris, colors, 224, 224)
    for name in ("image", "depth", "mask", "tri_id"):
        assert torch.equal(getattr(torch_render, name), getattr(compiled_render, name)), name
    assert compiled_render.image.is_contiguous(memory_format=torch.channels_last)


def compiled_and_torch_renders(monkeypatch, *args) -> tuple:
    """render(*args) with the compiled CPU passes, then with the torch ones."""
    compiled = render(*args)
    monkeypatch.setattr(raster_module, "COMPILED_ON_CPU", False)
    in_torch = render(*args)
    monkeypatch.setattr(raster_module, "COMPILED_ON_CPU", True)
    return compiled, in_torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_passes_give_torch_infs_instead_of_failing_the_batch(monkeypatch, dtype):
    tris = torch.tensor([[0, 1, 2]])
    good = torch.tensor([[0.2, 0.1, 2.0], [2.9, 0.3, 2.0], [0.5, 2.8, 2.0]])
    # pixel (1, 1) is covered by the snapped corners, while its float barycentric weights sum to exactly 0
    zero_total = torch.tensor([[1 + 2**-6, 1.0, 1.0], [1 + 2**-10, 1.0, 16.0], [1 + 2**-7, 1 + 2**-6, 2.0]])
    # a positive float64 depth that is 0 in float32 (the z-buffer's 1/depth planes)
    tiny_depth = torch.tensor([[0.5, 0.5, 1e-50], [2.5, 0.7, 3.0], [0.8, 2.6, 4.0]], dtype=torch.float64)
    batch = torch.stack([good, zero_total, tiny_depth.to(torch.float32)]).to(dtype)
    colors = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(8), dtype=dtype)
    compiled, in_torch = compiled_and_torch_renders(monkeypatch, batch, tris, colors, 3, 3)
    assert (compiled.tri_id[0] >= 0).sum() > 0 and not torch.isfinite(in_torch.depth[1]).all()
    for name in ("image", "depth", "tri_id"):
        torch.testing.assert_close(getattr(compiled, name), getattr(in_torch, name), rtol=0, atol=0, equal_nan=True)


def test_half_precision_and_dual_tensors_take_the_torch_shading(monkeypatch):
    verts, tris = quarter_grid_scene(10, 12, 16, 16)
    colors = torch.rand(1, len(verts), 3, generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float16, torch.bfloat16):
        compiled, in_torch = compiled_and_torch_renders(monkeypatch, verts[None], tris, colors.to(dtype), 16, 16)
        assert compiled.image.dtype == dtype and torch.equal(compiled.image, in_torch.image)
    with torch.autograd.forward_ad.dual_level():  # the torch shading has no forward-mode derivative: it says so
        dual = torch.autograd.forward_ad.make_dual(colors, torch.ones_like(colors))
        with pytest.raises(RuntimeError, match="jvp"):
            render(verts[None], tris, dual, 16, 16)


def test_compiled_shading_matches_torch_built_without_fused_multiply_adds():
    # torch's plain kernels (no AVX2/AVX512) round a + b * c twice in addcmul_; the compiled shading must follow
    script = """
import torch, sys
from pipeline.render import render
from pipeline.render.raster_cpu import torch_addcmul_is_fused
sys.path.insert(0, sys.argv[1])
from test_render import grid_mesh, quarter_grid_scene
mesh_verts, mesh_tris = grid_mesh(12, 14, 5.5, jitter_seed=6, flip_seed=7)
soup_verts, soup_tris = quarter_grid_scene(8, 60, 64, 72)
verts = torch.cat([mesh_verts, soup_verts])[None]
tris = torch.cat([mesh_tris, soup_tris + len(mesh_verts)])
colors = torch.rand(1, verts.shape[1], 3, generator=torch.Generator().manual_seed(2))
compiled = render(verts, tris, colors, 64, 72)
sys.modules["pipeline.render.rasterize"].COMPILED_ON_CPU = False
in_torch = render(verts, tris, colors, 64, 72)
print(torch_addcmul_is_fused(), torch.equal(compiled.image, in_torch.image), torch.equal(compiled.depth, in_torch.depth))
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]


def test_renders_that_need_gradients_take_the_torch_shading():
    verts, tris = quarter_grid_scene(9, 12, 16, 16)
    colors = torch.rand(1, len(verts), 3, generator=torch.Generator().manual_seed(3))
    plain = render(verts[None], tris, colors, 16, 16)
    for needs_grad in ("verts", "colors"):
        verts_in = verts[None].clone().requires_grad_(needs_grad == "verts")
        colors_in = colors.clone().requires_grad_(needs_grad == "colors")
        out = render(verts_in, tris, colors_in, 16, 16)
        assert out.image.requires_grad and torch.equal(out.image.detach(), plain.image), needs_grad
        with torch.no_grad():
            assert not render(verts_in, tris, colors_in, 16, 16).image.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    mesh_verts, mesh_tris = grid_mesh(12, 14, 5.5, jitter_seed=6, flip_seed=7)
    soup_verts, soup_tris = quarter_grid_scene(8, 60, 64, 72)
    verts = torch.cat([mesh_verts, soup_verts])
    tris = torch.cat([mesh_tris, soup_tris + len(mesh_verts)])
    batch = torch.stack([verts, verts + torch.tensor([3.3, -2.1, 0.5])])
    colors = torch.rand(2, len(verts), 3, generator=torch.Generator().manual_seed(2))
    grads = {}
    for device in ("cpu", "cuda"):
        verts_d = batch.to(device).detach().requires_grad_()
        colors_d = colors.to(device).detach().requires_grad_()
        out = render(verts_d, tris.to(device), colors_d, 64, 72)
        (out.image.square().sum() + out.depth.sum()).backward()
        grads[device] = (out.tri_id.cpu(), out.image.detach().cpu(), verts_d.grad.cpu(), colors_d.grad.cpu())
    assert torch.equal(grads["cuda"][0], grads["cpu"][0])
    for cuda_value, cpu_value in zip(grads["cuda"][1:], grads["cpu"][1:]):
        torch.testing.assert_close(cuda_value, cpu_value, atol=1e-4, rtol=1e-4)


# ---- the benchmark scenes ----

def test_synthetic_bfm_size_mesh_is_a_crack_free_face_sized_disc():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    bench = pytest.importorskip("pipeline.bench.render", reason="needs the benchmark peers eos and deodr")
    BFM_FRONT_TRIS, BFM_FRONT_VERTS = bench.BFM_FRONT_TRIS, bench.BFM_FRONT_VERTS
    verts, tris, colors = bench.synthetic_bfm_size_mesh()
    assert verts.shape == (1, BFM_FRONT_VERTS, 3) and tris.shape == (BFM_FRONT_TRIS, 3)
    corners = verts[0, :, :2][tris]
    signed_area2 = torch.linalg.det(torch.cat([corners, torch.ones(len(tris), 3, 1)], -1).double())
    assert (signed_area2 > 0).all()  # one winding, so deodr's back-face culling keeps every triangle
    mask = render(verts, tris, colors, 224, 224).mask[0, 0].numpy() > 0
    assert 20000 < mask.sum() < 28000  # ~150 x 185 px ellipse, ~0.34 px^2 per triangle like the BFM
    _, n_background_parts = scipy_ndimage.label(~mask)
    assert n_background_parts == 1  # no pixel-sized cracks among ~49k sub-pixel triangles


def test_deodr_peer_renders_the_same_sfm_face():
    bench = pytest.importorskip("pipeline.bench.render", reason="needs the benchmark peers eos and deodr")
    from deodr.differentiable_renderer import renderScene
    verts, tris, colors = bench.sfm_mean_face_scene(SFM_MODEL)
    ours = render(verts, tris, colors, 224, 224).image[0].permute(1, 2, 0).numpy()
    scene = bench._deodr_scene(verts[0].double().numpy(), tris.numpy().astype(np.uint32),
                               colors[0].double().numpy(), 224, 224, clockwise=False)
    theirs, z_buffer = np.zeros((224, 224, 3)), np.zeros((224, 224))
    renderScene(scene, 1.0, theirs, z_buffer)
    covered_ours, covered_theirs = ours.sum(-1) > 0, theirs.sum(-1) > 0
    assert covered_ours.sum() > 20000
    # Same pixel centres and the front winding: at most a pixel whose centre lies within float error of an edge.
    assert (covered_ours != covered_theirs).sum() <= 5
    both = covered_ours & covered_theirs
    # deodr interpolates linearly in screen space, we perspective-correctly: close on a face's shallow depth
    assert np.abs(ours[both] - theirs[both]).max() < 1e-3
