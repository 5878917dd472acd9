"""The HTML report: one self-contained page (inline SVG and CSS, no network) read from a journal.

`report --html`, `--html` on the main job and `status --serve` all show this page. Every
figure is aggregated in SQL (time buckets, histogram bins, grouped reasons), so a journal of
10^5-10^6 series renders in seconds into a page of bounded size; individual series are
listed only for failures (the first FAILURES_SHOWN) unless `all_series` is asked for.
PatientID appears only with `show_phi` (the journal holds no PatientName).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from html import escape
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from . import __version__
from .config import Config, config_summary
from .journal import Journal
from .report import PAUSE_EVENTS, iso, summary
from .states import State
from .steps import steps_summary
from .svgplot import Chart, nice_step, number, ticks
from .window import Window

MAX_BUCKETS = 150
BUCKET_STEPS = (0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
HIST_BINS = 30
QUANTILE_BINS = 2048
FAILURES_SHOWN = 100
REASONS_SHOWN = 30
RAW_LIMIT_POINTS = 600  # more throttle changes than this are drawn per time bucket
RETRY_EVENTS = ("short", "requeued", "give_up", "not_found")
RUN_PROBLEMS = tuple(PAUSE_EVENTS)  # source unreachable, destination full or unreachable
# A throttle change goes up (the limit grew back, or the learned ceiling lifted) or down (the PACS
# was full: halved, or at 1 already). The change says which (`kind`); journals written before
# it had `kind` are read by the limit's direction and `why`.
THROTTLE_KIND = (
    "CASE COALESCE(json_extract(detail, '$.kind'), CASE WHEN json_extract(detail, '$.to')"
    " > json_extract(detail, '$.from') OR (json_extract(detail, '$.to') = json_extract(detail, '$.from')"
    " AND json_extract(detail, '$.why') IN ('recovered', 'ceiling lifted')) THEN 'up' ELSE 'down' END)"
    " WHEN 'up' THEN 'throttle.up' ELSE 'throttle.down' END"
)


@dataclass(frozen=True)
class PageOptions:
    """What to show and how: `settings` are the run's config (flat key → value), when known."""

    show_phi: bool = False
    all_series: bool = False
    window: Window | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    live: bool = False
    refresh_s: float = 5.0
    timezone: str | None = None


@dataclass(frozen=True)
class Timeline:
    """Time buckets: bucket i covers [t0 + i*step, t0 + (i+1)*step)."""

    t0: float
    t1: float
    step: float
    n: int

    @classmethod
    def over(cls, first: float, last: float) -> Timeline:
        span = max(last - first, 1.0)
        days = 86400 * math.ceil(span / 86400 / MAX_BUCKETS)
        step = float(next((s for s in BUCKET_STEPS if span / s <= MAX_BUCKETS), days))
        t0 = math.floor(first / step) * step
        n = max(1, math.ceil((last - t0) / step + 1e-9))
        return cls(t0, max(last, t0 + step), step, n)

    def bucket(self, column: str) -> str:
        """SQL for the (clamped) bucket index of `column`; binds t0, step."""
        return f"MIN(MAX(CAST(({column} - :t0) / :step AS INTEGER), 0), {self.n - 1})"

    @property
    def args(self) -> dict[str, float]:
        return {"t0": self.t0, "step": self.step}

    def start(self, i: int) -> float:
        return self.t0 + i * self.step


_NUMBERS = re.compile(r"(0x[0-9A-Fa-f]+)|\d+(?:\.\d+)*")  # DIMSE statuses (0xA702) stay as they are


def _norm(text: str | None) -> str:
    """A reason with its numbers and UIDs folded (`short: 37/50 after 3 attempts` → `short: N/N after N attempts`)."""
    if text is None:
        return "(no detail)"
    return _NUMBERS.sub(lambda m: m.group(1) or "N", text)[:200]


def _in(names: Sequence[str]) -> str:
    """An SQL list of our own event names (constants, never user input)."""
    return "(" + ", ".join(f"'{n}'" for n in names) + ")"


def _connect_helpers(db: sqlite3.Connection) -> None:
    db.create_function("dt_norm", 1, _norm, deterministic=True)


def _scrubbed(column: str, show_phi: bool) -> str:
    """SQL that blanks the series' own PatientID out of a free-text column (`s` is the series row)."""
    if show_phi:
        return column
    return (
        f"CASE WHEN length(s.patient_id) >= 2 THEN replace({column}, s.patient_id, '[PatientID]')"
        f" ELSE {column} END"
    )


# -- collecting (SQL) --------------------------------------------------------------------


def _span(db: sqlite3.Connection, now: float, running: bool) -> tuple[float, float] | None:
    first = db.execute("SELECT at FROM events ORDER BY id LIMIT 1").fetchone()
    if first is None:
        return None
    last = db.execute("SELECT MAX(at) FROM (SELECT at FROM events ORDER BY id DESC LIMIT 200)").fetchone()[0]
    return first[0], max(last, now) if running else last


def _series_buckets(db: sqlite3.Connection, tl: Timeline) -> dict[str, list[int]]:
    """Per bucket: series complete, failed, and instances of series moved (counted at their proof)."""
    out = {k: [0] * tl.n for k in ("complete", "failed", "instances")}
    sql = (
        f"SELECT {tl.bucket('COALESCE(finished_at, updated_at)')} AS b,"
        " SUM(state='complete'), SUM(state='failed'),"
        " SUM(CASE WHEN state='complete' AND first_issued_at IS NOT NULL THEN received ELSE 0 END)"
        " FROM series WHERE state IN ('complete', 'failed') GROUP BY b"
    )
    for b, complete, failed, instances in db.execute(sql, tl.args):
        out["complete"][b], out["failed"][b], out["instances"][b] = complete, failed, instances or 0
    return out


def _event_buckets(db: sqlite3.Connection, tl: Timeline) -> dict[str, list[int]]:
    """Per bucket: moves issued, retries (short, requeued), give-ups, throttle drops, run-level problems."""
    names = ("issued", *RETRY_EVENTS, "throttle", *RUN_PROBLEMS)
    kind = f"CASE WHEN event='throttle' THEN {THROTTLE_KIND} ELSE event END"
    out: dict[str, list[int]] = {}
    sql = f"SELECT {tl.bucket('at')} AS b, {kind} AS k, COUNT(*) FROM events WHERE event IN {_in(names)} GROUP BY b, k"
    for b, k, count in db.execute(sql, tl.args):
        out.setdefault(k, [0] * tl.n)[b] = count
    return out


def _limit_points(db: sqlite3.Connection, tl: Timeline, running: bool) -> list[tuple[float, float]]:
    """The in-flight limit over time: run.start's limit, each throttle change's `to`, 0 at run.stop."""
    value = (
        "CASE event WHEN 'run.start' THEN json_extract(detail, '$.limit')"
        " WHEN 'throttle' THEN json_extract(detail, '$.to') ELSE 0 END"
    )
    where = "event IN ('run.start', 'throttle', 'run.stop')"
    raw = f"SELECT at, {value} FROM events WHERE {where} ORDER BY id LIMIT {RAW_LIMIT_POINTS + 1}"
    points: list[tuple[float, float]] = [(at, v or 0) for at, v in db.execute(raw)]
    if len(points) > RAW_LIMIT_POINTS:
        # Per bucket: the lowest limit, then the one it ended on (SQLite takes bare columns from MAX's row).
        low = f"SELECT {tl.bucket('at')} AS b, MIN({value}), MIN(at) FROM events WHERE {where} GROUP BY b"
        end = f"SELECT {tl.bucket('at')} AS b, MAX(id), {value}, at FROM events WHERE {where} GROUP BY b"
        lows = {b: (at, v or 0) for b, v, at in db.execute(low, tl.args)}
        points = []
        for b, _, v, at in db.execute(end + " ORDER BY b", tl.args):
            points.append(lows[b])
            if (v or 0) != lows[b][1]:
                points.append((max(at, lows[b][0]), v or 0))
    if running and points and points[-1][0] < tl.t1:
        points.append((tl.t1, points[-1][1]))
    return points


def _histogram(db: sqlite3.Connection) -> dict[str, Any]:
    """Seconds from first issue to proof of complete series: up to HIST_BINS bins from the shortest to the 99th
    percentile, then one bin for everything longer."""
    where = "state='complete' AND seconds IS NOT NULL"
    n, low, top = db.execute(f"SELECT COUNT(*), MIN(seconds), MAX(seconds) FROM series WHERE {where}").fetchone()
    if not n:
        return {"n": 0, "bins": [], "width": 0.0}

    p50, p90, p99 = _quantiles(db, where, n, low, top, (0.5, 0.9, 0.99))
    width = nice_step(max(p99 - low, 1e-3) / HIST_BINS)
    lo = math.floor(low / width) * width
    k = min(HIST_BINS, math.floor((top - lo) / width) + 1)  # regular bins; index k: beyond them
    counts = [0] * (k + 1)
    sql = f"SELECT MIN(CAST((seconds - ?) / ? AS INTEGER), ?) AS b, COUNT(*) FROM series WHERE {where} GROUP BY b"
    for b, count in db.execute(sql, (lo, width, k)):
        counts[max(b, 0)] += count
    bins = [(lo + i * width, lo + (i + 1) * width if i < k else float(top), c) for i, c in enumerate(counts)]
    if not bins[-1][2]:
        bins.pop()
    beyond = len(bins) > k
    return {"n": n, "bins": bins, "width": width, "beyond": beyond, "p50": p50, "p90": p90, "p99": p99, "max": top}


def _quantiles(
    db: sqlite3.Connection, where: str, n: int, low: float, top: float, qs: Sequence[float]
) -> list[float]:
    """Quantiles of `seconds` to within 1% (or 1 ms), by counting in fine bins (no sort of 10^6 rows).

    One pass over QUANTILE_BINS bins of [low, top]; a quantile whose bin is still wider than
    1% of its value (a few very long series stretch the range) is counted again inside that bin.
    """
    out = []
    first = _fine_bins(db, where, low, top)
    for q in qs:
        rank = min(n - 1, int(q * n))  # 0-based rank of the quantile
        lo, hi, below, bins = low, top, 0, first
        for _ in range(4):
            width = (hi - lo) / QUANTILE_BINS
            cum = below
            for b, count in bins:
                if cum + count > rank:
                    lo, hi, below = lo + b * width, min(hi, lo + (b + 1) * width), cum
                    break
                cum += count
            if hi - lo <= max(0.01 * lo, 1e-3):
                break
            bins = _fine_bins(db, where, lo, hi)
        out.append((lo + hi) / 2)
    return out


def _fine_bins(db: sqlite3.Connection, where: str, lo: float, hi: float) -> list[tuple[int, int]]:
    width = (hi - lo) / QUANTILE_BINS or 1e-9
    sql = (
        f"SELECT MIN(CAST((seconds - ?) / ? AS INTEGER), {QUANTILE_BINS - 1}) AS b, COUNT(*) FROM series"
        f" WHERE {where} AND seconds >= ? AND seconds <= ? GROUP BY b ORDER BY b"
    )
    return list(db.execute(sql, (lo, width, lo, hi)))


def _reasons(db: sqlite3.Connection, show_phi: bool) -> list[tuple[str, str, int, str]]:
    """(where, reason with numbers folded, count, an example) for failed series and retry events."""
    out = []
    failed = (
        f"SELECT dt_norm({_scrubbed('s.reason', show_phi)}) AS r, COUNT(*), MIN({_scrubbed('s.reason', show_phi)})"
        f" FROM series s WHERE s.state='failed' GROUP BY r ORDER BY 2 DESC, 1 LIMIT {REASONS_SHOWN}"
    )
    out += [("failed", r, c, ex or "") for r, c, ex in db.execute(failed)]
    events = (
        f"SELECT e.event, dt_norm({_scrubbed('e.detail', show_phi)}) AS r, COUNT(*),"
        f" MIN({_scrubbed('e.detail', show_phi)}) FROM events e LEFT JOIN series s ON s.uid = e.uid"
        f" WHERE e.event IN {_in(RETRY_EVENTS)} GROUP BY e.event, r ORDER BY 3 DESC, 2"
        f" LIMIT {REASONS_SHOWN}"
    )
    out += [(ev, r, c, ex or "") for ev, r, c, ex in db.execute(events)]
    return out


_SERIES_COLUMNS = "s.seq, s.batch_line, s.uid, s.study_uid, s.state, s.expected, s.received, s.attempts, s.seconds"


def _failures(db: sqlite3.Connection, show_phi: bool) -> tuple[int, list[tuple[Any, ...]]]:
    total = db.execute("SELECT COUNT(*) FROM series WHERE state='failed'").fetchone()[0]
    phi = ", s.patient_id" if show_phi else ""
    sql = (
        f"SELECT {_SERIES_COLUMNS}, {_scrubbed('s.reason', show_phi)}{phi} FROM series s"
        f" WHERE s.state='failed' ORDER BY s.seq LIMIT {FAILURES_SHOWN}"
    )
    return total, list(db.execute(sql))


def _all_series(db: sqlite3.Connection, show_phi: bool) -> Iterator[tuple[Any, ...]]:
    phi = ", s.patient_id" if show_phi else ""
    sql = f"SELECT {_SERIES_COLUMNS}, {_scrubbed('s.reason', show_phi)}{phi} FROM series s ORDER BY s.seq"
    yield from db.execute(sql)


def _recent(db: sqlite3.Connection, show_phi: bool, limit: int = 15) -> list[tuple[Any, ...]]:
    """The latest retries, give-ups, throttle drops and run-level problems, newest first."""
    names = (*RETRY_EVENTS, "throttle", *RUN_PROBLEMS)
    sql = (
        f"SELECT e.at, e.uid, e.event, {_scrubbed('e.detail', show_phi)} FROM events e"
        f" LEFT JOIN series s ON s.uid = e.uid WHERE e.event IN {_in(names)}"
        f" ORDER BY e.id DESC LIMIT {limit}"
    )
    return list(db.execute(sql))


def _runs(db: sqlite3.Connection, limit: int = 20) -> list[tuple[float, str, dict[str, Any]]]:
    where = f"event IN {_in(('run.start', 'run.stop'))}"
    sql = f"SELECT at, event, detail FROM events WHERE {where} ORDER BY id DESC LIMIT ?"
    return [(at, ev, json.loads(d) if d else {}) for at, ev, d in reversed(db.execute(sql, (limit,)).fetchall())]


# -- drawing -----------------------------------------------------------------------------


class _Clock:
    """Time labels in the window's zone (or the machine's)."""

    def __init__(self, zone: str | None) -> None:
        self.tz: tzinfo | None = ZoneInfo(zone) if zone else None

    def dt(self, t: float) -> datetime:
        return datetime.fromtimestamp(t, self.tz) if self.tz else datetime.fromtimestamp(t).astimezone()

    def label(self, t: float, span: float) -> str:
        fmt = "%H:%M:%S" if span < 600 else "%H:%M" if span < 2 * 86400 else "%a %H:%M"
        return self.dt(t).strftime(fmt)

    def stamp(self, t: float | None) -> str:
        return self.dt(t).strftime("%Y-%m-%d %H:%M:%S %Z") if t is not None else ""

    def zone(self, t: float) -> str:
        return self.dt(t).strftime("%Z (UTC%z)")


def _time_chart(ident: str, tl: Timeline, y_max: float, clock: _Clock, y_label: str, opts: PageOptions) -> Chart:
    span = tl.t1 - tl.t0
    chart = Chart(
        ident, tl.t0, tl.t0 + tl.n * tl.step, y_max,
        x_ticks=ticks(tl.t0, tl.t0 + tl.n * tl.step, 10, lambda t: clock.label(t, span), TICK_STEPS),
        y_label=y_label, data={"buckets": tl.n, "bucket-s": number(tl.step)},
    )  # fmt: skip
    if opts.window is not None:
        for a, b in opts.window.spans(tl.t0, tl.t0 + tl.n * tl.step):
            chart.band(a, b, "window", f"window {clock.stamp(a)} – {clock.stamp(b)}", start=iso(a), end=iso(b))
    return chart


def _plot_complete(tl: Timeline, sb: dict[str, list[int]], clock: _Clock, opts: PageOptions) -> str:
    cum_c, cum_f, points_c, points_f = 0, 0, [], []
    for i in range(tl.n):
        cum_c += sb["complete"][i]
        cum_f += sb["failed"][i]
        end = min(tl.start(i + 1), tl.t1)
        points_c.append((end, cum_c))
        points_f.append((end, cum_f))
    chart = _time_chart("plot-complete", tl, max(cum_c, cum_f, 1), clock, "series", opts)
    chart.line("line-complete", [(tl.t0, 0), *points_c], "complete", step=False)
    chart.line("line-failed", [(tl.t0, 0), *points_f], "failed", step=False)
    return chart.render([("complete", "complete (cumulative)"), ("failed", "failed (cumulative)")])


def _plot_rate(tl: Timeline, sb: dict[str, list[int]], clock: _Clock, opts: PageOptions) -> str:
    rates = [v / tl.step for v in sb["instances"]]
    chart = _time_chart("plot-rate", tl, max(rates, default=1), clock, "instances/s", opts)
    for i, v in enumerate(sb["instances"]):
        if v:
            a = tl.start(i)
            chart.bar(
                a, a + tl.step, v / tl.step, "rate", f"{clock.stamp(a)}: {v} instances, {number(v / tl.step)}/s",
                count=v,
            )  # fmt: skip
    return chart.render([("rate", "instances/s (counted when each series is proven)")])


def _plot_limit(
    tl: Timeline, points: list[tuple[float, float]], ev: dict[str, list[int]], clock: _Clock, opts: PageOptions
) -> str:
    ceiling = opts.settings.get("transfer.max_in_flight") or 0
    chart = _time_chart("plot-limit", tl, max([v for _, v in points] + [ceiling, 1]), clock, "in-flight limit", opts)
    issued = ev.get("issued", [0] * tl.n)
    peak = max(issued) or 1
    for i, v in enumerate(issued):  # moves issued per bucket, scaled to the plot as faint bars
        if v:
            a = tl.start(i)
            chart.bar(a, a + tl.step, v / peak * chart.y_top * 0.9, "issued", f"{clock.stamp(a)}: {v} moves issued",
                      count=v)  # fmt: skip
    if points:
        chart.line("line-limit", points, "limit", step=True)
    marks = [("throttle.down", "drop", 0.3), ("throttle.up", "recover", 0.7)]
    marks += [(k, "problem", 0.5) for k in RUN_PROBLEMS]
    for kind, cls, where in marks:  # side by side within the bucket: a drop and a recovery in one bucket both show
        for i, v in enumerate(ev.get(kind, ())):
            if v:
                a = tl.start(i) + tl.step * where
                chart.mark(a, cls, f"{clock.stamp(tl.start(i))}: {v} × {kind}", count=v, kind=kind)
    return chart.render(
        [("limit", "in-flight limit"), ("issued", f"moves issued (max {peak} per {number(tl.step)} s)"),
         ("drop", "throttle down"), ("recover", "throttle up"),
         ("problem", "source unreachable / destination full or unreachable")]
    )  # fmt: skip


def _plot_retries(tl: Timeline, ev: dict[str, list[int]], clock: _Clock, opts: PageOptions) -> str:
    kinds = [k for k in RETRY_EVENTS if k in ev]
    if not kinds:
        return '<p id="plot-retries" data-n="0">No retries, refusals or failures.</p>'
    tops = [sum(ev[k][i] for k in kinds) for i in range(tl.n)]
    chart = _time_chart("plot-retries", tl, max(tops, default=1) or 1, clock, "events", opts)
    for i in range(tl.n):
        base = 0
        for k in kinds:
            v = ev[k][i]
            if v:
                a = tl.start(i)
                chart.bar(a, a + tl.step, v, k, f"{clock.stamp(a)}: {v} × {k}", base=base, count=v, kind=k)
                base += v
    return chart.render([(k, k) for k in RETRY_EVENTS])


def _plot_durations(hist: dict[str, Any]) -> str:
    bins = hist["bins"]
    lo, hi = bins[0][0], bins[-1][1]
    step, w = nice_step((hi - lo) / 10), hist["width"]
    chart = Chart(
        "plot-durations", lo, hi, max(c for _, _, c in bins),
        x_ticks=ticks(lo, hi, 10, lambda x: number(x, step) + " s", [step]), y_label="series",
        data={"bins": len(bins), "n": hist["n"]},
    )  # fmt: skip
    for a, b, c in bins:
        if c:
            chart.bar(a, b, c, "duration", f"{number(a, w)}–{number(b, w)} s: {c} series", count=c, lo=number(a, w))
    return chart.render([("duration", "series per duration bin (first issue to proof)")])


# -- the page ----------------------------------------------------------------------------

_CSS = (
    'body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;'
    "padding:12px 20px;color:#1b1f24;background:#fff}"
    "h1{font-size:22px;margin:4px 0}"
    "h2{font-size:17px;margin:22px 0 4px;border-bottom:1px solid #d0d7de}"
    ".sub{color:#57606a}"
    ".live{background:#1a7f37;color:#fff;border-radius:4px;padding:1px 6px;font-size:12px}"
    ".cards{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}"
    ".card{border:1px solid #d0d7de;border-radius:6px;padding:6px 12px;min-width:96px}"
    ".card b{display:block;font-size:20px}"
    ".card.failed b{color:#cf222e}"
    ".card.complete b{color:#1a7f37}"
    "table{border-collapse:collapse;font-size:12.5px;margin:6px 0}"
    "td,th{border-bottom:1px solid #eaeef2;padding:2px 8px;text-align:left;vertical-align:top}"
    "th{background:#f6f8fa}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}"
    "code,.uid{font-family:ui-monospace,monospace;font-size:12px}"
    "svg.plot{display:block;margin:2px 0 4px}"
    "svg .grid{stroke:#eaeef2}"
    "svg .axis{stroke:#8c959f}"
    "svg text{font-size:11px;fill:#57606a}"
    "svg .ylabel{font-size:12px}"
    "svg .legend{font-size:11.5px;fill:#1b1f24}"
    "svg .window{fill:#fff8c5}"
    "svg .line{fill:none;stroke-width:2}"
    "svg .line.complete{stroke:#1a7f37}"
    "svg .line.failed{stroke:#cf222e}"
    "svg .line.limit{stroke:#0969da}"
    "svg .dot{r:2}"
    "svg .dot.complete{fill:#1a7f37}"
    "svg .dot.failed{fill:#cf222e}"
    "svg .dot.limit{fill:#0969da}"
    "svg .bar.rate,svg .key.rate{fill:#54aeff}"
    "svg .bar.issued,svg .key.issued{fill:#e4e8ec}"
    "svg .bar.duration,svg .key.duration{fill:#8250df}"
    "svg .bar.short,svg .key.short{fill:#d4a72c}"
    "svg .bar.requeued,svg .key.requeued{fill:#fb8f44}"
    "svg .bar.give_up,svg .key.give_up{fill:#cf222e}"
    "svg .bar.not_found,svg .key.not_found{fill:#6e7781}"
    "svg .key.complete{fill:#1a7f37}"
    "svg .key.failed{fill:#cf222e}"
    "svg .key.limit{fill:#0969da}"
    "svg .mark.drop,svg .key.drop{fill:#cf222e}"
    "svg .mark.recover,svg .key.recover{fill:#1a7f37}"
    "svg .mark.problem,svg .key.problem{fill:#000}"
    ".note{color:#57606a;font-size:12.5px;margin:0 0 4px}"
)

# Runs in the browser after layout: records what it drew, so a headless browser's DOM dump shows it.
_SCRIPT = """
window.addEventListener('load',function(){var out={};
document.querySelectorAll('svg.plot').forEach(function(s){var r=s.getBoundingClientRect();
out[s.id]={width:Math.round(r.width),height:Math.round(r.height),bars:s.querySelectorAll('rect.bar').length,
lines:s.querySelectorAll('polyline.line').length,marks:s.querySelectorAll('.mark').length};});
document.body.setAttribute('data-rendered',JSON.stringify(out));});
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], ident: str, **data: Any) -> str:
    attrs = "".join(f' data-{k}="{escape(str(v))}"' for k, v in data.items())
    out = [f'<table id="{ident}"{attrs}><tr>' + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>"]
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="n"' if isinstance(v, int | float) else ""
            cells.append(f"<td{cls}>{escape('' if v is None else str(v))}</td>")
        out.append(f'<tr class="row">{"".join(cells)}</tr>')
    out.append("</table>")
    return "".join(out)


def _cards(s: dict[str, Any]) -> str:
    keys = ("total", "complete", "failed", "pending", "in_flight", "instances", "seconds")
    cards = []
    for k in keys:
        v = s.get(k)
        shown = _duration(v) if k == "seconds" else str(v)
        label = "first issue to last proof" if k == "seconds" else k.replace("_", " ")
        cards.append(f'<div class="card {k}"><b data-key="{k}" data-value="{v}">{escape(shown)}</b>{label}</div>')
    return '<div class="cards" id="summary">' + "".join(cards) + "</div>"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _series_row(r: tuple[Any, ...], clock: _Clock) -> tuple[Any, ...]:
    seq, line, uid, study, state, expected, received, attempts, seconds, reason, *phi = r
    return (line, uid, study, state, f"{received}/{expected if expected is not None else '?'}", attempts,
            round(seconds, 1) if seconds is not None else None, reason, *phi)  # fmt: skip


def _summary_block(journal: Journal) -> dict[str, Any]:
    counts = journal.counts()
    totals = journal.totals()
    first, last = totals["first_issued_at"], totals["last_finished_at"]
    s = summary(journal, (last - first) if first and last else None)
    s["in_flight"] = counts[State.MOVING.value] + counts[State.VERIFYING.value]
    s["states"] = counts
    if s["seconds"]:
        s["series_per_minute"] = round(counts[State.COMPLETE.value] / s["seconds"] * 60, 2)
        s["instances_per_s"] = round(s["instances"] / s["seconds"], 1)
    return s


def build_page(journal: Journal, now: float | None = None, opts: PageOptions | None = None) -> str:
    """The whole page as one string (see the module docstring)."""
    opts = opts or PageOptions()
    now = time.time() if now is None else now
    db = journal.db
    _connect_helpers(db)
    running = opts.live and journal.has_work()
    span = _span(db, now, running)
    clock = _Clock(opts.timezone or (opts.window.timezone if opts.window else None))
    s = _summary_block(journal)
    batch = journal.meta("batch") or "?"
    title = f"dicom-transfer: {Path(batch).name}"
    head = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="refresh" content="{opts.refresh_s:g}">' if opts.live else "",
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>",
        f'<body data-live="{int(opts.live)}" data-generated="{iso(now)}">',
        f"<h1>{escape(title)} {'<span class=live>live</span>' if opts.live else ''}</h1>",
        f'<p class="sub">journal <code>{escape(str(journal.path))}</code> · '
        f"{'as of' if opts.live else 'written'} {escape(clock.stamp(now))}"
        + (f" · refreshes every {opts.refresh_s:g} s" if opts.live else "") + "</p>",
    ]  # fmt: skip
    body = [_cards(s), _states_line(s)]
    if span is None:
        body.append("<p id=\"no-events\">Nothing has happened yet: no run has started on this journal.</p>")
    else:
        body += _timeline_sections(db, span, running, clock, opts)
    body += _problem_sections(db, opts, clock)
    body += _duration_section(db)
    body += _settings_section(journal, db, opts, clock, span)
    if opts.all_series:
        body += _all_series_section(db, opts, clock)
    foot = f'<p class="sub">dicom-transfer {__version__}</p><script>{_SCRIPT}</script></body></html>'
    return "".join(head + body) + foot


def _states_line(s: dict[str, Any]) -> str:
    states = ", ".join(f"{k} {v}" for k, v in s["states"].items() if v) or "none"
    rate = ""
    if s.get("series_per_minute"):
        rate = f" · {s['series_per_minute']} series/min, {s['instances_per_s']} instances/s (first issue to last proof)"
    return f'<p class="sub" id="states">states: {escape(states)}{escape(rate)}</p>'


def _timeline_sections(
    db: sqlite3.Connection, span: tuple[float, float], running: bool, clock: _Clock, opts: PageOptions
) -> list[str]:
    tl = Timeline.over(*span)
    sb = _series_buckets(db, tl)
    ev = _event_buckets(db, tl)
    points = _limit_points(db, tl, running)
    zone = clock.zone(tl.t0)
    shade = " Shaded: the transfer window." if opts.window is not None else ""
    note = f'<p class="note">Times in {escape(zone)}; one bucket = {number(tl.step)} s.{shade}</p>'
    return [
        "<h2>Series complete over time</h2>", note, _plot_complete(tl, sb, clock, opts),
        "<h2>Instances per second</h2>", _plot_rate(tl, sb, clock, opts),
        "<h2>In-flight limit and throttle events</h2>",
        '<p class="note">The limit halves when the PACS refuses or drops a move and grows back after a run of'
        " completes; 0 between runs. Triangles below the axis: throttle changes and run-level problems.</p>",
        _plot_limit(tl, points, ev, clock, opts),
        "<h2>Retries and failures over time</h2>", _plot_retries(tl, ev, clock, opts),
    ]  # fmt: skip


def _problem_sections(db: sqlite3.Connection, opts: PageOptions, clock: _Clock) -> list[str]:
    out = ["<h2>Reasons</h2>"]
    reasons = _reasons(db, opts.show_phi)
    if reasons:
        out.append('<p class="note">Grouped with numbers and UIDs folded to N; an example of each.</p>')
        out.append(_table(("where", "reason", "count", "example"), reasons, "reasons"))
    else:
        out.append('<p id="reasons">No retries and no failures.</p>')
    total, rows = _failures(db, opts.show_phi)
    out.append(f"<h2>Failed series ({total})</h2>")
    headers = ["line", "SeriesInstanceUID", "StudyInstanceUID", "state", "received", "attempts", "seconds", "reason"]
    if opts.show_phi:
        headers.append("PatientID")
    if total:
        out.append(_table(headers, [_series_row(r, clock) for r in rows], "failures", total=total, shown=len(rows)))
        if total > len(rows):
            more = total - len(rows)
            out.append(f'<p class="note" id="failures-more">… and {more} more (the JSON report lists them all).</p>')
    else:
        out.append('<p id="failures" data-total="0">None.</p>')
    recent = _recent(db, opts.show_phi)
    if recent:
        out.append("<h2>Latest problems</h2>")
        rows2 = [(clock.stamp(at), uid or "(run)", ev, (d or "")[:300]) for at, uid, ev, d in recent]
        out.append(_table(("at", "series", "event", "detail"), rows2, "recent"))
    return out


def _duration_section(db: sqlite3.Connection) -> list[str]:
    hist = _histogram(db)
    out = ["<h2>Per-series durations</h2>"]
    if not hist["n"]:
        return out + ['<p id="plot-durations" data-n="0">No complete series with a duration yet.</p>']
    out.append(
        f'<p class="note">{hist["n"]} complete series moved: median {number(hist["p50"])} s, 90% under'
        f' {number(hist["p90"])} s, 99% under {number(hist["p99"])} s, longest {number(hist["max"])} s.'
        f" Bins of {number(hist['width'])} s"
        + (f"; the last holds all beyond {number(hist['bins'][-1][0], hist['width'])} s." if hist["beyond"] else ".")
        + "</p>"
    )
    return out + [_plot_durations(hist)]


def _settings_section(
    journal: Journal, db: sqlite3.Connection, opts: PageOptions, clock: _Clock, span: tuple[float, float] | None
) -> list[str]:
    out = ["<h2>Runs and settings</h2>"]
    runs = _runs(db)
    if runs:
        rows = [(clock.stamp(at), ev, ", ".join(f"{k}={v}" for k, v in d.items())) for at, ev, d in runs]
        out.append(_table(("at", "event", "detail"), rows, "runs"))
    sql = (
        "SELECT key, substr(value, 1, 200) FROM meta WHERE lower(key) NOT LIKE '%patient%'"
        " AND key != 'planned_at' ORDER BY key"
    )
    meta: list[tuple[str, str]] = list(db.execute(sql))
    if journal.meta("planned_at"):
        meta.append(("planned", clock.stamp(float(journal.meta("planned_at") or 0))))
    steps = steps_summary(journal)
    meta += [(f"step {k}", f"{c['done']} done, {c['failed']} failed, {c['pending']} pending") for k, c in steps.items()]
    out.append(_table(("journal", "value"), meta, "meta"))
    if opts.settings:
        out.append(_table(("config", "value"), [(k, _show(v)) for k, v in opts.settings.items()], "settings"))
    else:
        out.append(
            '<p class="note">The run\'s config is not in the journal: pass --config to show it and to shade the'
            " transfer window.</p>"
        )
    return out


def _show(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, list | tuple) else "" if v is None else str(v)


def _all_series_section(db: sqlite3.Connection, opts: PageOptions, clock: _Clock) -> list[str]:
    headers = ["line", "SeriesInstanceUID", "StudyInstanceUID", "state", "received", "attempts", "seconds", "reason"]
    if opts.show_phi:
        headers.append("PatientID")
    rows = (_series_row(r, clock) for r in _all_series(db, opts.show_phi))
    return ["<h2>All series</h2>", _table(headers, rows, "all-series")]


def flat_settings(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`config_summary`'s nested dict as `transfer.max_in_flight` → value."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_html(journal_path: Path, out: Path, opts: PageOptions | None = None, now: float | None = None) -> Path:
    """Render the page of the journal at `journal_path` into `out` (written atomically)."""
    journal = Journal(journal_path, readonly=True)
    try:
        page = build_page(journal, now, opts)
    finally:
        journal.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def page_options(cfg: Config | None, **kw: Any) -> PageOptions:
    """PageOptions with the config's settings (no passwords, no patient data) and window, when a config is given."""
    if cfg is None:
        return PageOptions(**kw)
    window = None
    if cfg.window is not None:
        window = Window(cfg.window.start, cfg.window.end, cfg.window.timezone, cfg.window.days)
    return PageOptions(window=window, settings=flat_settings(config_summary(cfg)), **kw)
