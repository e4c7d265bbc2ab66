"""Reports: JSON keeps every request, CSV one row each, the HTML page's plots are well-formed SVG, and
`llmctl bench compare` sets two runs side by side."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET

from llmctl.bench.html_report import write_html
from llmctl.bench.metrics import rate_steps, summarize
from llmctl.bench.record import Record
from llmctl.bench.report import write_csv, write_json


def run_records(ttft: float, n: int = 20, stepped: bool = False) -> list[Record]:
    return [Record(id=i, start=100.0 + i * 0.5, ttft=ttft + 0.001 * i, itl=[0.02, 0.03], e2e=ttft + 0.05,
                   output_tokens=3, prompt_tokens=4, step=i // 5 if stepped else 0,
                   offered_rate=1.0 + i // 5 if stepped else None, warmup=i == 0) for i in range(n)]


def write_run(path, ttft: float, stepped: bool = False):
    records = run_records(ttft, stepped=stepped)
    summary = summarize(records, {"ttft": 0.15})
    steps = rate_steps(records, 2.5) if stepped else []
    config = {"url": "http://x", "model": "m", "profile": {"kind": "stepped" if stepped else "constant"}}
    write_json(path / "report.json", config, summary, steps, records)
    write_csv(path / "requests.csv", records)
    write_html(path / "report.html", config, summary, steps, records)
    return records


def test_json_csv_and_html(tmp_path):
    records = write_run(tmp_path, 0.1, stepped=True)
    data = json.loads((tmp_path / "report.json").read_text())
    assert [Record.from_dict(r) for r in data["records"]] == records
    assert data["summary"]["requests"] == 19 and len(data["steps"]) == 4
    rows = list(csv.DictReader((tmp_path / "requests.csv").read_text().splitlines()))
    assert len(rows) == 20 and float(rows[3]["ttft_ms"]) == 103.0 and float(rows[3]["itl_max_ms"]) == 30.0
    page = (tmp_path / "report.html").read_text()
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 9  # TTFT, TPOT, E2E over time, TTFT and ITL histograms, tokens/s, in flight, two step plots
    for svg in svgs:
        ET.fromstring(svg)
    assert "throughput against offered load" in page and "<script" not in page and "http://x" in page


def test_compare_shows_both_runs_and_which_is_better(run_bench, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_run(tmp_path / "a", 0.1)
    write_run(tmp_path / "b", 0.2)
    result = run_bench("compare", tmp_path / "a" / "report.json", tmp_path / "b" / "report.json")
    assert result.exit_code == 0, result.output
    ttft_p50 = next(line for line in result.output.splitlines() if "TTFT P50" in line)
    assert "110.00" in ttft_p50 and "210.00" in ttft_p50 and "+90.9%" in ttft_p50  # ids 1..19: median 10
    goodput = next(line for line in result.output.splitlines() if "goodput" in line)
    assert "-100.0%" in goodput  # every B request misses ttft <= 150 ms
    bad = run_bench("compare", tmp_path / "a" / "report.json", tmp_path / "requests.csv")
    assert bad.exit_code == 1 and "cannot read" in bad.output
