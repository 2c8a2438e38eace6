"""Screenshot the HTML report in headless Chromium, to check how it renders without opening a browser.

    .venv/bin/python -m scripts.screenshot_report reports/index.html reports/index.png --size 1280 2000
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.reconstruct.report import screenshot_html


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path, nargs="?", default=Path("reports/index.html"))
    ap.add_argument("png", type=Path, nargs="?", default=Path("reports/index.png"))
    ap.add_argument("--size", type=int, nargs=2, default=(1280, 2000), metavar=("WIDTH", "HEIGHT"),
                    help="browser window in CSS px; the screenshot shows the top of the page at this size")
    ap.add_argument("--browser", default="chromium", help="Chromium executable name or path")
    args = ap.parse_args()
    png = screenshot_html(args.html, args.png, *args.size, browser=args.browser)
    print(f"{args.html} -> {png}")


if __name__ == "__main__":
    main()
