"""The backtest's report: metrics.json, trades.csv, equity.png and report.html in one folder.

Everything in it comes from the data and the settings: no date of the run, no scratch path,
keys sorted, the charts drawn with fixed sizes and no timestamps in their metadata. Two runs
on the same input therefore write the same bytes.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.trading.backtest.engine import Result

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TRADE_COLUMNS = ("ts", "kind", "symbol", "side", "qty", "price", "fee", "fee_currency",
                 "realized_pnl", "strategy_id", "order_id", "event_id")
CHART_POINTS = 2000  # per series in the charts (the extremes of each stretch are kept)
TABLE_ROWS = 500  # trades shown in the HTML page; trades.csv has all of them
SECTIONS = ("alpha", "ensemble", "sizing", "execution")
# The charts' style; a fixed SVG id salt, so the same chart gives the same SVG.
STYLE: dict[str, Any] = {"svg.hashsalt": "circles", "svg.fonttype": "none", "font.size": 9, "axes.grid": True,
         "grid.alpha": 0.3}
HEADLINE = ("net_pnl", "total_return", "cagr", "sharpe", "sortino", "max_drawdown_ratio",
            "calmar", "round_trips", "win_rate", "profit_factor", "fees", "volume", "exposure")


def drawdown(equity: list[float]) -> list[float]:
    """1 − equity / running peak, at every point (0 at a new peak)."""
    out, peak = [], -math.inf
    for value in equity:
        peak = max(peak, value)
        out.append(1 - value / peak if peak > 0 else 0.0)
    return out


def summary(result: Result) -> dict[str, Any]:
    """metrics.json: the data, the settings that traded, counts, the ledger's metrics
    (`metrics`, by the trade logger's code) and the marked equity (`marked`)."""
    equity = [e for _, e in result.equity]
    dd = drawdown(equity)
    settings = result.settings
    return {
        "data": {"file": result.data.name, "sha256": result.data_sha256, "rows": result.rows,
                 "timeframe": result.timeframe, "feeds": result.feeds,
                 "first_bar_close": _iso(result.equity[0][0]) if result.equity else None,
                 "last_bar_close": _iso(result.equity[-1][0]) if result.equity else None,
                 "missing_bars": result.missing_bars,
                 "gaps": [{"feed": g.feed, "before": g.before, "missing": g.missing}
                          for g in result.gaps]},
        "settings": {name: getattr(settings, name).model_dump(mode="json") for name in SECTIONS},
        "account": result.account,
        "counts": result.counts,
        "dead_letters": result.dead_letters,
        "metrics": result.metrics,
        "marked": {"final_equity": equity[-1] if equity else None,
                   "max_drawdown_ratio": max(dd) if dd else None},
    }


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def write_trades(path: Path, events: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle, lineterminator="\n")
        out.writerow(TRADE_COLUMNS)
        for event in events:
            out.writerow(["" if event.get(c) is None else event[c] for c in TRADE_COLUMNS])


def thin(points: list[tuple[float, float]], limit: int = CHART_POINTS) -> list[tuple[float, float]]:
    """At most `limit` + 2 points: the first, the last, and each stretch's lowest and
    highest, so no drawdown disappears from the chart."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / (limit // 2))
    kept: list[tuple[float, float]] = []
    for start in range(0, len(points), size):
        stretch = points[start:start + size]
        low = min(range(len(stretch)), key=lambda i: stretch[i][1])
        high = max(range(len(stretch)), key=lambda i: stretch[i][1])
        kept.extend(stretch[i] for i in sorted({low, high}))
    if kept[0] != points[0]:
        kept.insert(0, points[0])
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def chart(result: Result) -> Figure:
    """Equity above, drawdown below, against the bars' close times (UTC)."""
    from matplotlib.figure import Figure

    equity = thin(result.equity)
    times = [datetime.fromtimestamp(t, UTC) for t, _ in equity]
    values = [e for _, e in equity]
    figure = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot(times, values, color="#1f6feb", linewidth=1)
    top.set_ylabel("equity")
    top.set_title(f"{result.account}: equity, marked at each bar's close")
    depth = [-100 * d for d in drawdown(values)]
    bottom.fill_between(times, depth, 0, color="#d1242f", alpha=0.4, linewidth=0)
    bottom.set_ylabel("drawdown %")
    bottom.set_xlabel("UTC")
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: without the XML prolog and doctype


def plain(value: Any) -> str:
    """A figure as the report and the command line show it."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value)


def _number(value: Any) -> str:
    return html.escape(plain(value))


def page(doc: dict[str, Any], svg: str, events: list[dict[str, Any]]) -> str:
    """report.html: one self-contained page (no script, no outside file)."""
    e = html.escape
    metrics = doc["metrics"]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{_number(metrics.get(k))}</td></tr>" for k in HEADLINE)
    marked = doc["marked"]
    rows += "".join(f"<tr><th>marked {e(k.replace('_', ' '))}</th><td>{_number(v)}</td></tr>"
                    for k, v in marked.items())
    data = doc["data"]
    counts = ", ".join(f"{v} {e(k)}" for k, v in doc["counts"].items())
    gaps = "".join(f"<li>{e(g['feed'])}: {g['missing']} bar(s) missing before {e(g['before'])}</li>"
                   for g in data["gaps"])
    gap_note = (f"<p>{data['missing_bars']} bar(s) missing in all.</p><ul>{gaps}</ul>"
                if data["missing_bars"] else "<p>No gaps.</p>")
    letters = "".join(f"<li>{e(x)}</li>" for x in doc["dead_letters"])
    shown = events[:TABLE_ROWS]
    head = "".join(f"<th>{e(c)}</th>" for c in TRADE_COLUMNS[:-2])
    trades = "".join("<tr>" + "".join(f"<td>{_number(ev.get(c))}</td>" for c in TRADE_COLUMNS[:-2])
                     + "</tr>" for ev in shown)
    more = (f"<p>The first {TABLE_ROWS} of {len(events)} events; all are in "
            f"<a href=\"trades.csv\">trades.csv</a>.</p>" if len(events) > TABLE_ROWS else
            "<p>Also in <a href=\"trades.csv\">trades.csv</a>.</p>")
    settings = e(json.dumps(doc["settings"], indent=2, sort_keys=True))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Backtest of {e(Path(data['file']).name)}</title>
<style>
body{{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:1rem;color:#1f2328;background:#fff}}
@media (prefers-color-scheme:dark){{body{{color:#e6edf3;background:#0d1117}}svg{{background:#fff;border-radius:6px}}}}
svg{{width:100%;height:auto}} table{{border-collapse:collapse;font-variant-numeric:tabular-nums}}
th,td{{padding:.2rem .6rem;text-align:left;border-bottom:1px solid #8884}} .scroll{{overflow-x:auto}}
pre{{overflow-x:auto;font-size:13px}}
</style></head><body>
<h1>Backtest of {e(Path(data['file']).name)}</h1>
<p>Account <b>{e(doc['account'])}</b> on paper; {e(data['timeframe'])} bars from {e(str(data['first_bar_close']))}
to {e(str(data['last_bar_close']))} (closes, UTC); {counts}. Data SHA-256 <code>{e(data['sha256'])}</code>.</p>
{svg}
<h2>Metrics</h2>
<p>From the ledger, by the trade logger's own code (docs/metrics.md); "marked" figures
value open positions at each bar's close.</p>
<table>{rows}</table>
<h2>Data checks</h2>
{gap_note}
{'<h2>Dead letters</h2><ul>' + letters + '</ul>' if letters else ''}
<h2>Trades</h2>
{more}
<div class="scroll"><table><tr>{head}</tr>{trades}</table></div>
<h2>Settings</h2>
<pre>{settings}</pre>
</body></html>
"""


def write(result: Result, out: Path) -> dict[str, Any]:
    """Write the report into `out` (created); returns metrics.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    doc = summary(result)
    (out / "metrics.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    write_trades(out / "trades.csv", result.events)
    import matplotlib  # lazily: only a report draws

    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]
        figure = chart(result)
        (out / "equity.png").write_bytes(_png(figure))
        svg = _svg(figure)
    (out / "report.html").write_text(page(doc, svg, result.events), encoding="utf-8")
    return doc
