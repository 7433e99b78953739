"""Tiny hand-written SVG charts for the HTML report.

Plotting libraries embed DOCTYPEs, namespaces and metadata links, and the report must not
contain a single URL; the few chart types the report needs are simple enough to draw
directly. Inline SVG inside HTML5 needs no namespace declaration. Every piece of text
passes through `esc`, because labels come from model names, task names and files.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

WIDTH = 540
HEIGHT = 300
LEGEND_WIDTH = 150
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
]
BASELINE_COLOR = "#222222"
MISSING_FILL = "#e5e5e5"


def esc(value: object) -> str:
    """HTML-escape any data shown in the report.

    '://' is also broken with an entity so that text such as a URL inside a prediction
    shows unchanged in the browser but the file never contains a literal URL scheme.
    """
    return html.escape(str(value), quote=True).replace("://", ":&#47;&#47;")


def fmt_num(value: float) -> str:
    """Compact tick/label text: 0.25, 512, 1.5e+06."""
    return f"{value:.4g}"


@dataclass
class Axis:
    """A linear axis: its domain and the ticks (position, label) to draw."""

    label: str
    lo: float
    hi: float
    ticks: list[tuple[float, str]]

    def scale(self, start: float, end: float) -> Callable[[float], float]:
        """Map data values onto the pixel range start..end."""
        span = (self.hi - self.lo) or 1.0
        return lambda value: start + (value - self.lo) / span * (end - start)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering lo..hi."""
    if hi <= lo:
        hi = lo + 1.0
    raw_step = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def numeric_axis(
    label: str,
    values: Sequence[float],
    *,
    include_zero: bool = False,
    upper: float | None = None,
    tick_format: Callable[[float], str] = fmt_num,
) -> Axis:
    """An axis spanning the data (optionally from 0 and/or up to a fixed upper bound)."""
    lo = min(values) if values else 0.0
    hi = max(values) if values else 1.0
    if include_zero:
        lo = min(lo, 0.0)
    if upper is not None:
        hi = max(hi, upper)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    hi += (hi - lo) * 0.05  # headroom: a point or reference line on the top edge stays visible
    ticks = nice_ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    return Axis(label, lo, hi, [(t, tick_format(t)) for t in ticks])


def category_axis(label: str, names: Sequence[str]) -> Axis:
    """Evenly spaced categories at positions 0..n-1 (e.g. cache sizes 64, 128, 1024)."""
    return Axis(label, -0.5, len(names) - 0.5, [(float(i), n) for i, n in enumerate(names)])


@dataclass
class Series:
    """Points of one method; each point carries its tooltip text."""

    label: str
    color: str
    points: list[tuple[float, float, str]] = field(default_factory=list)
    line: bool = True
    dashed: bool = False
    marker: str = "circle"  # "circle", "square" or "diamond"


@dataclass
class HLine:
    """A horizontal reference line, e.g. the full-cache score."""

    y: float
    label: str
    color: str = BASELINE_COLOR


def _open(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
        f"<title>{esc(title)}</title>",
        f'<text class="t" x="{width / 2:.0f}" y="16" text-anchor="middle">{esc(title)}</text>',
    ]


def _marker(kind: str, x: float, y: float, color: str, tip: str) -> str:
    """A point marker with its tooltip; kind "none" draws nothing (line-only series)."""
    if kind == "none":
        return ""
    tooltip = f"<title>{esc(tip)}</title>"
    if kind == "square":
        return (
            f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="{color}" '
            f'stroke="#fff">{tooltip}</rect>'
        )
    if kind == "diamond":
        return (f'<polygon points="{x:.1f},{y - 6:.1f} {x + 6:.1f},{y:.1f} {x:.1f},{y + 6:.1f} {x - 6:.1f},{y:.1f}" '
                f'fill="{color}" stroke="#fff">{tooltip}</polygon>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}" stroke="#fff">{tooltip}</circle>'


def _legend(entries: list[tuple[str, str, str, str]], x: float, top: float) -> list[str]:
    """Legend rows (label, colour, line style, marker); long labels keep the full text as tooltip.

    The line style is "solid", "dashed" or "none" (markers only), as drawn in the plot.
    """
    parts = []
    for index, (label, color, line, marker) in enumerate(entries):
        y = top + 8 + index * 17
        stroke = ""
        if line != "none":
            dash = ' stroke-dasharray="5 3"' if line == "dashed" else ""
            stroke = (f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 18:.1f}" y2="{y:.1f}" '
                      f'stroke="{color}" stroke-width="2"{dash}/>')
        short = label if len(label) <= 20 else label[:19] + "…"
        parts.append(
            f"<g><title>{esc(label)}</title>{stroke}{_marker(marker, x + 9, y, color, label)}"
            f'<text x="{x + 24:.1f}" y="{y + 4:.1f}">{esc(short)}</text></g>'
        )
    return parts


def _line_style(series: Series) -> str:
    if not series.line:
        return "none"
    return "dashed" if series.dashed else "solid"


def _axes(x: Axis, y: Axis, left: float, right: float, top: float, bottom: float) -> list[str]:
    sx, sy = x.scale(left, right), y.scale(bottom, top)
    parts = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" class="frame"/>']
    for value, label in y.ticks:
        py = sy(value)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 5}" y="{py + 4:.1f}" text-anchor="end">{esc(label)}</text>')
    for value, label in x.ticks:
        px = sx(value)
        parts.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" class="axis"/>')
        parts.append(f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">{esc(label)}</text>')
    parts.append(
        f'<text x="{(left + right) / 2:.0f}" y="{bottom + 34}" text-anchor="middle">{esc(x.label)}</text>'
    )
    parts.append(
        f'<text transform="translate(14 {(top + bottom) / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{esc(y.label)}</text>'
    )
    return parts


def xy_chart(title: str, series: list[Series], x: Axis, y: Axis, hlines: Sequence[HLine] = ()) -> str:
    """Lines and/or markers per series, plus horizontal reference lines."""
    left, right, top, bottom = 56.0, float(WIDTH - LEGEND_WIDTH), 28.0, float(HEIGHT - 44)
    sx, sy = x.scale(left, right), y.scale(bottom, top)
    parts = _open(WIDTH, HEIGHT, title) + _axes(x, y, left, right, top, bottom)
    for ref in hlines:
        py = sy(ref.y)
        parts.append(
            f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="{ref.color}" '
            f'stroke-width="1.5" stroke-dasharray="6 4"><title>{esc(ref.label)}: {fmt_num(ref.y)}'
            f"</title></line>"
        )
    for item in series:
        coords = [(sx(px), sy(py), tip) for px, py, tip in item.points]
        if item.line and len(coords) > 1:
            path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy, _ in coords)
            dash = ' stroke-dasharray="5 3"' if item.dashed else ""
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{item.color}" stroke-width="2"{dash}/>'
            )
        parts.extend(_marker(item.marker, cx, cy, item.color, tip) for cx, cy, tip in coords)
    legend = [(s.label, s.color, _line_style(s), s.marker) for s in series]
    legend += [(ref.label, ref.color, "dashed", "none") for ref in hlines]
    parts += _legend(legend, right + 14, top)
    parts.append("</svg>")
    return "\n".join(parts)


def _heat_color(value: float) -> str:
    """0 -> red, 0.5 -> yellow, 1 -> green (retrieval accuracy)."""
    stops = [(0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80))]
    value = min(max(value, 0.0), 1.0)
    for (p0, c0), (p1, c1) in zip(stops, stops[1:], strict=False):
        if value <= p1:
            t = (value - p0) / (p1 - p0)
            rgb = [round(a + (b - a) * t) for a, b in zip(c0, c1, strict=True)]
            return "#" + "".join(f"{c:02x}" for c in rgb)
    return "#1a9850"


def heatmap(
    title: str,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    values: Sequence[Sequence[tuple[float | None, str]]],
    x_label: str,
    y_label: str,
) -> str:
    """A grid of cells coloured by a 0..1 value; None cells are grey and show '—'."""
    left, top = 70.0, 28.0
    cell_w = min(70.0, (WIDTH - left - 20) / max(len(col_labels), 1))
    cell_h = min(32.0, 220.0 / max(len(row_labels), 1))
    width = int(left + cell_w * len(col_labels) + 20)
    height = int(top + cell_h * len(row_labels) + 48)
    parts = _open(max(width, 260), height, title)
    for r, row_label in enumerate(row_labels):
        cy = top + r * cell_h
        parts.append(
            f'<text x="{left - 6}" y="{cy + cell_h / 2 + 4:.1f}" text-anchor="end">{esc(row_label)}</text>'
        )
        for c, (value, tip) in enumerate(values[r]):
            cx = left + c * cell_w
            fill = MISSING_FILL if value is None else _heat_color(value)
            text = "—" if value is None else f"{100 * value:.0f}"
            parts.append(
                f'<g><title>{esc(tip)}</title><rect x="{cx:.1f}" y="{cy:.1f}" width="{cell_w:.1f}" '
                f'height="{cell_h:.1f}" fill="{fill}" stroke="#fff"/>'
                f'<text x="{cx + cell_w / 2:.1f}" y="{cy + cell_h / 2 + 4:.1f}" '
                f'text-anchor="middle">{text}</text></g>'
            )
    bottom = top + cell_h * len(row_labels)
    for c, col_label in enumerate(col_labels):
        cx = left + (c + 0.5) * cell_w
        parts.append(f'<text x="{cx:.1f}" y="{bottom + 15:.1f}" text-anchor="middle">{esc(col_label)}</text>')
    mid_x = left + cell_w * len(col_labels) / 2
    parts.append(f'<text x="{mid_x:.1f}" y="{bottom + 34:.1f}" text-anchor="middle">{esc(x_label)}</text>')
    parts.append(
        f'<text transform="translate(12 {(top + bottom) / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{esc(y_label)}</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def hbar_chart(title: str, bars: Sequence[tuple[str, float | None, str]], unit: str) -> str:
    """Horizontal bars (label, value, colour); a None value says 'not measured'."""
    label_w, top, bar_h = 150.0, 28.0, 20.0
    height = int(top + bar_h * len(bars) + 16)
    right = WIDTH - 70.0
    measured = [v for _, v, _ in bars if v is not None]
    peak = max(measured) if measured else 1.0
    parts = _open(WIDTH, height, title)
    for index, (label, value, color) in enumerate(bars):
        y = top + index * bar_h
        short = label if len(label) <= 24 else label[:23] + "…"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + bar_h / 2 + 4:.1f}" text-anchor="end">'
            f"<title>{esc(label)}</title>{esc(short)}</text>"
        )
        if value is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + bar_h / 2 + 4:.1f}" class="na">not measured</text>')
            continue
        length = (right - label_w) * (value / peak if peak > 0 else 0.0)
        parts.append(
            f'<rect x="{label_w}" y="{y + 3:.1f}" width="{max(length, 0.0):.1f}" height="{bar_h - 6:.1f}" '
            f'fill="{color}"><title>{esc(label)}: {fmt_num(value)} {esc(unit)}</title></rect>'
        )
        parts.append(
            f'<text x="{label_w + max(length, 0.0) + 4:.1f}" y="{y + bar_h / 2 + 4:.1f}">'
            f"{fmt_num(value)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def stacked_columns(
    title: str,
    categories: Sequence[str],
    stacks: Sequence[tuple[str, str, Sequence[float | None]]],
    x_label: str,
    y_label: str,
) -> str:
    """One column per category (e.g. layer) split into stacked parts (label, colour, values)."""
    left, right, top, bottom = 56.0, float(WIDTH - LEGEND_WIDTH), 28.0, float(HEIGHT - 44)
    x = category_axis(x_label, categories)
    if len(categories) > 16:  # keep tick labels readable on deep models
        every = math.ceil(len(categories) / 16)
        x.ticks = x.ticks[::every]
    y = Axis(y_label, 0.0, 1.0, [(t, fmt_num(t)) for t in (0.0, 0.25, 0.5, 0.75, 1.0)])
    sx, sy = x.scale(left, right), y.scale(bottom, top)
    width = (right - left) / max(len(categories), 1) * 0.8
    parts = _open(WIDTH, HEIGHT, title) + _axes(x, y, left, right, top, bottom)
    for index, category in enumerate(categories):
        base = 0.0
        for label, color, values in stacks:
            value = values[index]
            if value is None:
                continue
            y0, y1 = sy(base), sy(base + value)
            parts.append(
                f'<rect x="{sx(index) - width / 2:.1f}" y="{y1:.1f}" width="{width:.1f}" '
                f'height="{max(y0 - y1, 0.0):.1f}" fill="{color}"><title>{esc(x_label)} '
                f"{esc(category)}: {esc(label)} {fmt_num(value)}</title></rect>"
            )
            base += value
    parts += _legend([(label, color, "none", "square") for label, color, _ in stacks], right + 14, top)
    parts.append("</svg>")
    return "\n".join(parts)
