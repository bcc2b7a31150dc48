"""Line charts as inline SVG: the report's loss curves, drawn without matplotlib (which stays
optional) and without scripts, so that the page opens offline in any browser.

A point (x, y) goes to pixel (left + (x - x0) / (x1 - x0) · width, top + (1 - (v - v0) / (v1 - v0))
· height), where v is y, or log10(y) on a log axis: the y axis grows upwards, the SVG's downwards.
"""
import math
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 680, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 36, 44  # margins: room for the tick labels and the legend
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (x, y), x increasing
    colour: str
    dashed: bool = False
    markers: bool = False  # a dot at each point, with its value on hover (few points: evaluations)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round numbers (1, 2 or 5 times a power of ten apart) from low to high, about `count`."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2 and 5 times each power of ten between low and high (> 0); within less than a decade,
    round numbers instead."""
    ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)))
             for m in (1, 2, 5)]
    ticks = [t for t in ticks if low <= t <= high]
    return ticks if len(ticks) >= 3 else nice_ticks(low, high)


def label(value: float) -> str:
    return f"{value:.4g}"


class Axes:
    """Where the data's x and y go on the page (the formula at the top of this file)."""

    def __init__(self, xs: list[float], ys: list[float], log_y: bool):
        self.log_y = log_y and min(ys) > 0  # (a loss of 0 has no place on a log axis)
        self.x0, self.x1 = min(xs), max(xs)
        if self.x1 == self.x0:
            self.x1 = self.x0 + 1
        values = [self.value(y) for y in ys]
        pad = (max(values) - min(values)) * 0.05 or 0.5  # a margin above and below the curves
        self.v0, self.v1 = min(values) - pad, max(values) + pad

    def value(self, y: float) -> float:
        return math.log10(y) if self.log_y else y

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return TOP + (1 - (self.value(y) - self.v0) / (self.v1 - self.v0)) * (HEIGHT - TOP - BOTTOM)

    def y_range(self) -> tuple[float, float]:
        if self.log_y:
            return 10 ** self.v0, 10 ** self.v1
        return self.v0, self.v1


def line_chart(series: list[Series], x_label: str, y_label: str, log_y: bool = True) -> str:
    """An <svg> element with the series as polylines, axes with round ticks, and a legend."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return '<p class="empty">(nothing logged yet)</p>'
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    axes = Axes(xs, ys, log_y)
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(y_label)}">',
             f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" '
             'fill="none" stroke="#bbb"/>']
    for tick in nice_ticks(axes.x0, axes.x1):
        x = axes.px(tick)
        parts.append(f'<line x1="{x:.2f}" y1="{bottom}" x2="{x:.2f}" y2="{bottom + 4}" '
                     'stroke="#888"/>')
        parts.append(f'<text x="{x:.2f}" y="{bottom + 16}" text-anchor="middle">'
                     f'{label(tick)}</text>')
    low, high = axes.y_range()
    for tick in (log_ticks(low, high) if axes.log_y else nice_ticks(low, high)):
        y = axes.py(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.2f}" x2="{right}" y2="{y:.2f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.2f}" text-anchor="end">{label(tick)}</text>')
    parts.append(f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    scale = " (log scale)" if axes.log_y else ""
    parts.append(f'<text x="{LEFT}" y="{TOP - 22}">{escape(y_label + scale)}</text>')
    for s in drawn:
        points = " ".join(f"{axes.px(x):.2f},{axes.py(y):.2f}" for x, y in s.points)
        dash = ' stroke-dasharray="6 3"' if s.dashed else ""
        parts.append(f'<polyline data-series="{escape(s.label)}" points="{points}" fill="none" '
                     f'stroke="{s.colour}" stroke-width="1.5"{dash}/>')
        if s.markers:
            for x, y in s.points:
                parts.append(f'<circle cx="{axes.px(x):.2f}" cy="{axes.py(y):.2f}" r="3" '
                             f'fill="{s.colour}"><title>{escape(s.label)}, step {label(x)}: '
                             f'{y:.4f}</title></circle>')
    parts.extend(legend(drawn, right))
    parts.append("</svg>")
    return "\n".join(parts)


def legend(series: list[Series], right: float) -> list[str]:
    """The series' names in a row above the plot, right-aligned, each after a stroke of its
    colour."""
    parts, x = [], right
    for s in reversed(series):
        width = 7 * len(s.label) + 30  # (an estimate: SVG cannot measure text without a script)
        x -= width
        dash = ' stroke-dasharray="6 3"' if s.dashed else ""
        parts.append(f'<line x1="{x:.0f}" y1="{TOP - 8}" x2="{x + 20:.0f}" y2="{TOP - 8}" '
                     f'stroke="{s.colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{x + 24:.0f}" y="{TOP - 4}">{escape(s.label)}</text>')
    return parts
