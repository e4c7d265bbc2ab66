"""Prometheus metrics: names, labels and values after known requests; the Grafana dashboard uses only them."""

from __future__ import annotations

import json
import re
import threading
from importlib import resources

import pytest

httpx = pytest.importorskip("httpx")

LENGTH = 'llmctl:request_success_total{finished_reason="length"}'


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_counters_and_histograms_count_a_known_request(server, scrape):
    before = scrape(server.url)
    body = {"prompt": [1, 2, 3], "n": 2, "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200
    after = scrape(server.url)
    assert delta(before, after, "llmctl:prompt_tokens_total") == 2 * 3
    assert delta(before, after, "llmctl:generation_tokens_total") == 2 * 5
    assert delta(before, after, LENGTH) == 2
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(before, after, f"llmctl:{name}_count") == 2
    assert delta(before, after, "llmctl:inter_token_latency_seconds_count") == 2 * 4
    assert after["llmctl:num_requests_running"] == after["llmctl:num_requests_waiting"] == 0
    assert after["llmctl:kv_cache_usage_perc"] == 0.0
    text = httpx.get(f"{server.url}/metrics").text
    assert 'llmctl:num_requests_running{model_name="tiny"} 0.0' in text


def test_gauges_while_requests_run_and_wait(new_engine, serve, slow_steps, until, scrape):
    eng = new_engine(max_num_seqs=1)
    slow_steps(eng, 0.02)
    with serve(eng) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as first:
            lines = first.iter_lines()
            next(lines)
            # A queued stream answers only with its first token, so this one waits in a thread.
            second = threading.Thread(target=httpx.post, args=(f"{server.url}/v1/completions",),
                                      kwargs={"json": {**body, "max_tokens": 1}, "timeout": 30})
            second.start()
            until(lambda: server.app.state.server.admission.in_flight == 2)
            now = scrape(server.url)
            assert now["llmctl:num_requests_running"] == 1 and now["llmctl:num_requests_waiting"] == 1
            assert 0 < now["llmctl:kv_cache_usage_perc"] < 1
        second.join(30)


def test_the_grafana_dashboard_charts_exported_metrics(server, scrape):
    path = resources.files("llmctl.runtime.server").joinpath("grafana-dashboard.json")
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    charted = {re.sub(r"_(bucket|total)$", "", m) for e in exprs for m in re.findall(r"llmctl:[a-z0-9_]+", e)}
    exported = {re.sub(r"_(bucket|count|sum|total|created)$", "", sample.split("{")[0])
                for sample in scrape(server.url)}
    assert charted == exported
    assert all('model_name=~"$model_name"' in e for e in exprs)


def test_http_responses_are_counted_by_route_method_and_status(server, scrape):
    def count(handler, method, status):
        return f'llmctl:http_requests_total{{handler="{handler}",method="{method}",status="{status}"}}'

    before = scrape(server.url)
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "frobnicate": 1}).status_code == 400
    for path in ("/no/such/path", "/wp-admin/x.php"):  # any path outside the routes counts as "other"
        assert httpx.get(f"{server.url}{path}").status_code == 404
    after = scrape(server.url)
    assert delta(before, after, count("/v1/completions", "POST", 200)) == 1
    assert delta(before, after, count("/v1/completions", "POST", 400)) == 1
    assert delta(before, after, count("other", "GET", 404)) == 2
    assert delta(before, after, count("/metrics", "GET", 200)) == 1  # the scrape before this one
    assert not [name for name in after if "wp-admin" in name or "no/such" in name]


def test_metrics_under_vllms_prefix(engine, serve, scrape):
    """--metrics-prefix vllm: the same series as vllm:..., for dashboards and alerts made for vLLM."""
    with serve(engine, metrics_prefix="vllm") as server:
        names = {name.split("{")[0] for name in scrape(server.url)}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total"} <= names
    assert not [n for n in names if n.startswith("llmctl:")]


def test_the_dashboard_picks_its_data_source_from_a_variable():
    """Under Grafana's file provisioning `__inputs` are never filled in: every panel and target reads the
    data source from the dashboard's own `datasource` variable."""
    text = resources.files("llmctl.runtime.server").joinpath("grafana-dashboard.json").read_text()
    dashboard = json.loads(text)
    assert "__inputs" not in dashboard and "DS_PROMETHEUS" not in text
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    sources = [p["datasource"] for p in dashboard["panels"]] + [t["datasource"] for p in dashboard["panels"]
                                                               for t in p["targets"]]
    assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources)
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"HTTP responses by status", "Errors and rejections"} <= titles


def test_speculative_decoding_counters_and_unchanged_answers(server, new_engine, serve, scrape):
    """vLLM's spec_decode counters; a speculating server's greedy answer, whole and streamed, equals the
    plain one's."""
    body = {"prompt": [5, 6, 7, 8, 9] * 6, "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    want = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    with serve(new_engine(speculative={"method": "ngram", "num_tokens": 4})) as spec_server:
        got = httpx.post(f"{spec_server.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        with httpx.stream("POST", f"{spec_server.url}/v1/completions", json={**body, "stream": True},
                          timeout=30) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        after = scrape(spec_server.url)
    assert got == want == "".join(c["choices"][0]["text"] for c in chunks)
    assert after["llmctl:spec_decode_num_drafts_total"] > 0
    assert 0 <= after["llmctl:spec_decode_num_accepted_tokens_total"] <= after["llmctl:spec_decode_num_draft_tokens_total"]
