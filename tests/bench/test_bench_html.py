"""The HTML page's structure, read back with html.parser: the run's metadata, stepped rates as a table, TTFT
and E2E on plots of their own, SLO thresholds drawn on the latency plots, error causes."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from llmctl.bench.html_report import render
from llmctl.bench.metrics import rate_steps, summarize
from llmctl.bench.record import Record


class Page(HTMLParser):
    """Tables by class (rows of cell texts) and each SVG's title with its SLO lines."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.svgs: list[dict] = []
        self._table = self._row = self._cell = None
        self._text: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "svg":
            self.svgs.append({"title": None, "slo": 0, "texts": []})
        elif tag == "text" and self.svgs:
            self._text = []
        elif tag == "line" and self.svgs and attrs.get("class") == "slo":
            self.svgs[-1]["slo"] += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "text" and self._text is not None:
            text = "".join(self._text)
            svg = self.svgs[-1]
            svg["texts"].append(text)
            svg["title"] = svg["title"] or text
            self._text = None

    def handle_data(self, data):
        for part in (self._cell, self._text):
            if part is not None:
                part.append(data)


def stepped_records() -> list[Record]:
    records = [Record(id=i, start=100.0 + i * 0.5, ttft=0.1 + 0.001 * i, itl=[0.02, 0.03], e2e=0.15 + 0.01 * i,
                      output_tokens=3, prompt_tokens=4, step=i // 5, offered_rate=1.0 + i // 5) for i in range(20)]
    records.append(Record(id=20, start=101.0, status="http_500", error="overloaded: 17 queued", e2e=0.01, step=0,
                          offered_rate=1.0))
    return records


def page(slo: dict | None) -> Page:
    records = stepped_records()
    summary = summarize(records, slo)
    meta = {"started_at": "2026-12-04T22:00:00+00:00", "written_at": "2026-12-04T22:05:00+00:00",
            "llmctl": "0.1.0", "python": "3.12.1", "platform": "Linux", "model": "m",
            "server_version": {"version": "0.9.1"}}
    return Page(render({"url": "http://x", "model": "m"}, summary, rate_steps(records, 2.5), records, meta))


def test_steps_table_metadata_and_error_causes():
    p = page(None)
    steps = p.tables["steps"]
    assert steps[0][:2] == ["offered req/s", "achieved req/s"]
    assert [row[0] for row in steps[1:]] == ["1.00", "2.00", "3.00", "4.00"]  # one row a step
    meta = dict((row[0], row[1]) for row in p.tables["meta"][1:])
    assert meta["started (UTC)"] == "2026-12-04T22:00:00+00:00" and meta["llmctl"] == "0.1.0"
    assert meta["server's /version"] == "{'version': '0.9.1'}" and meta["model"] == "m"
    assert p.tables["errors"][1] == ["1", "http_500", "overloaded: # queued"]
    latency_header = p.tables[""][0]
    assert latency_header == ["ms", "mean", "std", "min", "P50", "P90", "P95", "P99", "P99.9", "max", "samples"]


def test_ttft_and_e2e_have_plots_of_their_own_with_slo_lines():
    titled = {svg["title"]: svg for svg in page({"ttft": 0.15, "e2e": 0.3}).svgs}
    assert {"TTFT over time", "E2E over time", "requests in flight", "output tokens/s (1 s windows)"} <= set(titled)
    assert not any("TTFT" in t and "E2E" in t for t in titled)  # no plot shares their axis
    assert titled["TTFT over time"]["slo"] == 1 and "SLO TTFT 150 ms" in titled["TTFT over time"]["texts"]
    assert titled["E2E over time"]["slo"] == 1 and "SLO E2E 300 ms" in titled["E2E over time"]["texts"]
    assert titled["TTFT"]["slo"] == 1 and titled["TTFT against offered load"]["slo"] == 1  # histogram, steps
    assert titled["TPOT over time"]["slo"] == 0 and titled["inter-token latency"]["slo"] == 0
    assert sum(svg["slo"] for svg in page(None).svgs) == 0


def test_slo_line_sits_at_its_value():
    svg = next(s for s in re.findall(r"<svg.*?</svg>", render_one(), re.S) if "E2E over time" in s)
    line = re.search(r'<line class="slo" x1="[\d.]+" y1="([\d.]+)" x2="[\d.]+" y2="([\d.]+)"', svg)
    assert line[1] == line[2]  # horizontal
    ticks = {float(v.replace(",", "")): float(y) for y, v in
             re.findall(r'<text x="60" y="([\d.]+)" text-anchor="end">([\d.,]+)</text>', svg)}
    # y of 300 ms from two labelled ticks (their text sits 4 px below the grid line)
    (v0, y0), (v1, y1) = sorted(ticks.items())[:2]
    assert float(line[1]) == pytest.approx(y0 - 4 + (300 - v0) / (v1 - v0) * (y1 - y0), abs=0.11)


def render_one() -> str:
    records = stepped_records()
    return render({}, summarize(records, {"e2e": 0.3}), [], records)

