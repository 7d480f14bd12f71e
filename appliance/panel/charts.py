"""Charts drawn on the server as SVG: no script, no library, and nothing the strict
Content-Security-Policy has to allow (presentation attributes, no `style`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from xml.sax.saxutils import quoteattr

WIDTH, HEIGHT, PAD = 360, 160, 4


def money(value: Any) -> str:
    """12345.678 → '12,345.68'; '–' when there is no figure."""
    if value is None or isinstance(value, bool):
        return "–"
    try:
        return f"{float(value):,.2f}"
    except (TypeError, ValueError):
        return str(value)


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def equity_svg(points: list[dict[str, Any]], *, label: str = "equity") -> str:
    """A line of `points` (`{"ts", "equity"}`, oldest first) with the area under it, scaled to
    the box; an empty chart says so."""
    pairs = [(_epoch(p["ts"]), float(p["equity"])) for p in points
             if p.get("ts") and p.get("equity") is not None]
    head = (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label={quoteattr(label)} xmlns="http://www.w3.org/2000/svg">')
    if len(pairs) < 2:
        return (head + f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" '
                'class="chart-empty">no trades yet</text></svg>')
    t0, t1 = pairs[0][0], pairs[-1][0]
    low, high = min(v for _, v in pairs), max(v for _, v in pairs)
    span_t, span_v = (t1 - t0) or 1.0, (high - low) or 1.0

    def xy(t: float, v: float) -> str:
        x = PAD + (t - t0) / span_t * (WIDTH - 2 * PAD)
        y = PAD + (high - v) / span_v * (HEIGHT - 2 * PAD)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(t, v) for t, v in pairs)
    area = f"{PAD},{HEIGHT - PAD} {line} {WIDTH - PAD},{HEIGHT - PAD}"
    return (head + f'<polygon class="chart-area" points="{area}"/>'
            f'<polyline class="chart-line" fill="none" points="{line}"/>'
            f'<text x="{PAD + 2}" y="14" class="chart-label">{money(high)}</text>'
            f'<text x="{PAD + 2}" y="{HEIGHT - 8}" class="chart-label">{money(low)}</text>'
            "</svg>")
