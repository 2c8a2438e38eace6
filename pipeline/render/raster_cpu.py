"""rasterize.py's passes compiled for the CPU (numba): visibility (the z-buffer, one triangle at a time, then the
covered pixels packed) and, for renders that need no gradient, shading (barycentrics, colours, depth).

Same arithmetic as the batched torch pass (`rasterize._nearest_triangles_batched`, which GPUs run): corners
snapped to 1/256 px, exact int64 edge functions with the top-left fill rule, 1/depth planes set up in float32
relative to the same size-class window and evaluated in the same order, and the same packed (depth, triangle
id) keys. So both passes return identical triangle ids, which the tests check. On a CPU the batched pass
spends most of its time building (triangles x window) candidate tensors and scattering them; here each
triangle walks its own bounding box (3-5x faster), and the kernels release the GIL, so threads rasterize batch
items in parallel, and beside other Python threads. numba caches the compiled kernels in __pycache__.

Shading repeats `rasterize._PerspectiveBarycentrics.forward` and `_InterpolateRows.forward` pixel by pixel with
the same operations in the same order, rounding its multiply-adds once or twice as torch's addcmul_ does in this
build (torch_addcmul_is_fused), so it gives the same values as the torch ops (tested on face renders, also with
torch's plain kernels); the torch ops stay for renders that need gradients.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from numba.extending import intrinsic

_INT64_MAX = np.iinfo(np.int64).max
_FLOAT32_INF_BITS = 0x7F800000
_FLOAT32_TINY = np.float32(np.finfo(np.float32).tiny)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
# error_model="numpy": float division by zero gives inf/NaN as in torch, instead of raising (which would fail a
# whole batch over one degenerate mesh)
_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
_jit_inline = numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")


@functools.cache
def torch_addcmul_is_fused() -> bool:
    """Whether torch's CPU addcmul_ rounds a + b * c once, as its AVX2/AVX512 kernels do with fused multiply-adds,
    or twice (its plain kernels: ATEN_CPU_CAPABILITY=default). The kernels here do the same, to give its bits."""
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(1024, generator=gen) for _ in range(3))
    return torch.equal(a.clone().addcmul_(b, c), (a.double() + b.double() * c.double()).float())


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's fma)."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, b, c), codegen


@_jit_inline
def _multiply_add(a, b, c, fused):
    """a * b + c as torch's addcmul_ computes it: rounded once if `fused` (torch_addcmul_is_fused), else twice."""
    return _fma(a, b, c) if fused else a * b + c


@_jit_inline
def _cross(a1, b2, a2, b1, fused):
    """a1 * b2 - a2 * b1 as rasterize._corner_cross computes it: the product, then addcmul_ (value -1)."""
    return _multiply_add(-a2, b1, a1 * b2, fused)


@_jit
def _window_origin(lo, hi, sizes):
    """Origin of the window of the smallest size class holding pixels [lo, hi]; the window lies inside
    [0, sizes[-1])."""
    n, k = hi - lo + 1, 0
    while sizes[k] < n:  # most triangles span 1-4 px: a scan from the smallest size beats a bisection
        k += 1
    return min(lo, sizes[-1] - sizes[k])


@_jit_inline
def _snap(coord, subpixel):
    """A float px coordinate -> 1/subpixel px units, rounded half to even, as float64. Power-of-two scaling is
    exact in float64 as in the vertices' own dtype, and so is rint, so float32 vertices snap as in torch."""
    return np.rint(np.float64(coord) * subpixel)


@_jit_inline
def _usable(x_sub, y_sub, depth, max_abs_sub):
    """A vertex is drawable: snapped coordinates in range (False for NaN) and a finite positive depth."""
    return abs(x_sub) < max_abs_sub and abs(y_sub) < max_abs_sub and 0 < depth < np.inf


@_jit_inline
def _with_fill_rule(edge, step_x, step_y):
    """Bias an exact edge value so that `>= 0` means inside: an edge owns the pixel centres on it if the inside
    lies to its right (a left edge) or, for a horizontal edge, below it (a top edge)."""
    return edge - 1 + (step_x > 0 or (step_x == 0 and step_y > 0))


@_jit
def _zbuffer_items(verts, tris, sizes_w, sizes_h, subpixel, max_abs_sub, min_area2, tri_bits, zbuf, fused, first,
                   stop):
    """Fold the triangles of batch items [first, stop) into zbuf.

    verts: (B, V, 3) float32/float64 x_px, y_px, depth; tris: (F, 3) int64; sizes_w, sizes_h: (K,) int64 window
    sizes per axis (rasterize._window_sizes, the last one is the image size); subpixel: fixed-point units per
    px; max_abs_sub: snapped coordinates must lie below it; min_area2: float area2 below which a triangle is a
    sliver (px^2); zbuf: (B, H, W) int64 packed keys, int64 max = empty, updated in place; fused:
    torch_addcmul_is_fused() (the sliver test's cross products). Corners are unrolled into scalars (k = 0, 1, 2):
    small arrays would live in memory, not registers."""
    height, width = zbuf.shape[1], zbuf.shape[2]
    inf_bits = np.int64(_FLOAT32_INF_BITS)
    one = np.float32(1.0)
    to_px = 1.0 / subpixel  # exact: a power of two
    as_float = np.empty(1, np.float32)
    as_bits = as_float.view(np.int32)
    for b in range(first, stop):
        for f in range(tris.shape[0]):
            v0, v1, v2 = tris[f, 0], tris[f, 1], tris[f, 2]
            x0, y0, depth0 = verts[b, v0, 0], verts[b, v0, 1], verts[b, v0, 2]
            x1, y1, depth1 = verts[b, v1, 0], verts[b, v1, 1], verts[b, v1, 2]
            x2, y2, depth2 = verts[b, v2, 0], verts[b, v2, 1], verts[b, v2, 2]
            xs0, ys0 = _snap(x0, subpixel), _snap(y0, subpixel)
            xs1, ys1 = _snap(x1, subpixel), _snap(y1, subpixel)
            xs2, ys2 = _snap(x2, subpixel), _snap(y2, subpixel)
            if not (_usable(xs0, ys0, depth0, max_abs_sub) and _usable(xs1, ys1, depth1, max_abs_sub)
                    and _usable(xs2, ys2, depth2, max_abs_sub)):
                continue
            col_lo = max(np.int64(np.ceil(min(xs0, xs1, xs2) * to_px)), 0)
            col_hi = min(np.int64(np.floor(max(xs0, xs1, xs2) * to_px)), width - 1)
            row_lo = max(np.int64(np.ceil(min(ys0, ys1, ys2) * to_px)), 0)
            row_hi = min(np.int64(np.floor(max(ys0, ys1, ys2) * to_px)), height - 1)
            if col_lo > col_hi or row_lo > row_hi:
                continue
            # the float sliver test, in the vertices' dtype, summed as the batched pass sums it
            area2_float = (_cross(x1, y2, x2, y1, fused) + _cross(x2, y0, x0, y2, fused)
                           + _cross(x0, y1, x1, y0, fused))
            origin_col = _window_origin(col_lo, col_hi, sizes_w)
            origin_row = _window_origin(row_lo, row_hi, sizes_h)
            fx0, fy0 = np.int64(xs0) - origin_col * subpixel, np.int64(ys0) - origin_row * subpixel
            fx1, fy1 = np.int64(xs1) - origin_col * subpixel, np.int64(ys1) - origin_row * subpixel
            fx2, fy2 = np.int64(xs2) - origin_col * subpixel, np.int64(ys2) - origin_row * subpixel
            edge0, edge1, edge2 = fx1 * fy2 - fx2 * fy1, fx2 * fy0 - fx0 * fy2, fx0 * fy1 - fx1 * fy0
            area2 = edge0 + edge1 + edge2
            if area2 == 0 or not abs(area2_float) >= min_area2:
                continue  # zero area or a float sliver: the batched pass's all-zero edges, which never pass
            sign = 1 if area2 > 0 else -1  # orienting every triangle makes the rasterizer two-sided
            edge0, edge1, edge2 = edge0 * sign, edge1 * sign, edge2 * sign
            step_x0, step_x1, step_x2 = (fy1 - fy2) * sign, (fy2 - fy0) * sign, (fy0 - fy1) * sign
            step_y0, step_y1, step_y2 = (fx2 - fx1) * sign, (fx0 - fx2) * sign, (fx1 - fx0) * sign
            # 1/depth is affine in screen space; float32 as in the batched pass, so ties break identically
            area_scale = np.float32(max(abs(area2), 1))
            w0, w1, w2 = one / (area_scale * np.float32(depth0)), one / (area_scale * np.float32(depth1)), \
                one / (area_scale * np.float32(depth2))
            plane0 = np.float32(edge0) * w0 + np.float32(edge1) * w1 + np.float32(edge2) * w2
            plane_x = (np.float32(step_x0 * subpixel) * w0 + np.float32(step_x1 * subpixel) * w1
                       + np.float32(step_x2 * subpixel) * w2)
            plane_y = (np.float32(step_y0 * subpixel) * w0 + np.float32(step_y1 * subpixel) * w1
                       + np.float32(step_y2 * subpixel) * w2)
            edge0 = _with_fill_rule(edge0, step_x0, step_y0)
            edge1 = _with_fill_rule(edge1, step_x1, step_y1)
            edge2 = _with_fill_rule(edge2, step_x2, step_y2)
            per_col0, per_col1, per_col2 = step_x0 * subpixel, step_x1 * subpixel, step_x2 * subpixel
            first_col = col_lo - origin_col
            for row in range(row_lo, row_hi + 1):
                r = row - origin_row
                # exact integers, so stepping along the row gives the same values as evaluating at each pixel
                e0 = edge0 + step_y0 * subpixel * r + per_col0 * first_col
                e1 = edge1 + step_y1 * subpixel * r + per_col1 * first_col
                e2 = edge2 + step_y2 * subpixel * r + per_col2 * first_col
                plane_row = plane_y * np.float32(r) + plane0
                zbuf_row = zbuf[b, row]
                for col in range(col_lo, col_hi + 1):
                    # branch-free: the sign bit of the OR is set iff the pixel centre is outside an edge
                    outside = (e0 | e1 | e2) < 0
                    e0, e1, e2 = e0 + per_col0, e1 + per_col1, e2 + per_col2
                    as_float[0] = max(plane_row + plane_x * np.float32(col - origin_col), _FLOAT32_TINY)
                    key = ((inf_bits - as_bits[0]) << tri_bits) | f
                    zbuf_row[col] = min(zbuf_row[col], _INT64_MAX if outside else key)


@_jit
def _keys_to_ids(zbuf, tri_bits):
    """zbuf: (B, H, W) int64 packed keys -> triangle ids in place (-1 = background); returns how many are >= 0."""
    flat = zbuf.reshape(-1)
    id_mask = (np.int64(1) << tri_bits) - 1
    n_covered = 0
    for pixel in range(flat.size):
        if flat[pixel] == _INT64_MAX:
            flat[pixel] = -1
        else:
            flat[pixel] &= id_mask
            n_covered += 1
    return n_covered


@_jit
def _pack_covered(tri_id, tris, n_verts, pixel, covered_tri, vert_rows, pixel_xy):
    """tri_id: (B, H, W) int64 (-1 = background); tris: (F, 3) int64 -> fills, for the N covered pixels in
    flat order: pixel (N,) flat index, covered_tri (N,), vert_rows (3, N) corner rows of the (B * V) flattened
    vertices, pixel_xy (2, N) pixel centre x = column, y = row."""
    batch, height, width = tri_id.shape
    n = 0
    for b in range(batch):
        for row in range(height):
            for col in range(width):
                face = tri_id[b, row, col]
                if face < 0:
                    continue
                pixel[n] = (b * height + row) * width + col
                covered_tri[n] = face
                for k in range(3):
                    vert_rows[k, n] = tris[face, k] + b * n_verts
                pixel_xy[0, n] = col
                pixel_xy[1, n] = row
                n += 1


def visible_pixels_cpu(verts_px: torch.Tensor, tris: torch.Tensor, height: int, width: int,
                       sizes_w: list[int], sizes_h: list[int], subpixel: int, max_abs_px: float,
                       min_area2_px2: float) -> tuple[torch.Tensor, ...]:
    """Z-buffer on the CPU. verts_px: (B, V, 3) float32/float64 x_px, y_px, depth (any grad is ignored);
    tris: (F, 3) int64 in [0, V), which the caller has checked (compiled code does not bound-check indices);
    sizes_w, sizes_h: window sizes per axis (rasterize._window_sizes); subpixel: fixed-point units per px;
    max_abs_px, min_area2_px2: the culling limits of rasterize.
    Returns tri_id (B * H * W,) int64 nearest triangle per pixel (-1 = background) and, for the N covered pixels
    in flat order, pixel (N,) int64 flat index, their triangle (N,) int64, vert_rows (3, N) int64 corner rows of
    the (B * V) flattened vertices and pixel_xy (2, N) pixel centres in verts_px's (float) dtype. Batch items
    are z-buffered on torch.get_num_threads() threads."""
    batch, n_verts, n_tris = verts_px.shape[0], verts_px.shape[1], tris.shape[0]
    zbuf = np.full((batch, height, width), _INT64_MAX, dtype=np.int64)
    tri_bits = max(1, (n_tris - 1).bit_length())
    tris_np = tris.contiguous().numpy()
    verts = verts_px.detach().to(torch.promote_types(verts_px.dtype, torch.float32)).contiguous().numpy()
    if batch and n_tris:
        args = (verts, tris_np, np.asarray(sizes_w, np.int64), np.asarray(sizes_h, np.int64),
                subpixel, max_abs_px * subpixel, min_area2_px2, tri_bits, zbuf, torch_addcmul_is_fused())
        n_threads = min(torch.get_num_threads(), batch)
        _run_split(_zbuffer_items, args, [batch * i // n_threads for i in range(n_threads + 1)])
    n_covered = _keys_to_ids(zbuf, tri_bits)
    pixel, covered_tri = np.empty(n_covered, np.int64), np.empty(n_covered, np.int64)
    vert_rows = np.empty((3, n_covered), np.int64)
    pixel_xy = np.empty((2, n_covered), verts.dtype)
    _pack_covered(zbuf, tris_np, n_verts, pixel, covered_tri, vert_rows, pixel_xy)
    return (torch.from_numpy(zbuf).view(-1), torch.from_numpy(pixel), torch.from_numpy(covered_tri),
            torch.from_numpy(vert_rows), torch.from_numpy(pixel_xy).to(verts_px.dtype))


@_jit
def _shade_pixels(verts, inv_depth, colors, vert_rows, pixel_xy, pixel, image, depth, fused, first, stop):
    """Covered pixels [first, stop): perspective-correct barycentrics from the float corners, then colours.

    verts: (B * V, 3) x_px, y_px, depth; inv_depth: (B * V,) 1 / depth; colors: (B * V, C); vert_rows: (3, N)
    int64; pixel_xy: (2, N) in verts' dtype; pixel: (N,) int64 flat pixel index; image: (B * H * W, C) colors'
    dtype and depth: (B * H * W,) verts' dtype, written at those pixels."""
    n_channels = colors.shape[1]
    for n in range(first, stop):
        row0, row1, row2 = vert_rows[0, n], vert_rows[1, n], vert_rows[2, n]
        x, y = pixel_xy[0, n], pixel_xy[1, n]
        rel_x0, rel_x1, rel_x2 = verts[row0, 0] - x, verts[row1, 0] - x, verts[row2, 0] - x
        rel_y0, rel_y1, rel_y2 = verts[row0, 1] - y, verts[row1, 1] - y, verts[row2, 1] - y
        edge0 = _cross(rel_x1, rel_y2, rel_x2, rel_y1, fused)  # lambda_k * area2
        edge1 = _cross(rel_x2, rel_y0, rel_x0, rel_y2, fused)
        edge2 = _cross(rel_x0, rel_y1, rel_x1, rel_y0, fused)
        area2 = edge0 + edge1 + edge2
        weighted0 = edge0 * inv_depth[row0]
        weighted1 = edge1 * inv_depth[row1]
        weighted2 = edge2 * inv_depth[row2]
        total = weighted0 + weighted1 + weighted2
        bary0, bary1, bary2 = weighted0 / total, weighted1 / total, weighted2 / total
        depth[pixel[n]] = area2 / total
        bary0, bary1, bary2 = colors.dtype.type(bary0), colors.dtype.type(bary1), colors.dtype.type(bary2)
        for channel in range(n_channels):
            value = _multiply_add(colors[row1, channel], bary1, colors[row0, channel] * bary0, fused)
            image[pixel[n], channel] = _multiply_add(colors[row2, channel], bary2, value, fused)  # as _InterpolateRows


def shade_covered_cpu(verts_px: torch.Tensor, colors: torch.Tensor, vert_rows: torch.Tensor, pixel_xy: torch.Tensor,
                      pixel: torch.Tensor, n_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shade the N covered pixels of a render that needs no gradient. verts_px: (B, V, 3) float; colors: (B, V, C)
    float; vert_rows, pixel_xy, pixel: as visible_pixels_cpu returns them; n_pixels = B * H * W.
    Returns image (n_pixels, C) in colors' dtype and depth (n_pixels,) in verts_px's, 0 where uncovered. The
    pixels are split over torch.get_num_threads() threads."""
    verts = verts_px.detach().reshape(-1, 3).contiguous().numpy()
    with np.errstate(divide="ignore"):  # a depth of 0 gives inf, as torch's reciprocal does, silently
        inv_depth = np.reciprocal(verts[:, 2])  # once per vertex: the same division as per pixel corner
    color_rows = colors.detach().reshape(-1, colors.shape[2]).contiguous().numpy()
    image = np.zeros((n_pixels, color_rows.shape[1]), color_rows.dtype)
    depth = np.zeros(n_pixels, verts.dtype)
    args = (verts, inv_depth, color_rows, vert_rows.numpy(), pixel_xy.numpy(), pixel.numpy(), image, depth,
            torch_addcmul_is_fused())
    n_covered = pixel.shape[0]
    n_threads = min(torch.get_num_threads(), max(1, n_covered >> 14))  # a thread per >= 16k pixels
    bounds = [n_covered * i // n_threads for i in range(n_threads + 1)]
    _run_split(_shade_pixels, args, bounds)
    return torch.from_numpy(image), torch.from_numpy(depth)


def _run_split(kernel, args: tuple, bounds: list[int]) -> None:
    """kernel(*args, first, stop) over consecutive [bounds[i], bounds[i + 1]), one range per thread."""
    if len(bounds) == 2:
        kernel(*args, bounds[0], bounds[1])
        return
    for done in [_threads().submit(kernel, *args, lo, hi) for lo, hi in zip(bounds, bounds[1:])]:
        done.result()


def _threads() -> ThreadPoolExecutor:
    """The threads that split a batch: made on first use (most processes never need them)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="raster")
        return _pool


def _forget_threads() -> None:
    """A forked child has none of the parent's threads (nor a lock one of them held): it makes its own pool and
    lock if it needs them."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_threads)
