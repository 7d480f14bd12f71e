"""Charts drawn on the server as SVG: no script, no library, and nothing the strict
Content-Security-Policy has to allow (presentation attributes, no `style`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from appliance.bus.payloads import epoch

WIDTH, HEIGHT, PAD = 360, 160, 4
SPARK_HEIGHT = 64  # a sensor's small chart on the home page


def money(value: Any) -> str:
    """12345.678 → '12,345.68'; '–' when there is no figure."""
    if value is None or isinstance(value, bool):
        return "–"
    try:
        return f"{float(value):,.2f}"
    except (TypeError, ValueError):
        return str(value)


def line_svg(pairs: Sequence[tuple[float, float]], *, label: str, empty: str = "no data yet",
             height: int = HEIGHT, fmt: Callable[[float], str] = money,
             span: tuple[float, float] | None = None, kind: str = "chart") -> str:
    """A line through `pairs` (`(epoch seconds, value)`, oldest first) with the area under it,
    scaled to the box, its highest and lowest value written at the top and the bottom; an
    empty chart says `empty`. `span` fixes the time axis (e.g. the last 24 h) instead of
    the data's own; `kind` is the class of the `svg` element."""
    head = (f'<svg class="{kind}" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-label={quoteattr(label)} xmlns="http://www.w3.org/2000/svg">')
    if len(pairs) < 2:
        return (head + f'<text x="{WIDTH / 2}" y="{height / 2}" text-anchor="middle" '
                f'dominant-baseline="middle" class="chart-empty">{escape(empty)}</text></svg>')
    t0, t1 = span or (pairs[0][0], pairs[-1][0])
    low, high = min(v for _, v in pairs), max(v for _, v in pairs)
    span_t, span_v = (t1 - t0) or 1.0, (high - low) or 1.0

    def xy(t: float, v: float) -> str:
        x = PAD + min(max((t - t0) / span_t, 0.0), 1.0) * (WIDTH - 2 * PAD)
        y = PAD + (high - v) / span_v * (height - 2 * PAD)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(t, v) for t, v in pairs)
    first, last = xy(*pairs[0]).split(",")[0], xy(*pairs[-1]).split(",")[0]
    area = f"{first},{height - PAD} {line} {last},{height - PAD}"
    return (head + f'<polygon class="chart-area" points="{area}"/>'
            f'<polyline class="chart-line" fill="none" points="{line}"/>'
            f'<text x="{PAD + 2}" y="14" class="chart-label">{escape(fmt(high))}</text>'
            f'<text x="{PAD + 2}" y="{height - 8}" class="chart-label">{escape(fmt(low))}</text>'
            "</svg>")


def equity_svg(points: list[dict[str, Any]], *, label: str = "equity") -> str:
    """An account's equity curve: `points` are `{"ts", "equity"}`, oldest first (one
    without a time is left out)."""
    return line_svg([(t, float(p["equity"])) for p in points
                     if p.get("equity") is not None and (t := epoch(p.get("ts"))) is not None],
                    label=label, empty="no trades yet")
