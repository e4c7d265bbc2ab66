"""Just enough plotting for the HTML report: scatter / line charts and histograms as inline SVG strings,
so the report is one self-contained file and the bench needs no plotting library."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

W, H = 600, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 46  # margins, px
COLORS = ("#2f6fb0", "#d9772b", "#3a9a5b", "#b03a4a")
MAX_POINTS = 4000  # a scatter beyond this is thinned evenly: the browser stays quick, the shape stays


@dataclass
class Series:
    name: str
    xs: list[float]
    ys: list[float]
    line: bool = False
    dots: bool = True  # a line's points marked; off for long series (a step function of thousands)


@dataclass
class Rule:
    """A threshold drawn across a chart (an SLO): horizontal on a chart's y axis, vertical on a histogram's x."""

    name: str
    value: float


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


class _Frame:
    """Axes from data ranges to pixels, with ticks, labels and a title."""

    def __init__(self, x_range, y_range, title: str, xlabel: str, ylabel: str) -> None:
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
                      'font-family="sans-serif" font-size="11">',
                      f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
                      f'{escape(title)}</text>',
                      f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{escape(xlabel)}</text>',
                      f'<text x="14" y="{H / 2}" text-anchor="middle" transform="rotate(-90 14 {H / 2})">'
                      f'{escape(ylabel)}</text>']
        for t in _ticks(self.x0, self.x1):
            x = self.px(t)
            self.parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="#eee"/>'
                              f'<text x="{x:.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            self.parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
                              f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        self.parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
                          'fill="none" stroke="#888"/>')

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return H - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (H - TOP - BOTTOM)

    def legend(self, names: list[str]) -> None:
        for i, name in enumerate(names):
            x = LEFT + 10 + i * 150
            self.parts.append(f'<rect x="{x}" y="{TOP + 6}" width="10" height="10" fill="{COLORS[i % 4]}"/>'
                              f'<text x="{x + 14}" y="{TOP + 15}">{escape(name)}</text>')

    def rule(self, rule: Rule, horizontal: bool) -> None:
        if horizontal:
            x1, x2, y1, y2 = LEFT, W - RIGHT, self.py(rule.value), self.py(rule.value)
            label = f'<text x="{W - RIGHT - 4}" y="{y1 - 4:.1f}" text-anchor="end" fill="#c00">'
        else:
            x1, x2, y1, y2 = self.px(rule.value), self.px(rule.value), TOP, H - BOTTOM
            label = f'<text x="{x1 + 4:.1f}" y="{TOP + 30}" fill="#c00">'
        self.parts.append(f'<line class="slo" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                          f'stroke="#c00" stroke-dasharray="6 4"/>{label}{escape(rule.name)}</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def chart(series: list[Series], title: str, xlabel: str, ylabel: str, rules: list[Rule] = ()) -> str:
    """Scatter or line series on shared axes, and `rules` as dashed horizontal lines (the y range holds them)."""
    xs = [x for s in series for x in s.xs] or [0.0]
    ys = [y for s in series for y in s.ys] + [r.value for r in rules] or [0.0]
    frame = _Frame((min(0.0, min(xs)), max(xs)), (0.0, max(ys) * 1.08), title, xlabel, ylabel)
    if not any(s.xs for s in series):
        frame.parts.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#888">no samples</text>')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = list(zip(s.xs, s.ys))
        if s.line:
            path = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in points)
            frame.parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            frame.parts += [f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3" fill="{color}"/>'
                            for x, y in points if s.dots]
        else:
            stride = max(1, math.ceil(len(points) / MAX_POINTS))
            frame.parts += [f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="1.6" fill="{color}" '
                            'fill-opacity="0.6"/>' for x, y in points[::stride]]
    for rule in rules:
        frame.rule(rule, horizontal=True)
    if len(series) > 1:
        frame.legend([s.name for s in series])
    return frame.svg()


def histogram(values: list[float], title: str, xlabel: str, bins: int = 40, rules: list[Rule] = ()) -> str:
    """Counts in `bins` bars, and `rules` as dashed vertical lines (the x range holds them)."""
    if not values:
        return chart([], title, xlabel, "count")
    lo, hi = min(values), max([*values, *(r.value for r in rules)])
    ticks = _ticks(lo, hi)
    if len(ticks) > 1:  # start the bars at a tick, so the axis is labelled from its left end
        lo = math.floor(lo / (ticks[1] - ticks[0])) * (ticks[1] - ticks[0])
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    frame = _Frame((lo, lo + width * bins), (0.0, max(counts) * 1.08), title, xlabel, "count")
    for i, c in enumerate(counts):
        x0, x1 = frame.px(lo + i * width), frame.px(lo + (i + 1) * width)
        frame.parts.append(f'<rect x="{x0:.1f}" y="{frame.py(c):.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                           f'height="{frame.py(0) - frame.py(c):.1f}" fill="{COLORS[0]}"/>')
    for rule in rules:
        frame.rule(rule, horizontal=False)
    return frame.svg()
