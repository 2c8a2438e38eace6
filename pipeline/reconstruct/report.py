"""The visual report: one self-contained HTML page with the metrics tables and a contact sheet of the faces.

Every image is a JPEG thumbnail embedded as a base64 data URI and the CSS is inline, so `reports/index.html`
opens from disk in any browser with no server, no scripts and no files next to it. All text taken from the
data (ids, paths, metric names) goes through `html.escape`.
"""
from __future__ import annotations

import base64
import html
import json
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import pandas as pd
import torch

from ..face_model import FaceDecoder
from ..face_model.decode import SH_DC_INIT, sh_basis, sh_shading
from ..render import render
from ..shards import decode_rgb, encode_jpeg
from .parts import COEFF_COLUMN_PREFIX

# The mesh shading column shows geometry alone: a uniform grey surface under white light from the camera.
SHADING_ALBEDO = 0.8
LIGHT_AMBIENT = 0.15  # irradiance on surfaces seen edge-on (low: the relief reads better)
LIGHT_FRONTAL = 0.85  # extra irradiance on surfaces facing the camera (so those reach 1.0)
SHADING_BACKGROUND_RGB = (38, 42, 48)  # dark backdrop: light grey geometry reads like a studio render

COLUMNS = ("Input crop", "Overlay on photo", "Mesh shading", "Landmarks")
# Box width of each column relative to the thumbnail box: the overlay shows the whole (often landscape) photo.
COLUMN_WIDTHS = (1.0, 1.5, 1.0, 1.0)
LIST_PREVIEW_ITEMS = 8  # longer lists in the metrics JSON are cut to this many items


def frontal_light_sh() -> torch.Tensor:
    """SH coefficients (27,) of a white light from the camera: irradiance LIGHT_AMBIENT + LIGHT_FRONTAL * n_z
    for a camera-space unit normal n, in the layout `sh_shading` expects (it adds SH_DC_INIT back to band 0)."""
    facing = sh_basis(torch.tensor([[[0.0, 0.0, 1.0]]]))[0, 0]  # (9,) basis values at the normal facing the camera
    gamma = torch.zeros(9)
    gamma[0] = LIGHT_AMBIENT / facing[0] - SH_DC_INIT  # band 0 is constant over the sphere
    gamma[2] = LIGHT_FRONTAL / facing[2]               # band 1, z term: proportional to n_z
    return gamma.repeat(3)


def shading_image(decoder: FaceDecoder, coeffs: torch.Tensor) -> np.ndarray:
    """The reconstructed geometry, uniform grey under a fixed frontal light, on a dark backdrop.

    coeffs: (C,) one face's coefficients for decoder.layout (only id, exp, rot and trans matter: albedo and
    lighting are replaced). Returns (S, S, 3) uint8 RGB at the decoder camera's size, aligned with the crop.
    """
    device = decoder.triangles.device
    coeffs = coeffs.reshape(1, -1).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        decoded = decoder(coeffs)
        # render_face would colour the mesh with the model's albedo and the fitted light; the shading column
        # needs the same decoded geometry with a grey surface and our light, so it calls the rasterizer directly.
        irradiance = sh_shading(decoded.normals_cam, frontal_light_sh().to(device)[None])
        colors = (SHADING_ALBEDO * irradiance).clamp(0, 1)
        size = decoder.camera.size_px
        out = render(decoded.verts_px, decoder.triangles, colors, size, size)
    image = out.image[0].permute(1, 2, 0).cpu().numpy()
    cover = out.mask[0, 0].cpu().numpy()[..., None]
    background = np.asarray(SHADING_BACKGROUND_RGB, np.float32) / 255.0
    return (np.clip(image * cover + background * (1 - cover), 0, 1) * 255 + 0.5).astype(np.uint8)


def geometry_coefficients(row: Mapping, decoder: FaceDecoder) -> torch.Tensor:
    """One coefficients-table row -> (C,) float32 for decoder.layout with the row's identity, expression, rotation
    (rad) and translation groups (columns COEFF_COLUMN_PREFIX + group name).

    The alb and sh groups are left at zero: `shading_image` replaces them, so the report can decode rows fitted
    with any colour model on the same shape model (e.g. after the albedo stage added one)."""
    sizes = decoder.layout.sizes
    parts = []
    for name, k in sizes.items():
        if name in ("alb", "sh"):
            parts.append(np.zeros(k, np.float32))
            continue
        values = np.asarray(row[COEFF_COLUMN_PREFIX + name], np.float32).reshape(-1)
        if values.size != k:
            raise ValueError(f"face {row['id']!r}: coefficient group {name!r} has {values.size} values, the face "
                             f"model expects {k} (was it reconstructed with a different face model?)")
        parts.append(values)
    return torch.from_numpy(np.concatenate(parts))


def read_rgb(path: Path) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of the image at `path`, or None when there is no such file."""
    return decode_rgb(path.read_bytes()) if path.is_file() else None


def thumbnail(rgb: np.ndarray, width_px: int, height_px: int) -> np.ndarray:
    """Downscale (H, W, 3) uint8 to fit a width_px x height_px box (never upscaled); keeps the aspect."""
    h, w = rgb.shape[:2]
    scale = min(width_px / w, height_px / h)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)  # area averaging: no aliasing when shrinking


def jpeg_data_uri(rgb: np.ndarray, quality: int) -> str:
    """(H, W, 3) uint8 RGB -> 'data:image/jpeg;base64,...'."""
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(rgb, quality)).decode("ascii")


@dataclass(frozen=True)
class FaceCard:
    """One contact-sheet row: the caption values and the four images, (H, W, 3) uint8 RGB each, in COLUMNS
    order; None where the image is not available (e.g. a crop missing from the shards)."""
    face_id: str
    source: str
    method: str
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    masked_psnr_db: float
    images: tuple[np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray | None]


def face_cards(table: pd.DataFrame, decoder: FaceDecoder, faces_dir: Path,
               input_crops: Mapping[str, np.ndarray]) -> list[FaceCard]:
    """Contact-sheet rows for every row of the coefficients table, in table order.

    faces_dir: the folder of the per-face files `<files_stem>_overlay.png` and `<files_stem>_crop.png`;
    input_crops: face id -> aligned input crop (S, S, 3) uint8 RGB."""
    cards = []
    for row in table.to_dict("records"):
        stem = str(row["files_stem"])
        shading = shading_image(decoder, geometry_coefficients(row, decoder))
        images = (input_crops.get(row["id"]), read_rgb(faces_dir / f"{stem}_overlay.png"), shading,
                  read_rgb(faces_dir / f"{stem}_crop.png"))
        cards.append(FaceCard(str(row["id"]), str(row["source"]), str(row["method"]), float(row["yaw_deg"]),
                              float(row["pitch_deg"]), float(row["roll_deg"]), float(row["masked_psnr"]), images))
    return cards


def format_value(value) -> str:
    """A metric value as short text: floats to 4 significant digits, lists cut to LIST_PREVIEW_ITEMS items."""
    if value is None or (isinstance(value, Mapping) and not value):
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "\u2014" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = [format_value(v) for v in value[:LIST_PREVIEW_ITEMS]]
        if len(value) > LIST_PREVIEW_ITEMS:
            shown.append("\u2026")
        return "[" + ", ".join(shown) + "]"
    return str(value)


def flatten_metrics(metrics: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """Nested metrics -> [(dotted key, leaf value)] in document order; lists of mappings are indexed `key[i]`,
    an empty mapping is one row of its own (shown as a dash) so the key stays visible."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += flatten_metrics(value, name + ".")
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                rows += flatten_metrics(item, f"{name}[{i}].") if isinstance(item, Mapping) else [(f"{name}[{i}]", item)]
        else:
            rows.append((name, value))
    return rows


def read_metrics(paths: Mapping[str, Path]) -> dict[str, dict]:
    """{section title: parsed JSON} for each metrics file that exists, in the given order."""
    return {title: json.loads(Path(path).read_text()) for title, path in paths.items() if Path(path).is_file()}


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def metrics_table_html(title: str, metrics: Mapping) -> str:
    """One metrics section: a two-column table of the flattened keys and formatted values."""
    rows = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{_e(format_value(v))}</td></tr>'
                   for k, v in flatten_metrics(metrics))
    body = rows or '<tr><td colspan="2" class="empty">no values</td></tr>'
    return f'<section class="card metrics"><h2>{_e(title)}</h2><table class="kv">{body}</table></section>'


def image_cell_html(rgb: np.ndarray | None, alt: str, width_px: int, height_px: int, quality: int) -> str:
    """A contact-sheet cell: the JPEG thumbnail in a width_px x height_px box, or a 'not available' box."""
    size = f'style="width:{width_px}px;height:{height_px}px"'
    if rgb is None:
        return f'<td><div class="thumb missing" {size}>not available</div></td>'
    uri = jpeg_data_uri(thumbnail(rgb, width_px, height_px), quality)
    return f'<td><img class="thumb" {size} src="{uri}" alt="{_e(alt)}"></td>'


def face_row_html(card: FaceCard, box_px: int, quality: int) -> str:
    """One `<tr class="face">`: the four image cells and the caption (id, method, source, angles, PSNR)."""
    cells = "".join(image_cell_html(img, f"{col} of {card.face_id}", round(box_px * width), box_px, quality)
                    for col, width, img in zip(COLUMNS, COLUMN_WIDTHS, card.images))
    caption = (f'<div class="fid">{_e(card.face_id)}</div>'
               f'<div><span class="method">{_e(card.method)}</span></div>'
               f'<div class="source" title="{_e(card.source)}">{_e(Path(card.source).name)}</div>'
               f'<dl><dt>yaw</dt><dd>{card.yaw_deg:+.1f}\u00b0</dd><dt>pitch</dt><dd>{card.pitch_deg:+.1f}\u00b0</dd>'
               f'<dt>roll</dt><dd>{card.roll_deg:+.1f}\u00b0</dd>'
               f'<dt>masked PSNR</dt><dd>{card.masked_psnr_db:.2f} dB</dd></dl>')
    return f'<tr class="face">{cells}<td class="caption">{caption}</td></tr>'


_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1d232b;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
header{background:#1d232b;color:#f4f5f7;padding:22px 40px}
header h1{margin:0;font-size:22px;font-weight:600;letter-spacing:.2px}
header p{margin:4px 0 0;color:#aab3bf}
main{padding:24px 40px 48px;max-width:1240px}
h2{font-size:15px;font-weight:600;margin:0 0 10px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:16px 18px}
.metrics-grid{display:flex;flex-wrap:wrap;gap:16px;margin-bottom:28px;align-items:flex-start}
.metrics{flex:1 1 340px;max-width:580px}
table.kv{border-collapse:collapse;width:100%;font-size:13px}
table.kv th,table.kv td{padding:4px 6px;border-top:1px solid #eceef1;text-align:left;vertical-align:top}
table.kv tr:first-child th,table.kv tr:first-child td{border-top:0}
table.kv th{font-weight:400;color:#55606d;font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;
font-size:12px;word-break:break-all}
table.kv td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.empty,.none{color:#8a94a0}
table.sheet{border-collapse:separate;border-spacing:0;width:100%}
table.sheet thead th{font-size:12px;font-weight:600;color:#55606d;text-transform:uppercase;letter-spacing:.5px;
text-align:left;vertical-align:bottom;padding:0 8px 8px}
table.sheet td{padding:8px;border-top:1px solid #eceef1;vertical-align:middle}
table.sheet tbody tr:first-child td{border-top:0}
.thumb{display:block;object-fit:contain;background:#eef0f3;border-radius:4px}
.missing{display:flex;align-items:center;justify-content:center;text-align:center;font-size:11px;color:#8a94a0;
border:1px dashed #c9cfd6;background:#f8f9fa}
td.caption{width:100%;min-width:200px;font-size:13px}
.fid{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-weight:600;word-break:break-all}
.method{display:inline-block;margin:3px 0;padding:1px 8px;border-radius:10px;background:#e3ecf9;color:#1f4f8f;
font-size:12px}
.source{color:#6b7581;font-size:12px;word-break:break-all}
dl{display:grid;grid-template-columns:auto 1fr;gap:1px 10px;margin:6px 0 0}
dt{color:#6b7581}
dd{margin:0;font-variant-numeric:tabular-nums}
.legend{font-weight:400;text-transform:none;letter-spacing:0;color:#8a94a0;white-space:nowrap}
.dot{display:inline-block;width:8px;height:8px;border-radius:50%;margin:0 4px 0 0}
.dot+.dot{margin-left:10px}
"""


def figures_html(figures: Mapping[str, bytes]) -> str:
    """{caption: PNG bytes} -> one embedded <figure> each (data: URLs: the page loads nothing from outside)."""
    return "".join(f'<figure class="card"><img alt="{_e(caption)}" style="max-width:100%" '
                   f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
                   f'<figcaption>{_e(caption)}</figcaption></figure>' for caption, png in figures.items())


def report_html(title: str, summary: str, metrics: Mapping[str, Mapping], cards: Sequence[FaceCard],
                box_px: int, quality: int, figures: Mapping[str, bytes] | None = None) -> str:
    """The complete self-contained page: header, one table per metrics section, figures, the contact sheet.

    metrics: {section title: nested metrics}; box_px: thumbnail box height in px; quality: JPEG quality 1-100;
    figures: {caption: PNG bytes}, e.g. the training curves, embedded under the metrics."""
    sections = "".join(metrics_table_html(t, m) for t, m in metrics.items())
    metrics_block = (f'<div class="metrics-grid">{sections}</div>' if sections
                     else '<p class="none">No metrics files yet.</p>')
    # the colours of pipeline.reconstruct.export.draw_landmarks
    legend = ('<div class="legend"><span class="dot" style="background:#28dc28"></span>detected'
              '<span class="dot" style="background:#eb2828"></span>fitted</div>')
    head = "".join(f"<th>{_e(c)}{legend if c == 'Landmarks' else ''}</th>" for c in COLUMNS) + "<th>Face</th>"
    rows = "".join(face_row_html(card, box_px, quality) for card in cards)
    sheet = (f'<table class="sheet"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>'
             f'</table>' if cards else '<p class="none">No reconstructed faces.</p>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{_e(title)}</title><style>{_CSS}</style></head><body>'
            f'<header><h1>{_e(title)}</h1><p>{_e(summary)}</p></header><main>'
            f'<h2>Metrics</h2>{metrics_block}'
            + (f'<h2>Training curves</h2>{figures_html(figures)}' if figures else '') +
            f'<h2>Faces</h2><section class="card">{sheet}</section>'
            '</main></body></html>\n')


def screenshot_html(html_path: Path, png_path: Path, width_px: int, height_px: int,
                    browser: str = "chromium", timeout_s: float = 60.0) -> Path:
    """Render a local HTML file in headless Chromium to a (height_px, width_px) PNG screenshot of the top of
    the page. Uses a fresh throw-away profile and no network features, so it works offline and in parallel."""
    executable = shutil.which(browser)
    if executable is None:
        raise FileNotFoundError(f"{browser!r} not found on PATH (Debian: apt-get install -y chromium)")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png_path}",
               f"--window-size={width_px},{height_px}", Path(html_path).resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not png_path.is_file():
        raise RuntimeError(f"chromium screenshot failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return png_path
