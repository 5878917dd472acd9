"""Small inline SVG charts (no JavaScript, no external files): bars, step lines, marks.

A chart maps data coordinates to pixels and collects SVG elements; every element carries
`data-*` attributes with its values, so a test (or a curious reader of the HTML) can check
what was drawn without reading pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 1100, 200
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 26, 30


def nice_step(raw: float, steps: Sequence[float] = (1, 2, 2.5, 5, 10)) -> float:
    """The smallest 'round' number (1, 2, 2.5 or 5 times a power of ten) >= raw."""
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(s * power for s in steps if s * power >= raw - 1e-12 * power)


def number(v: float, step: float | None = None) -> str:
    """A compact label: 1200 → 1.2k, 0.25 → 0.25, 3.0 → 3; with `step` (< 1), as many decimals as it needs."""
    if step is not None and 0 < step < 1:
        return f"{v:.{math.ceil(-math.log10(step) - 1e-9)}f}"
    if abs(v) >= 10_000:
        return f"{v / 1000:.0f}k"
    if abs(v) >= 1000:
        return f"{v / 1000:.1f}k".replace(".0k", "k")
    if v == int(v):
        return str(int(v))
    return f"{v:.2g}" if abs(v) < 1 else f"{v:.1f}"


def _attrs(data: dict[str, object]) -> str:
    return "".join(f' data-{k}="{escape(str(v))}"' for k, v in data.items())


@dataclass
class Chart:
    """One plot: x in [x0, x1], y in [0, y_max]; elements are appended in drawing order."""

    ident: str
    x0: float
    x1: float
    y_max: float
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_label: str = ""
    width: int = WIDTH
    height: int = HEIGHT
    data: dict[str, object] = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        self.y_max = self.y_max if self.y_max > 0 else 1
        self.y_step = nice_step(self.y_max / 4)
        self.y_top = max(self.y_step, math.ceil(self.y_max / self.y_step - 1e-9) * self.y_step)

    def px(self, x: float) -> float:
        inner = self.width - LEFT - RIGHT
        return round(LEFT + (x - self.x0) / (self.x1 - self.x0) * inner, 1)

    def py(self, y: float) -> float:
        inner = self.height - TOP - BOTTOM
        return round(self.height - BOTTOM - min(y, self.y_top) / self.y_top * inner, 1)

    def band(self, a: float, b: float, cls: str, title: str, **data: object) -> None:
        """A shaded vertical band from x=a to x=b (clipped to the chart)."""
        a, b = max(a, self.x0), min(b, self.x1)
        if b <= a:
            return
        x, w = self.px(a), max(self.px(b) - self.px(a), 0.5)
        self.parts.append(
            f'<rect class="{cls}" x="{x}" y="{TOP}" width="{w:.1f}" height="{self.height - TOP - BOTTOM}"'
            f"{_attrs(data)}><title>{escape(title)}</title></rect>"
        )

    def bar(self, a: float, b: float, y: float, cls: str, title: str, base: float = 0.0, **data: object) -> None:
        """A bar over [a, b] from `base` up to `base + y` (stacked bars pass the base)."""
        x, w = self.px(a), max(self.px(b) - self.px(a) - 1, 1.0)
        top, bottom = self.py(base + y), self.py(base)
        self.parts.append(
            f'<rect class="bar {cls}" x="{x}" y="{top}" width="{w:.1f}" height="{max(bottom - top, 0.5):.1f}"'
            f"{_attrs(data)}><title>{escape(title)}</title></rect>"
        )

    def line(self, ident: str, points: Sequence[tuple[float, float]], cls: str, *, step: bool, **data: object) -> None:
        """A polyline through `points` (a staircase when `step`), with one dot per point."""
        xy: list[tuple[float, float]] = []
        for i, (x, y) in enumerate(points):
            if step and i:
                xy.append((self.px(x), self.py(points[i - 1][1])))
            xy.append((self.px(x), self.py(y)))
        coords = " ".join(f"{x},{y}" for x, y in xy)
        last = points[-1][1] if points else 0
        self.parts.append(
            f'<polyline id="{ident}" class="line {cls}" points="{coords}" data-points="{len(points)}"'
            f' data-last="{number(last) if last != int(last) else int(last)}"{_attrs(data)}/>'
        )
        if len(points) <= 400:
            self.parts.extend(
                f'<circle class="dot {cls}" cx="{self.px(x)}" cy="{self.py(y)}" r="2"/>' for x, y in points
            )

    def mark(self, x: float, cls: str, title: str, **data: object) -> None:
        """A small triangle under the plot area at x (an event: a throttle drop, a refusal)."""
        px, y = self.px(x), self.height - BOTTOM + 1
        self.parts.append(
            f'<path class="mark {cls}" d="M{px},{y} l-4,8 h8 z"{_attrs(data)}><title>{escape(title)}</title></path>'
        )

    def render(self, legend: Iterable[tuple[str, str]] = ()) -> str:
        """The `<svg>` element: grid, axes, ticks, then the elements, then a legend."""
        out = [
            f'<svg id="{self.ident}" class="plot" viewBox="0 0 {self.width} {self.height}" width="100%"'
            f' role="img" preserveAspectRatio="xMidYMid meet"{_attrs(self.data)}>'
        ]
        y = 0.0
        while y <= self.y_top + 1e-9:
            out.append(
                f'<line class="grid" x1="{LEFT}" x2="{self.width - RIGHT}" y1="{self.py(y)}" y2="{self.py(y)}"/>'
                f'<text class="tick" x="{LEFT - 6}" y="{self.py(y) + 4}" text-anchor="end">{number(y)}</text>'
            )
            y += self.y_step
        for x, label in self.x_ticks:
            if self.x0 <= x <= self.x1:
                out.append(
                    f'<line class="axis" x1="{self.px(x)}" x2="{self.px(x)}" y1="{self.height - BOTTOM}"'
                    f' y2="{self.height - BOTTOM + 4}"/><text class="tick" x="{self.px(x)}"'
                    f' y="{self.height - 8}" text-anchor="middle">{escape(label)}</text>'
                )
        out.append(
            f'<line class="axis" x1="{LEFT}" x2="{self.width - RIGHT}" y1="{self.height - BOTTOM}"'
            f' y2="{self.height - BOTTOM}"/>'
        )
        if self.y_label:
            out.append(
                f'<text class="ylabel" transform="translate(14,{(self.height - BOTTOM + TOP) / 2}) rotate(-90)"'
                f' text-anchor="middle">{escape(self.y_label)}</text>'
            )
        out.extend(self.parts)
        lx = LEFT + 8
        for cls, label in legend:
            out.append(
                f'<rect class="key {cls}" x="{lx}" y="5" width="10" height="10"/>'
                f'<text class="legend" x="{lx + 14}" y="14">{escape(label)}</text>'
            )
            lx += 24 + 7 * len(label)
        out.append("</svg>")
        return "".join(out)


def ticks(x0: float, x1: float, target: int, label: Callable[[float], str], steps: Sequence[float]) -> list[
    tuple[float, str]
]:
    """About `target` ticks at multiples of the smallest of `steps` that gives no more than that."""
    span = max(x1 - x0, 1e-9)
    step = next((s for s in steps if span / s <= target), steps[-1] * math.ceil(span / target / steps[-1]))
    first = math.ceil(x0 / step) * step
    out = []
    x = first
    while x <= x1 + 1e-9:
        out.append((x, label(x)))
        x += step
    return out
