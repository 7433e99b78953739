"""The HTML report: self-contained, escaped, complete, and working in a real browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from arkv_bench.report import write_report
from fixtures_runs import (
    HOSTILE_DEVICE,
    HOSTILE_PREDICTION,
    HOSTILE_REFERENCE,
    LLAMA,
    build_fixture_results,
    summary_row,
    write_run,
)
from headless_chromium import Chromium, find_chromium

ARTIFACTS = Path(__file__).parent / "_artifacts"
SECTION_IDS = ["comparison", "score-vs-cache", "pareto", "speed", "passkey-heatmap", "layer-stats",
               "samples", "provenance"]


@pytest.fixture
def report(tmp_path: Path) -> Path:
    return write_report([build_fixture_results(tmp_path)], tmp_path / "out" / "report.html")


def section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S)
    assert match, f"section {section_id} missing"
    return match.group(1)


def test_report_is_one_offline_file(report: Path) -> None:
    html = report.read_text()
    assert "http://" not in html and "https://" not in html
    assert "xmlns" not in html
    assert not re.search(r"<(link|img|iframe|object|embed)\b", html)
    assert not re.search(r"\bsrc=", html.replace("src=x", ""))  # the hostile string is escaped text
    assert html.count("<script") == 1  # our sorting script, nothing injected


def test_report_has_every_section_and_figure(report: Path) -> None:
    html = report.read_text()
    for section_id in SECTION_IDS:
        assert f'<section id="{section_id}">' in html
        assert f'href="#{section_id}"' in html
    assert 'id="comparison-table"' in html and 'id="provenance-table"' in html
    for figure_id in ["score-vs-cache-1", "pareto-1", "speed-1", "passkey-heatmap-1", "passkey-heatmap-3",
                      "layer-stats-1"]:
        assert re.search(rf'<figure id="{figure_id}"[^>]*>\s*<svg', html), figure_id
    assert section(html, "passkey-heatmap").count("<svg") == 3  # full, mix@128, window@128
    assert section(html, "layer-stats").count("OQ ratio not measured") == 1  # passkey mix left it empty
    assert "decode tok/s not measured" in section(html, "speed")  # passkey ran on CPU, no timings
    assert section(html, "samples").count('<details class="sample">') == 3 + 6


def test_hostile_strings_are_escaped(report: Path) -> None:
    html = report.read_text()
    for hostile in (HOSTILE_PREDICTION, HOSTILE_REFERENCE, HOSTILE_DEVICE):
        assert hostile not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b onmouseover=alert(3)&gt;H100&lt;/b&gt;" in html
    assert "https:&#47;&#47;evil.example/x.js" in html  # shown as text, not a literal URL


def test_hostile_names_in_tables_and_charts(tmp_path: Path) -> None:
    evil = '<i onclick="x()">t</i>'
    write_run(tmp_path, "evil<run>", config={"model": evil}, summary=[
        summary_row(evil, "s<u>", evil, "full", "full", score=10.0, kv_bytes=100),
        summary_row(evil, "s<u>", evil, evil, 64, score=5.0, kv_bytes=20),
    ])
    html = write_report([tmp_path], tmp_path / "r.html").read_text()
    assert "<i " not in html and "<u>" not in html and "<run>" not in html
    assert "&lt;i onclick=&quot;x()&quot;&gt;t&lt;/i&gt;" in html


def test_missing_data_says_so(tmp_path: Path) -> None:
    write_run(tmp_path, "bare", config={}, summary=[
        summary_row(LLAMA, "gsm8k", "gsm8k", "mix", 512, score=30.0)])
    html = write_report([tmp_path], tmp_path).read_text()  # a folder: report.html inside
    assert (tmp_path / "report.html").is_file()
    for section_id in ("passkey-heatmap", "layer-stats", "samples"):
        assert "no data" in section(html, section_id)
    assert "KV memory not measured" in section(html, "pareto")
    assert "not recorded" in section(html, "provenance")
    assert "no `full` baseline" in section(html, "comparison")


def test_missing_results_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_report([tmp_path / "absent"], tmp_path / "r.html")


def test_sample_browser_limit(tmp_path: Path) -> None:
    results = build_fixture_results(tmp_path)
    html = write_report([results], tmp_path / "r.html", samples_per_task=2).read_text()
    assert section(html, "samples").count('<details class="sample">') == 2 + 2


# ------------------------------------------------------------------------- real browser

SORT_PROBE = """
(() => {
  const table = document.getElementById("comparison-table");
  const headers = Array.from(table.tHead.rows[0].cells);
  const index = headers.findIndex(h => h.dataset.key === "score_pct_of_baseline");
  const rect = headers[index].getBoundingClientRect();
  const values = Array.from(table.tBodies[0].rows).map(r => r.cells[index].getAttribute("data-v"));
  return {x: rect.left + rect.width / 2, y: rect.top + rect.height / 2, values: values};
})()
"""


def _expected(values: list[str], descending: bool) -> list[str]:
    measured = sorted((v for v in values if v), key=float, reverse=descending)
    return measured + [v for v in values if not v]


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    with Chromium(find_chromium(), tmp_path / "profile", width=1200, height=900) as browser:
        browser.open(report)
        before = browser.evaluate(SORT_PROBE)
        assert "" in before["values"]  # qwen has no baseline: empty cells must sort last

        browser.click(before["x"], before["y"])
        ascending = browser.evaluate(SORT_PROBE)["values"]
        assert ascending == _expected(before["values"], descending=False)
        assert ascending != before["values"]

        browser.click(before["x"], before["y"])
        descending = browser.evaluate(SORT_PROBE)["values"]
        assert descending == _expected(before["values"], descending=True)

        assert browser.evaluate("document.title") == "arkv-bench report"
        assert browser.evaluate("document.querySelectorAll('svg').length") >= 15
        assert browser.evaluate("typeof window.alert === 'function' && !document.querySelector('i,b,img')")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "report.png").write_bytes(browser.screenshot(full_page=True))
        assert browser.console_errors() == []
        assert [u for u in browser.requested_urls() if not u.startswith("file:")] == []
