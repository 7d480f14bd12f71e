"""Draw the panel's PNG icons from `appliance/panel/static/icon.svg`.

Phones want PNGs for an installed app (the web manifest's icons, Apple's touch icon), so
the SVG's design is drawn once into PNGs that are kept beside it. The SVG is read, not
copied: it holds one rounded square and circles (filled or stroked), which is all this
draws. Run it again after changing the SVG:

    python scripts/make-icons.py

- `icon-192.png`, `icon-512.png`: the icon as the SVG shows it (transparent corners);
- `icon-maskable-512.png`: full bleed, the circles inside the central 80 % safe zone that
  a launcher's mask (circle, squircle, …) never cuts;
- `apple-touch-icon.png` (180×180): full bleed, no transparency (iOS rounds it itself).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image, ImageDraw

STATIC = Path(__file__).resolve().parents[1] / "appliance" / "panel" / "static"
SVG_NS = "{http://www.w3.org/2000/svg}"
SUPERSAMPLE = 4  # drawn this much larger, then scaled down: smooth edges
SAFE_ZONE = 0.8  # a maskable icon's content fits in a circle of 80 % of its size


def shapes(svg: Path) -> tuple[float, ET.Element, list[ET.Element]]:
    """The SVG's view box size, its background rect and its circles."""
    root = ET.parse(svg).getroot()
    size = float(root.attrib["viewBox"].split()[2])
    rect = root.find(f"{SVG_NS}rect")
    circles = root.findall(f"{SVG_NS}circle")
    if rect is None or not circles:
        sys.exit(f"{svg}: expected one rect and some circles")
    return size, rect, circles


def draw(svg: Path, pixels: int, *, full_bleed: bool) -> Image.Image:
    box, rect, circles = shapes(svg)
    big = pixels * SUPERSAMPLE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    radius = 0 if full_bleed else float(rect.attrib.get("rx", 0)) * big / box
    pen.rounded_rectangle((0, 0, big - 1, big - 1), radius=radius, fill=rect.attrib["fill"])
    # The circles' extent, so that a full-bleed icon keeps them in the safe zone.
    reach = max(float(c.attrib["r"]) + float(c.attrib.get("stroke-width", 0)) / 2
                for c in circles)
    scale = big / box
    if full_bleed:
        scale = min(scale, SAFE_ZONE * big / 2 / reach * 0.95)
    for circle in circles:
        cx = big / 2 + (float(circle.attrib["cx"]) - box / 2) * scale
        cy = big / 2 + (float(circle.attrib["cy"]) - box / 2) * scale
        r = float(circle.attrib["r"]) * scale
        fill, stroke = circle.attrib.get("fill", "#000"), circle.attrib.get("stroke")
        if stroke and fill == "none":
            half = float(circle.attrib.get("stroke-width", 1)) * scale / 2
            pen.ellipse((cx - r - half, cy - r - half, cx + r + half, cy + r + half), fill=stroke)
            pen.ellipse((cx - r + half, cy - r + half, cx + r - half, cy + r - half),
                        fill=rect.attrib["fill"])
        else:
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    return image.resize((pixels, pixels), Image.Resampling.LANCZOS)


def main() -> None:
    svg = STATIC / "icon.svg"
    made = {
        "icon-192.png": draw(svg, 192, full_bleed=False),
        "icon-512.png": draw(svg, 512, full_bleed=False),
        "icon-maskable-512.png": draw(svg, 512, full_bleed=True),
        "apple-touch-icon.png": draw(svg, 180, full_bleed=True).convert("RGB"),
    }
    for name, image in made.items():
        image.save(STATIC / name, optimize=True)
        print(f"{STATIC / name}: {image.size[0]}×{image.size[1]}")


if __name__ == "__main__":
    main()
