"""The training curves as one PNG (reports/train_curves.png), drawn from dvclive's TSV files with matplotlib.

`dvc plots show` renders the same curves with a chart library it loads from a CDN, so offline they are missing;
this picture needs nothing but itself, and the HTML report embeds it."""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

# (panel title, [(TSV under plots/metrics, curve label)], log scale)
PANELS = (
    ("training loss", [("train/loss.tsv", "total")], True),
    ("loss terms", [("train/photometric.tsv", "photometric"), ("train/landmark.tsv", "landmark"),
                    ("train/coefficient.tsv", "coefficient"), ("train/reflectance.tsv", "reflectance"),
                    ("train/lighting.tsv", "lighting")], True),
    ("validation", [("val/landmark_px.tsv", "landmark error, px")], False),
    ("learning rate", [("lr.tsv", "lr")], True),
)


def read_curve(path: Path) -> pd.DataFrame | None:
    """A dvclive TSV (step + one value column) or None when absent or empty."""
    if not path.is_file():
        return None
    table = pd.read_csv(path, sep="\t")
    return table if len(table) and "step" in table.columns and len(table.columns) >= 2 else None


def plot_training_curves(live_dir: str | Path, png_path: str | Path, dpi: int = 100) -> Path | None:
    """Draw the curves under `<live_dir>/plots/metrics` into `png_path` (2 x 2 panels); None, writing nothing,
    when there is no curve at all. Uses matplotlib's Agg backend (no display)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    metrics = Path(live_dir) / "plots" / "metrics"
    curves = [[(label, read_curve(metrics / name)) for name, label in spec] for _, spec, _ in PANELS]
    if not any(c is not None for panel in curves for _, c in panel):
        return None
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    for ax, (title, _, log), panel in zip(fig.subplots(2, 2).ravel(), PANELS, curves):
        drawn = False
        for label, table in panel:
            if table is None:
                continue
            values = table[table.columns[-1]].astype(float)
            if log:  # a term that is 0 (weight 0) has no place on a log axis: left out rather than flattening all
                values = values.where(values > 0)
                if values.isna().all():
                    continue
            ax.plot(table["step"], values, label=label, linewidth=1.2, marker="o" if len(table) < 30 else None)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            if log:
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    png_path.write_bytes(buffer.getvalue())
    return png_path
