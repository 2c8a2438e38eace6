"""Batched differentiable triangle rasterizer in pure PyTorch (nvdiffrast-style, no antialiasing).

Two passes:
1. Visibility (no gradient): vertices are snapped to a fixed-point grid of 1/256 px and every triangle's
   edge functions are evaluated in exact integer arithmetic on the pixel centres of its bounding box; the
   nearest triangle per pixel has the smallest int64 key packing (depth, triangle id). Exact integers make
   the top-left fill rule hold exactly: a pixel centre on an edge shared by two triangles is drawn by exactly
   one of them, whatever the winding. Two implementations with identical results (tested): on a GPU, the
   batched pass here bins triangles by bounding-box size class (1, 2, 3, 4, 6, 8, ... px per axis), so each
   class is one broadcast over (triangles, rows, cols) folded in with `scatter_reduce('amin')`; on a CPU,
   raster_cpu.py walks each triangle's box in compiled code (3-5x faster there, and without the GIL).
2. Attributes (differentiable): for the covered pixels only, perspective-correct barycentrics and depth
   are recomputed from the float vertex positions, so gradients reach `verts_px` (and, through
   `interpolate`, the per-vertex attributes). Coverage itself is piecewise constant, so like nvdiffrast
   without its antialias op there are no silhouette (visibility) gradients.

Pixel (row i, column j) has its centre at x = j, y = i (docs/conventions.md). Triangles are two-sided;
triangles with a vertex at depth <= 0, a non-finite coordinate or zero area are skipped, so one bad mesh
in a batch renders empty instead of failing the batch. In the torch code here, Python loops run over size
classes, chunks and the three corners only, never over triangles, pixels or batch items; it runs on the
inputs' device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from .raster_cpu import shade_covered_cpu, visible_pixels_cpu

SUBPIXEL_BITS = 8
SUBPIXEL = 1 << SUBPIXEL_BITS
# Snapped coordinates stay below 2^29 units so that every edge-function product fits in int64 exactly;
# a vertex this far out only occurs within ~1e-4 world units of the camera plane (skipped like a near clip).
MAX_ABS_COORD_PX = float(1 << 21)
# Triangles with |float area2| below one fixed-point area unit are skipped: area < 2^-17 px^2 holds a pixel
# centre with probability < 1e-5, and their barycentrics would divide by ~0.
MIN_AREA2_PX2 = 1.0 / (SUBPIXEL * SUBPIXEL)
# Upper bound on (triangles x window pixels) the batched visibility pass evaluates at once: caps its memory
# (~40 B each). Results do not depend on it.
CANDIDATES_PER_CHUNK = 1 << 21
# CPU tensors take the compiled visibility pass; tests set this False to run the batched one (what GPUs run).
COMPILED_ON_CPU = True
_COMPILED_DTYPES = (torch.float32, torch.float64)

_INT64_MAX = torch.iinfo(torch.int64).max
_FLOAT32_INF_BITS = 0x7F800000


class Fragments(NamedTuple):
    """Per-pixel rasterization result. Background pixels: tri_id -1, bary 0, depth 0."""
    tri_id: torch.Tensor  # (B, H, W) int64 index into tris, -1 = background
    bary: torch.Tensor    # (B, H, W, 3) perspective-correct barycentrics, same dtype as verts_px
    depth: torch.Tensor   # (B, H, W) camera depth (units of verts_px[..., 2])


class Rendered(NamedTuple):
    """Render for the losses, shaped (B, C, H, W). Background is 0 everywhere (tri_id -1). The image is
    channels_last in memory, as photos decoded from (H, W, 3) arrays are: elementwise losses against a photo then
    run over matching strides (mixed layouts cost ~25 % more), and the R-Net runs ~25 % faster on that layout."""
    image: torch.Tensor   # (B, C, H, W) interpolated vertex colours, channels_last in memory like decoded photos
    mask: torch.Tensor    # (B, 1, H, W) float coverage in {0, 1}
    depth: torch.Tensor   # (B, 1, H, W) camera depth (units of verts_px[..., 2])
    tri_id: torch.Tensor  # (B, 1, H, W) int64 index into tris


class _Visible(NamedTuple):
    """The z-buffer's result: every pixel's nearest triangle, and the N covered pixels packed in flat order."""
    tri_id_map: torch.Tensor  # (B * H * W,) int64 index into tris, -1 = background
    pixel: torch.Tensor       # (N,) int64 flat index into (B, H, W)
    tri_id: torch.Tensor      # (N,) int64 index into tris
    vert_rows: torch.Tensor   # (3, N) int64 rows of the (B * V, ...) flattened per-vertex tensors, corner-major
    pixel_xy: torch.Tensor    # (2, N) pixel centres x = column, y = row, in verts_px's dtype


class _Binned(NamedTuple):
    """The T (batch item, triangle) pairs whose clipped bounding box holds a pixel centre, sorted by size
    class (see _class_sizes); each class is a contiguous run."""
    class_ids: list[int]         # distinct size classes in order
    class_counts: list[int]      # triangles per class
    first_int32: int             # rows from here on are int32-exact (see _bin_triangles), earlier ones need int64
    tri_id: torch.Tensor         # (T,) int64 index into tris
    vert_offset: torch.Tensor    # (T,) int64 batch item * V: row offset into (B * V) flattened vertices
    origin_col: torch.Tensor     # (T,) int64 the window's top-left pixel
    origin_row: torch.Tensor     # (T,) int64
    window_pixel: torch.Tensor   # (T,) int64 flat (B, H, W) index of that pixel


def _check_mesh(verts_px: torch.Tensor, tris: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Validate the public inputs; returns tris as int64 on verts_px's device."""
    if not isinstance(verts_px, torch.Tensor) or verts_px.ndim != 3 or verts_px.shape[2] != 3:
        raise ValueError(f"verts_px: expected a (B, V, 3) tensor, got {getattr(verts_px, 'shape', type(verts_px))}")
    if not verts_px.is_floating_point():
        raise ValueError(f"verts_px: expected a floating dtype, got {verts_px.dtype}")
    if not isinstance(tris, torch.Tensor) or tris.ndim != 2 or tris.shape[1] != 3:
        raise ValueError(f"tris: expected an (F, 3) tensor, got {getattr(tris, 'shape', type(tris))}")
    if tris.is_floating_point() or tris.is_complex() or tris.dtype == torch.bool:
        raise ValueError(f"tris: expected an integer dtype, got {tris.dtype}")
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"height, width: expected positive ints, got {height!r}, {width!r}")
    if height * width >= 1 << 31:
        raise ValueError(f"image of {height} x {width} pixels is too large")
    tris = tris.to(device=verts_px.device, dtype=torch.int64)
    n_verts = verts_px.shape[1]
    if tris.numel() and (int(tris.min()) < 0 or int(tris.max()) >= n_verts):
        raise ValueError(f"tris: vertex indices must lie in [0, {n_verts}), got [{int(tris.min())}, {int(tris.max())}]")
    if tris.shape[0] >= 1 << 31:
        raise ValueError(f"tris: at most 2^31 - 1 triangles, got {tris.shape[0]}")
    return tris


def _window_sizes(limit: int) -> list[int]:
    """Window sizes for bounding boxes of 1..limit pixels: 1, 2, 3, 4, 6, 8, 12, ... capped at limit, so a box
    is padded by < 50% per axis and every window fits inside the image."""
    sizes = [1, 2, 3]
    while sizes[-1] < limit:
        sizes.append(2 * sizes[-2])
    return [size for size in sizes if size < limit] + [limit]


def _class_sizes(size_class: int, height: int, width: int) -> tuple[int, int]:
    """Unpack a size class id (see _bin_triangles) -> (window width px, window height px)."""
    sizes_w, sizes_h = _window_sizes(width), _window_sizes(height)
    rest, class_h = divmod(size_class, len(sizes_h))
    return sizes_w[rest % len(sizes_w)], sizes_h[class_h]


def _window_classes(lo: torch.Tensor, hi: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lo, hi: (T,) int64 first/last covered pixel index along one axis (clipped to [0, limit)) ->
    (class index, window size, window origin), each (T,) int64; the window [origin, origin + size) holds
    [lo, hi] and lies inside [0, limit)."""
    sizes = torch.tensor(_window_sizes(limit), dtype=torch.int64, device=lo.device)
    size_class = torch.searchsorted(sizes, hi - lo + 1)
    size = sizes.index_select(0, size_class)
    return size_class, size, torch.minimum(lo, limit - size)


def _corner_cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: (3, ...) per-corner values -> (3, ...) with row k = a[k+1] * b[k+2] - a[k+2] * b[k+1] (mod 3).
    For corner coordinates relative to a point p, row k is twice the signed area of (p, corner k+1,
    corner k+2); the rows sum to twice the triangle's signed area."""
    out = torch.empty_like(a)
    for k in range(3):
        after, opposite = (k + 1) % 3, (k + 2) % 3
        torch.mul(a[after], b[opposite], out=out[k]).addcmul_(a[opposite], b[after], value=-1)
    return out


def _corner_diff(values: torch.Tensor) -> torch.Tensor:
    """values: (3, ...) per corner -> (3, ...) with row k = values[k+1] - values[k+2] (mod 3)."""
    out = torch.empty_like(values)
    for k in range(3):
        torch.sub(values[(k + 1) % 3], values[(k + 2) % 3], out=out[k])
    return out


def _relative_fixed(coord_px: torch.Tensor, origin_px: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """coord_px: (3, T) float px; origin_px: (T,) int64 -> snapped coordinate minus origin in 1/256 px,
    exact, as dtype. int32 is only asked for triangles whose corners lie within 2^21 units of their window
    (see _bin_triangles), where float32 still holds every integer; int64 converts before subtracting so that
    far-off corners stay exact too."""
    snapped = (coord_px * SUBPIXEL).round_()
    if dtype == torch.int32:
        return snapped.sub_(origin_px * SUBPIXEL).to(torch.int32)
    return snapped.long().sub_(origin_px * SUBPIXEL)


def _edge_equations(x_rel: torch.Tensor, y_rel: torch.Tensor, area_ok: torch.Tensor, depth: torch.Tensor):
    """Integer edge equations relative to each triangle's window origin.

    x_rel, y_rel: (3, T) snapped corners in 1/256 px minus the window origin, int32 or int64 (exact);
    area_ok: (T,) bool, False for float slivers; depth: (3, T) float32 corner depths.
    Returns edge_origin, edge_step_x, edge_step_y: (3, T) in the input dtype (inside <=> all three >= 0,
    steps per pixel), and inv_depth: (3, T) float32 1/depth at the origin and its steps per pixel."""
    cross = _corner_cross(x_rel, y_rel)  # E_k at the window origin (0, 0), before orienting
    area2 = cross.sum(0)
    # Orienting every triangle so that inside is positive makes the rasterizer two-sided. Sign 0 (zero
    # area, or a float sliver) leaves all-zero edges whose fill-rule bias of -1 never passes.
    sign = area2.sign().mul_(area_ok)
    edge_exact = cross.mul_(sign)
    step_x = _corner_diff(y_rel).mul_(sign)  # dE/dx in 1/256 px of the edge opposite corner k
    step_y = _corner_diff(x_rel).mul_(-sign)
    # Top-left rule: an edge owns the pixel centres on it if the inside lies to its right (a left edge) or,
    # for a horizontal edge, below it (a top edge). Same as nudging every pixel centre by (+eps, +eps^2).
    owns_edge = (step_x > 0) | ((step_x == 0) & (step_y > 0))
    edge_origin = (edge_exact - 1).add_(owns_edge)
    step_x, step_y = step_x.mul_(SUBPIXEL), step_y.mul_(SUBPIXEL)
    # 1/depth is affine in screen space: sum_k lambda_k / z_k with lambda_k = edge_k / |area2|.
    weight = (area2.abs().clamp_min(1).float() * depth).reciprocal_()
    inv_depth = torch.stack([(edge_exact * weight).sum(0), (step_x * weight).sum(0), (step_y * weight).sum(0)])
    return edge_origin, step_x, step_y, inv_depth


def _bin_triangles(verts: torch.Tensor, tris: torch.Tensor, height: int, width: int) -> _Binned:
    """Cull and bin every (batch item, triangle) pair by the size of its clipped bounding box.

    verts: (B, V, 3) float32/64 x_px, y_px, depth (detached); tris: (F, 3) int64. Keeps triangles whose three
    depths are finite and > 0, whose coordinates are within MAX_ABS_COORD_PX and whose clipped bounding box
    holds a pixel centre; zero-area ones are kept but can never pass the edge test."""
    batch, n_verts = verts.shape[:2]
    n_tris = tris.shape[0]
    # Snapped coordinates in 1/256 px, still as floats (exact: power-of-two scale, then round).
    x_sub = (verts[..., 0] * SUBPIXEL).round_()  # (B, V)
    y_sub = (verts[..., 1] * SUBPIXEL).round_()
    depth = verts[..., 2]
    limit = MAX_ABS_COORD_PX * SUBPIXEL
    # A NaN x poisons its triangles' bounding boxes, and NaN fails every comparison: that culls them.
    x_sub.masked_fill_(~((x_sub.abs() < limit) & (y_sub.abs() < limit) & (depth > 0) & (depth < float("inf"))),
                       float("nan"))
    corner_ids = tris.reshape(-1)
    x_lo, x_hi = torch.aminmax(x_sub.index_select(1, corner_ids).view(batch, n_tris, 3), dim=-1)
    y_lo, y_hi = torch.aminmax(y_sub.index_select(1, corner_ids).view(batch, n_tris, 3), dim=-1)
    col_lo = (x_lo / SUBPIXEL).ceil_().clamp_min_(0)
    col_hi = (x_hi / SUBPIXEL).floor_().clamp_max_(width - 1)
    row_lo = (y_lo / SUBPIXEL).ceil_().clamp_min_(0)
    row_hi = (y_hi / SUBPIXEL).floor_().clamp_max_(height - 1)
    flat = ((col_lo <= col_hi) & (row_lo <= row_hi)).view(-1).nonzero().squeeze(1)  # index into (B * F)

    def kept(values: torch.Tensor) -> torch.Tensor:
        return values.view(-1).index_select(0, flat)

    class_w, win_w, origin_col = _window_classes(kept(col_lo).long(), kept(col_hi).long(), width)
    class_h, win_h, origin_row = _window_classes(kept(row_lo).long(), kept(row_hi).long(), height)
    # Corners lie within reach = extent + window of the window origin, so every product and partial sum of
    # the edge equations is at most 2 * reach_x * reach_y: below 2^30 (float32 error included) int32 is exact.
    reach_x = kept(x_hi.sub_(x_lo)) + win_w * SUBPIXEL
    reach_y = kept(y_hi.sub_(y_lo)) + win_h * SUBPIXEL
    n_classes_w, n_classes_h = len(_window_sizes(width)), len(_window_sizes(height))
    size_class = ((reach_x * reach_y < float(1 << 29)) * n_classes_w + class_w) * n_classes_h + class_h
    size_class, order = torch.sort(size_class.int())
    flat, origin_col, origin_row = (v.index_select(0, order) for v in (flat, origin_col, origin_row))
    class_ids, class_counts = (v.tolist() for v in torch.unique_consecutive(size_class, return_counts=True))
    first_int32 = sum(count for class_id, count in zip(class_ids, class_counts) if class_id < n_classes_w * n_classes_h)
    batch_index = flat // n_tris
    window_pixel = (batch_index * height + origin_row) * width + origin_col
    return _Binned(class_ids, class_counts, first_int32, flat - batch_index * n_tris, batch_index * n_verts,
                   origin_col, origin_row, window_pixel)


class _EdgeBlock(NamedTuple):
    """Edge equations of binned triangles [start, start + n) (see _edge_equations for the units)."""
    start: int
    edge_origin: torch.Tensor  # (3, n) int32 or int64, inside <=> all three >= 0
    edge_step_x: torch.Tensor  # (3, n) per pixel
    edge_step_y: torch.Tensor  # (3, n)
    inv_depth: torch.Tensor    # (3, n) float32: 1/depth at the window origin, its x and y steps per pixel


def _corner_rows(tris_by_corner: torch.Tensor, tri_id: torch.Tensor, vert_offset: torch.Tensor) -> torch.Tensor:
    """tris_by_corner: (3, F) int64; tri_id: (N,) int64; vert_offset: (N,) int64 batch item * V -> (3, N) int64
    rows of each triangle's corners in the (B * V) flattened vertices. One 1-D gather per corner: on CPU,
    index_select along dim 1 of the (3, F) table is ~8x slower."""
    rows = tri_id.new_empty(3, tri_id.shape[0])
    for corner in range(3):
        torch.index_select(tris_by_corner[corner], 0, tri_id, out=rows[corner])
    return rows.add_(vert_offset)


def _edge_block(coords: torch.Tensor, tris_by_corner: torch.Tensor, binned: _Binned, start: int, stop: int,
                dtype: torch.dtype) -> _EdgeBlock:
    """Set up binned triangles [start, stop). coords: (3, B * V) x_px, y_px, depth rows of the flattened
    vertices; tris_by_corner: (3, F) int64; dtype: int32 when the rows are int32-exact (see _bin_triangles)."""
    rows = _corner_rows(tris_by_corner, binned.tri_id[start:stop], binned.vert_offset[start:stop]).view(-1)
    x, y, z = (axis.index_select(0, rows).view(3, -1) for axis in coords)  # (3, n) per corner
    area_ok = _corner_cross(x, y).sum(0).abs_() >= MIN_AREA2_PX2
    return _EdgeBlock(start, *_edge_equations(_relative_fixed(x, binned.origin_col[start:stop], dtype),
                                              _relative_fixed(y, binned.origin_row[start:stop], dtype),
                                              area_ok, z.float()))


class _Window(NamedTuple):
    """Pixel offsets of one window size, made once per size class: rows (h, 1, 1) and cols (1, w, 1) as the edge
    dtype, as float32 and (rows only times the image width) as int64. Triangles are the last (contiguous) axis
    of every (h, w, n) candidate tensor: a window is only 1-16 px wide, and broadcasting over such a short
    inner axis runs several times slower than over the n triangles."""
    rows: torch.Tensor
    cols: torch.Tensor
    rows_float: torch.Tensor
    cols_float: torch.Tensor
    row_offsets: torch.Tensor
    col_offsets: torch.Tensor


def _window(win_w: int, win_h: int, width: int, dtype: torch.dtype, device: torch.device) -> _Window:
    rows = torch.arange(win_h, device=device, dtype=torch.int64)[:, None, None]
    cols = torch.arange(win_w, device=device, dtype=torch.int64)[None, :, None]
    return _Window(rows.to(dtype), cols.to(dtype), rows.float(), cols.float(), rows * width, cols)


def _rasterize_chunk(block: _EdgeBlock, binned: _Binned, start: int, stop: int, window: _Window, tri_bits: int,
                     zbuf: torch.Tensor) -> None:
    """Test the win_h x win_w window of pixel centres of binned triangles [start, stop) (one size class, inside
    `block`) and fold the inside ones into zbuf: (B * H * W,) int64 packed (depth, triangle id) keys, in place."""
    first, last = start - block.start, stop - block.start
    origin, step_x, step_y = (v[:, None, None, first:last] for v in (block.edge_origin, block.edge_step_x,
                                                                      block.edge_step_y))  # (3, 1, 1, n)
    edge = (step_y * window.rows).add_(origin) + step_x * window.cols  # (3, win_h, win_w, n)
    # The sign bit of the OR of the three edge values is set iff any of them is negative.
    outside = torch.bitwise_or(edge[0], edge[1]).bitwise_or_(edge[2])  # (win_h, win_w, n)
    plane = block.inv_depth[:, None, None, first:last]
    inv_depth = (plane[2] * window.rows_float).add_(plane[0]) + plane[1] * window.cols_float
    # A positive float32's bit pattern orders like its value: nearer (larger 1/depth) -> smaller key.
    bits = inv_depth.clamp_min_(torch.finfo(torch.float32).tiny).view(torch.int32)
    keys = bits.neg_().add_(_FLOAT32_INF_BITS).long().bitwise_left_shift_(tri_bits)
    keys.bitwise_or_(binned.tri_id[start:stop]).masked_fill_(outside < 0, _INT64_MAX)
    pixel = (binned.window_pixel[start:stop] + window.row_offsets) + window.col_offsets
    zbuf.scatter_reduce_(0, pixel.view(-1), keys.view(-1), "amin")


@torch.no_grad()
def _nearest_triangles_batched(verts_px: torch.Tensor, tris: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Z-buffer pass in batched torch ops. verts_px: (B, V, 3), tris: (F, 3) int64 -> (B * H * W,) int64 triangle
    id, -1 = background."""
    batch, n_tris = verts_px.shape[0], tris.shape[0]
    zbuf = torch.full((batch * height * width,), _INT64_MAX, dtype=torch.int64, device=verts_px.device)
    if n_tris == 0 or batch == 0:
        return zbuf.fill_(-1)
    tri_bits = max(1, (n_tris - 1).bit_length())
    verts = verts_px.detach().to(torch.promote_types(verts_px.dtype, torch.float32))
    binned = _bin_triangles(verts, tris, height, width)
    coords, tris_by_corner = verts.reshape(-1, 3).T.contiguous(), tris.T.contiguous()
    class_runs, start = [], 0  # (start, stop, win_w, win_h) of each size class
    for size_class, count in zip(binned.class_ids, binned.class_counts):
        class_runs.append((start, start + count, *_class_sizes(size_class, height, width)))
        start += count
    windows: dict[tuple[int, int, torch.dtype], _Window] = {}
    # the int64 rows [0, first_int32) and the int32 rows after them are set up separately
    for block_start, block_stop, dtype in ((0, binned.first_int32, torch.int64),
                                           (binned.first_int32, start, torch.int32)):
        if block_start == block_stop:
            continue
        block = _edge_block(coords, tris_by_corner, binned, block_start, block_stop, dtype)
        for run_start, run_stop, win_w, win_h in class_runs:
            first, last = max(run_start, block_start), min(run_stop, block_stop)
            if first >= last:
                continue
            window = windows.get((win_w, win_h, dtype))
            if window is None:
                window = windows[win_w, win_h, dtype] = _window(win_w, win_h, width, dtype, zbuf.device)
            per_chunk = max(1, CANDIDATES_PER_CHUNK // (win_w * win_h))
            for chunk_start in range(first, last, per_chunk):
                _rasterize_chunk(block, binned, chunk_start, min(chunk_start + per_chunk, last), window, tri_bits,
                                 zbuf)
    background = zbuf == _INT64_MAX
    return zbuf.bitwise_and_((1 << tri_bits) - 1).masked_fill_(background, -1)


def _pack_visible(tri_id_map: torch.Tensor, tris: torch.Tensor, n_verts: int, height: int, width: int,
                  dtype: torch.dtype) -> _Visible:
    """tri_id_map: (B * H * W,) int64 (-1 = background); tris: (F, 3) int64 -> _Visible, pixel_xy as dtype."""
    pixel = (tri_id_map >= 0).nonzero().squeeze(1)
    tri_id = tri_id_map.index_select(0, pixel)
    image_index = pixel // (height * width)
    in_image = pixel - image_index * (height * width)
    row = in_image // width
    pixel_xy = torch.stack([in_image - row * width, row]).to(dtype)
    return _Visible(tri_id_map, pixel, tri_id, _corner_rows(tris.T.contiguous(), tri_id, image_index * n_verts),
                    pixel_xy)


def _visible_pixels(verts_px: torch.Tensor, tris: torch.Tensor, height: int, width: int) -> _Visible:
    """Z-buffer pass. verts_px: (B, V, 3); tris: (F, 3) int64 -> _Visible (no gradient)."""
    if COMPILED_ON_CPU and verts_px.device.type == "cpu":
        return _Visible(*visible_pixels_cpu(verts_px, tris, height, width, _window_sizes(width),
                                            _window_sizes(height), SUBPIXEL, MAX_ABS_COORD_PX, MIN_AREA2_PX2))
    return _pack_visible(_nearest_triangles_batched(verts_px, tris, height, width), tris, verts_px.shape[1],
                         height, width, verts_px.dtype)


class _PerspectiveBarycentrics(torch.autograd.Function):
    """verts: (B * V, 3) flattened verts_px; vert_rows: (3, N) int64 rows of each pixel's triangle corners
    (corner-major); pixel_xy: (2, N) pixel centres -> bary (3, N) perspective-correct barycentrics, depth (N,).
    One graph node with a hand-written backward: on CPU the ~20 autograd nodes of the plain formula cost
    more than the arithmetic. Corner-major (3, N) rows keep every step a contiguous elementwise op."""

    @staticmethod
    def forward(ctx, verts: torch.Tensor, vert_rows: torch.Tensor, pixel_xy: torch.Tensor):
        rows = vert_rows.reshape(-1)
        coords = verts.T.contiguous()  # (3, B * V): x, y, depth rows, so each gather is 1-D
        rel_x = coords[0].index_select(0, rows).view(3, -1).sub_(pixel_xy[0])
        rel_y = coords[1].index_select(0, rows).view(3, -1).sub_(pixel_xy[1])
        inv_depth = coords[2].index_select(0, rows).view(3, -1).reciprocal_()
        edge = _corner_cross(rel_x, rel_y)  # lambda_k * area2
        area2 = edge.sum(0)
        weighted = edge.mul_(inv_depth)
        total = weighted.sum(0)
        bary = weighted.div_(total)
        depth = area2.div_(total)  # area2 / sum(edge_k / z_k) = 1 / sum(lambda_k / z_k)
        ctx.save_for_backward(vert_rows, rel_x, rel_y, inv_depth, bary, depth, total)
        ctx.n_rows = verts.shape[0]
        return bary, depth

    @staticmethod
    def backward(ctx, grad_bary: torch.Tensor | None, grad_depth: torch.Tensor | None):
        vert_rows, rel_x, rel_y, inv_depth, bary, depth, total = ctx.saved_tensors
        grad_bary = torch.zeros_like(bary) if grad_bary is None else grad_bary
        grad_depth = torch.zeros_like(depth) if grad_depth is None else grad_depth
        # bary_k = w_k / sum(w), depth = area2 / sum(w) with w_k = edge_k / z_k and area2 = sum(edge).
        grad_total = ((grad_bary * bary).sum(0) + grad_depth * depth).div_(total)
        grad_weighted = (grad_bary / total).sub_(grad_total)
        grad_edge = (grad_weighted * inv_depth).add_(grad_depth / total)
        grad_z = grad_weighted.mul_(bary).mul_(total).mul_(inv_depth).neg_()  # d(edge / z)/dz = -(edge / z) / z
        # edge_k = x_{k+1} y_{k+2} - x_{k+2} y_{k+1}, so d/dx_m and d/dy_m collect the two edges touching m.
        grad_x = _corner_cross(grad_edge, rel_y).neg_()
        grad_y = _corner_cross(grad_edge, rel_x)
        rows = vert_rows.reshape(-1)
        grad_coords = grad_x.new_zeros(3, ctx.n_rows)
        for axis, grad in enumerate((grad_x, grad_y, grad_z)):
            grad_coords[axis].index_add_(0, rows, grad.reshape(-1))
        return grad_coords.T, None, None


class _InterpolateRows(torch.autograd.Function):
    """attr: (R, C) flattened per-vertex attributes; vert_rows: (3, N) int64 rows; bary: (3, N) ->
    values (C, N), channel-major."""

    @staticmethod
    def forward(ctx, attr: torch.Tensor, vert_rows: torch.Tensor, bary: torch.Tensor):
        rows = vert_rows.reshape(-1)
        channels = attr.T.contiguous()  # (C, R)
        corner_values = attr.new_empty(channels.shape[0], *vert_rows.shape)  # (C, 3, N)
        for channel, values in zip(channels, corner_values):
            torch.index_select(channel, 0, rows, out=values.view(-1))
        values = corner_values[:, 0] * bary[0]
        values.addcmul_(corner_values[:, 1], bary[1]).addcmul_(corner_values[:, 2], bary[2])
        ctx.save_for_backward(vert_rows, bary, corner_values)
        ctx.n_rows = attr.shape[0]
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        vert_rows, bary, corner_values = ctx.saved_tensors
        grad_attr = grad_bary = None
        if ctx.needs_input_grad[0]:
            rows = vert_rows.reshape(-1)
            grad_attr = grad_values.new_zeros(grad_values.shape[0], ctx.n_rows)
            for channel, grad in enumerate(grad_values):
                grad_attr[channel].index_add_(0, rows, (bary * grad).reshape(-1))
            grad_attr = grad_attr.T
        if ctx.needs_input_grad[2]:
            grad_bary = corner_values[0] * grad_values[0]
            for channel in range(1, grad_values.shape[0]):
                grad_bary.addcmul_(corner_values[channel], grad_values[channel])
        return grad_attr, None, grad_bary


def _covered_barycentrics(verts_px: torch.Tensor, visible: _Visible) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable pass over the covered pixels: verts_px (B, V, 3) -> bary (3, N), depth (N,)."""
    return _PerspectiveBarycentrics.apply(verts_px.reshape(-1, 3), visible.vert_rows, visible.pixel_xy)


def _interpolate_rows(attr: torch.Tensor, vert_rows: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """attr: (B, V, C); vert_rows: (3, N) rows of attr flattened to (B * V, C); bary: (3, N) -> (C, N)."""
    return _InterpolateRows.apply(attr.reshape(-1, attr.shape[2]), vert_rows, bary.to(attr.dtype))


def _scatter_pixels(values: torch.Tensor, pixel: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """values: (C, N) at flat pixels (N,) -> (n_pixels, C), zero elsewhere; differentiable w.r.t. values.
    One index_copy_ per channel: ~20 % faster than one over (N, C) rows read from the channel-major values."""
    out = values.new_zeros(n_pixels, values.shape[0])
    for channel, channel_values in enumerate(values):
        out[:, channel].index_copy_(0, pixel, channel_values)
    return out


def rasterize(verts_px: torch.Tensor, tris: torch.Tensor, height: int, width: int) -> Fragments:
    """Rasterize a batch of meshes sharing one triangle list.

    verts_px: (B, V, 3) float, x_px, y_px (pixel centre of row i / col j at x = j, y = i) and positive
        camera depth; tris: (F, 3) integer vertex indices.
    Returns Fragments with tri_id (B, H, W) int64 (-1 background), bary (B, H, W, 3) and depth (B, H, W)
    in verts_px's dtype; bary and depth are differentiable w.r.t. verts_px (not w.r.t. coverage).
    """
    tris = _check_mesh(verts_px, tris, height, width)
    batch = verts_px.shape[0]
    visible = _visible_pixels(verts_px, tris, height, width)
    covered_bary, covered_depth = _covered_barycentrics(verts_px, visible)
    n_pixels = batch * height * width
    bary = _scatter_pixels(covered_bary, visible.pixel, n_pixels)
    depth = _scatter_pixels(covered_depth[None], visible.pixel, n_pixels)
    return Fragments(visible.tri_id_map.view(batch, height, width), bary.view(batch, height, width, 3),
                     depth.view(batch, height, width))


def interpolate(attr: torch.Tensor, frags: Fragments, tris: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes with the fragments' perspective-correct barycentrics.

    attr: (B, V, C) float (colours, normals, ...); frags: from rasterize on the same (B, V) mesh; tris: (F, 3).
    Returns (B, H, W, C), 0 on background; differentiable w.r.t. attr and, through frags.bary, verts_px.
    """
    batch, height, width = frags.tri_id.shape
    if not isinstance(attr, torch.Tensor) or attr.ndim != 3 or attr.shape[0] != batch:
        raise ValueError(f"attr: expected (B={batch}, V, C), got {getattr(attr, 'shape', type(attr))}")
    if frags.bary.shape != (batch, height, width, 3):
        raise ValueError(f"frags.bary: expected {(batch, height, width, 3)}, got {tuple(frags.bary.shape)}")
    if not isinstance(tris, torch.Tensor) or tris.ndim != 2 or tris.shape[1] != 3 or tris.is_floating_point():
        raise ValueError(f"tris: expected the rasterized (F, 3) integer tensor, got {getattr(tris, 'shape', tris)}")
    tris = tris.to(device=attr.device, dtype=torch.int64)
    visible = _pack_visible(frags.tri_id.reshape(-1), tris, attr.shape[1], height, width, attr.dtype)
    bary = frags.bary.reshape(-1, 3).index_select(0, visible.pixel).T
    values = _interpolate_rows(attr, visible.vert_rows, bary)
    return _scatter_pixels(values, visible.pixel, batch * height * width).view(batch, height, width, -1)


def _compiled_shading(verts_px: torch.Tensor, colors: torch.Tensor) -> bool:
    """Whether render() shades in compiled code: CPU float32/float64 inputs that need no gradient, neither
    backward (requires_grad under grad mode) nor forward-mode (dual tensors)."""
    needs_grad = torch.is_grad_enabled() and (verts_px.requires_grad or colors.requires_grad)
    dual = any(forward_ad.unpack_dual(x).tangent is not None for x in (verts_px, colors))
    return (COMPILED_ON_CPU and verts_px.device.type == "cpu" and not needs_grad and not dual
            and verts_px.dtype in _COMPILED_DTYPES and colors.dtype in _COMPILED_DTYPES)


def render(verts_px: torch.Tensor, tris: torch.Tensor, colors: torch.Tensor, height: int, width: int) -> Rendered:
    """Rasterize and shade with per-vertex colours (no lighting here; colours arrive shaded).

    verts_px: (B, V, 3) x_px, y_px, positive depth; tris: (F, 3) integer; colors: (B, V, C) float (C = 3 for RGB).
    Returns Rendered: image (B, C, H, W) channels_last in memory, mask (B, 1, H, W) float, depth (B, 1, H, W),
    tri_id (B, 1, H, W) int64; background 0 (tri_id -1). image is differentiable w.r.t. colors and verts_px,
    depth w.r.t. verts_px.
    """
    tris = _check_mesh(verts_px, tris, height, width)
    batch = verts_px.shape[0]
    if not isinstance(colors, torch.Tensor) or colors.ndim != 3 or colors.shape[:2] != verts_px.shape[:2]:
        raise ValueError(f"colors: expected (B, V, C) = {tuple(verts_px.shape[:2])} + (C,), "
                         f"got {getattr(colors, 'shape', type(colors))}")
    if not colors.is_floating_point() or colors.device != verts_px.device:
        raise ValueError(f"colors: expected floats on {verts_px.device}, got {colors.dtype} on {colors.device}")
    visible = _visible_pixels(verts_px, tris, height, width)
    n_pixels = batch * height * width
    if _compiled_shading(verts_px, colors):
        image, depth = shade_covered_cpu(verts_px, colors, visible.vert_rows, visible.pixel_xy, visible.pixel, n_pixels)
    else:
        covered_bary, covered_depth = _covered_barycentrics(verts_px, visible)
        values = _interpolate_rows(colors, visible.vert_rows, covered_bary)
        image = _scatter_pixels(values, visible.pixel, n_pixels)
        depth = _scatter_pixels(covered_depth[None], visible.pixel, n_pixels)
    image = image.view(batch, height, width, -1).permute(0, 3, 1, 2)
    depth = depth.view(batch, 1, height, width)
    tri_id = visible.tri_id_map.view(batch, 1, height, width)
    return Rendered(image, (tri_id >= 0).to(colors.dtype), depth, tri_id)
