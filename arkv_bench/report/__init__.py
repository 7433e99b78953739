"""Self-contained HTML report of benchmark results (`arkv-bench report`)."""

from arkv_bench.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
