"""`llmctl bench`: load-test any OpenAI-compatible server (serve), put two runs side by side (compare), and
measure the engine offline without HTTP (throughput, latency)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import typer

from llmctl.cli import engine_options
from llmctl.cli.console import NORMAL, console, emit, err_console, fail, start_output

app = typer.Typer(help="Measure a served model (TTFT, ITL, E2E, throughput) or the engine itself.",
                  no_args_is_help=True)

RATE_TYPE_HELP = ("GuideLLM's load kinds: synchronous (one at a time), concurrent (--max-concurrency streams), "
                  "throughput (all at once), constant (--request-rate, even gaps), poisson (--request-rate, Poisson "
                  "arrivals), sweep (GuideLLM's: a synchronous benchmark, a throughput one, then constant rates "
                  "evenly spaced between their achieved rates, --rate N benchmarks in all (default 10), each run "
                  "for --duration or --num-prompts; one report of them all, each one's own in its directory); "
                  "llmctl's ramp, spike and stepped (one run from --request-rate up, --rate-step per "
                  "--step-duration, until saturated). Default: vLLM's --request-rate and --burstiness decide.")
FAIL_ON_HELP = ("NAME=LIMIT: exit 4 when the run crosses it (repeat for more; space-separated in the environment). "
                "NAME is error_rate (a fraction), "
                "{mean|p50|p90|p95|p99}_{ttft|tpot|itl|e2e}_ms (ceilings), or min_request_throughput, "
                "min_output_throughput, min_goodput (floors, per second). E.g. --fail-on p99_ttft_ms=500. A sweep "
                "checks error_rate on every benchmark and any other threshold on the benchmark best at it.")
EXIT_ALL_FAILED = 3  # every measured request failed
EXIT_CROSSED = 4  # a --fail-on threshold was crossed
DEFAULT_NUM_PROMPTS = 1000  # vLLM's, where neither --num-prompts nor --duration bounds the run


@app.command(context_settings={"allow_extra_args": True})
def serve(
    ctx: typer.Context,
    base_url: str = typer.Option(..., "--base-url", "--url", envvar="LLMCTL_BENCH_URL",
                                 help="Server base URL, e.g. http://127.0.0.1:8000."),
    endpoint: str = typer.Option("/v1/completions", help="API path: /v1/completions or /v1/chat/completions."),
    model: str = typer.Option(None, envvar="LLMCTL_BENCH_MODEL", show_default=False,
                              help="Model name (default: the first the server lists at /v1/models)."),
    api_key: str = typer.Option(None, envvar="LLMCTL_API_KEY", help="Bearer token.", show_default=False),
    dataset_name: str = typer.Option("random", help="random (--input-len, --output-len), sharegpt (--dataset-path: "
                                     "ShareGPT JSON/JSONL) or trace (--dataset-path: JSONL of timestamp, "
                                     "input_length, output_length, sent at those times)."),
    dataset_path: Path = typer.Option(None, help="The sharegpt or trace file.", show_default=False),
    num_prompts: int = typer.Option(None, "--num-prompts", "--requests", show_default=False,
                                    help=f"Measured requests to send (default {DEFAULT_NUM_PROMPTS}, or as many as "
                                    "--duration allows; a trace: its lines; a sweep: each benchmark's)."),
    request_rate: float = typer.Option(float("inf"), "--request-rate", "--rate",
                                       help="Requests/s arriving (open loop); inf: all at once, as fast as "
                                       "--max-concurrency allows. A sweep: its benchmarks in all (default 10)."),
    burstiness: float = typer.Option(1.0, help="Arrival gaps' gamma shape: 1 Poisson, <1 burstier, >1 more even."),
    max_concurrency: int = typer.Option(None, "--max-concurrency", "--concurrency", show_default=False,
                                        help="Most requests in flight (default: unlimited, every request)."),
    rate_type: str = typer.Option(None, help=RATE_TYPE_HELP, show_default=False),
    ramp_from: int = typer.Option(1, help="Ramp: users at the start (--max-concurrency at the end)."),
    spike_users: int = typer.Option(0, help="Spike: users during the spike (--max-concurrency before and after)."),
    spike_at: float = typer.Option(0.0, help="Spike: seconds into the run."),
    spike_for: float = typer.Option(0.0, help="Spike: seconds it lasts."),
    rate_step: float = typer.Option(0.0, help="Stepped: rate added each step (0: the first rate)."),
    step_duration: float = typer.Option(10.0, help="Stepped: seconds per step."),
    max_rate: float = typer.Option(None, help="Stepped: last rate to try.", show_default=False),
    duration: float = typer.Option(None, envvar="LLMCTL_BENCH_DURATION", show_default=False,
                                   help="Seconds to run (a sweep: each benchmark's)."),
    warmup: int = typer.Option(0, help="Requests sent first and left out of the statistics."),
    input_len: str = typer.Option("128", "--input-len", "--random-input-len",
                                  help="Random prompts' tokens after any shared prefix, as the server counts them "
                                  "(BOS, chat template): N, uniform:LO,HI or normal:MEAN,STD. Exact with a tokenizer "
                                  "(--tokenizer, or the server's /tokenize), else about a word a token."),
    output_len: str = typer.Option(None, "--output-len", "--random-output-len", show_default=False,
                                   help="max_tokens: N, uniform:LO,HI or normal:MEAN,STD (default 128; sharegpt: "
                                   "each answer's length, or N for all)."),
    prompts: Path = typer.Option(None, help="JSONL file of {\"prompt\"} or {\"messages\"} (+ max_tokens).",
                                 show_default=False),
    shared_prefix: int = typer.Option(0, help="Tokens of one shared prefix leading every prompt."),
    tokenizer: str = typer.Option(None, help="Tokenizer directory for exact prompts and token counts (default: "
                                  "--model if a directory, else the server's POST /tokenize).", show_default=False),
    ignore_eos: bool = typer.Option(False, help="Ask for exactly max_tokens (vLLM's extension; not every server)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature sent."),
    extra_body: str = typer.Option(None, help="JSON merged into every request body.", show_default=False),
    goodput: list[str] = typer.Option(None, "--goodput", metavar="NAME:MS", show_default=False,
                                      help="Goodput SLOs, vLLM's: ttft:MS, tpot:MS, e2el:MS (several after one "
                                      "--goodput, or repeat it)."),
    percentile_metrics: str = typer.Option(None, show_default=False,
                                           help="Metrics of the percentile table: a comma list of ttft, tpot, itl, "
                                           "e2el (default ttft,tpot,itl)."),
    metric_percentiles: str = typer.Option(None, show_default=False,
                                           help="Its percentiles, e.g. 50,90,99 (default 99)."),
    save_result: bool = typer.Option(False, help="Also write vLLM's result JSON."),
    result_dir: Path = typer.Option(None, help="Its directory (default: --out).", show_default=False),
    result_filename: str = typer.Option(None, show_default=False, help="Its name (default "
                                        "openai-{rate}qps[-concurrency{N}]-{model}-{time}.json, as vLLM's)."),
    fail_on: list[str] = typer.Option(None, "--fail-on", envvar="LLMCTL_BENCH_FAIL_ON", metavar="NAME=LIMIT",
                                      help=FAIL_ON_HELP, show_default=False),
    timeout: float = typer.Option(300.0, help="Seconds a request may take before it counts as a timeout."),
    workers: int = typer.Option(1, envvar="LLMCTL_BENCH_WORKERS", help="Locust worker processes (>1: master + N)."),
    web: bool = typer.Option(False, help="Run locust's web UI (127.0.0.1) and drive the users from it."),
    web_port: int = typer.Option(8089, help="Port of locust's web UI."),
    seed: int = typer.Option(0, help="Seed for prompts, lengths, dataset order and arrivals."),
    out: Path = typer.Option(None, help="Directory for the report (default bench-results/<time>).", show_default=False),
    profile: str = typer.Option(None, hidden=True, help="Gone: see --rate-type."),
    output: str = typer.Option("text", "--output", help="text, or json: the result as one document on stdout."),
) -> None:
    """Load-test an OpenAI-compatible server with locust and report TTFT, TPOT, ITL, E2E and throughput.

    The flags are vLLM's (`vllm bench serve`), plus GuideLLM's --rate-type. A sweep runs locust once a benchmark,
    each bounded like a single run (--duration, --num-prompts, --warmup), and says each one's rates as it ends;
    --output json gives every benchmark's summary. Exit codes: 0 the run finished (and every --fail-on threshold
    held); 1 bad input, or no run (the server unreachable, locust failed, no request finished); 2 a malformed
    command line; 3 every measured request failed; 4 a --fail-on threshold was crossed.
    """
    from llmctl.bench import datasets, runner, verdict, vllm_result, workload
    from llmctl.bench.load import Load
    from llmctl.bench.sweep import Sweep
    from llmctl.bench.tokens import FileTokens, ServerTokens
    from llmctl.bench.verdict import Threshold

    start_output(output)
    try:
        _refuse_old_flags(profile, endpoint, ctx.args, goodput)
        if dataset_name not in datasets.DATASETS:
            raise ValueError(f"unknown --dataset-name {dataset_name!r}; choose one of {', '.join(datasets.DATASETS)}")
        if (dataset_name == "random") != (dataset_path is None):
            raise ValueError("--dataset-path goes with --dataset-name sharegpt or trace, and they need it")
        if prompts is not None and dataset_name != "random":
            raise ValueError("--prompts is a dataset of its own: leave out --dataset-name")
        if workers < 1 or timeout <= 0:
            raise ValueError(f"need --workers >= 1 and --timeout > 0, got {workers} and {timeout}")
        if web and (rate_type or request_rate != float("inf") or dataset_name == "trace"):
            raise ValueError("--web drives the users from locust's UI; leave out --rate-type, --request-rate and "
                             "a trace")
        trace = datasets.trace(dataset_path) if dataset_name == "trace" else None
        if trace and num_prompts:
            trace = trace[:num_prompts]
        requests = len(trace) if trace else num_prompts or (None if duration or web else DEFAULT_NUM_PROMPTS)
        load = Load(rate_type=rate_type, request_rate=request_rate, burstiness=burstiness,
                    max_concurrency=max_concurrency, num_prompts=requests, warmup=warmup, duration=duration,
                    trace=trace is not None, ramp_from=ramp_from, spike_users=spike_users, spike_at=spike_at,
                    spike_for=spike_for, rate_step=rate_step, step_duration=step_duration,
                    max_rate=float("inf") if max_rate is None else max_rate)
        shape = load.profile()
        if not web:
            shape.check_bounded()
        sweep = Sweep.from_load(load) if rate_type == "sweep" else None
        if sweep and (save_result or percentile_metrics or metric_percentiles):
            raise ValueError("--save-result, --percentile-metrics and --metric-percentiles are vLLM's for one run; "
                             "a sweep's benchmarks each have a report.json in their directory")
        if sweep and workers > 1 and duration is None:  # its one user would send only its own worker's share
            raise ValueError(f"a sweep's synchronous benchmark is one user, in one of the {workers} --workers: "
                             "bound the benchmarks by --duration, or give --workers 1")
        slos = vllm_result.parse_goodput([word for spec in goodput or () for word in spec.split()] + ctx.args)
        shown_metrics = vllm_result.parse_metrics(percentile_metrics or vllm_result.DEFAULT_METRICS)
        shown_percentiles = vllm_result.parse_percentiles(metric_percentiles or vllm_result.DEFAULT_PERCENTILES)
        thresholds = [Threshold.parse(text, slos) for text in fail_on or ()]
        extra = {"temperature": temperature, **_json_object(extra_body), **({"ignore_eos": True} if ignore_eos else {})}
        chat = endpoint == runner.ENDPOINTS[1]
        outputs = workload.Lengths.parse(output_len or "128", "--output-len")
        if dataset_name == "sharegpt" and output_len is not None and outputs.kind != "fixed":
            raise ValueError(f"sharegpt takes a fixed --output-len N or none, got {output_len!r}")
        spec = workload.WorkloadSpec(workload.Lengths.parse(input_len, "--input-len"), outputs, chat, prompts,
                                     shared_prefix, (requests + warmup) if requests else DEFAULT_NUM_PROMPTS, seed,
                                     sizes=[(t.input_len, t.output_len) for t in trace] if trace else None)
        url = runner.base_url(base_url)
        out = out or Path("bench-results", time.strftime("%Y%m%d-%H%M%S"))
        if any(out.glob("records-*.jsonl")) or any(out.glob("*/records-*.jsonl")):  # a run's, or a sweep's
            raise ValueError(f"{out} already holds a run's records; give another --out")
        runner.require_locust()
        picked = None
        if model is None:
            model, picked = runner.first_model(url, api_key)
        tok_name = tokenizer or (model if Path(model, "tokenizer_config.json").is_file() else None)
        tokens = FileTokens.load(tok_name) if tok_name else None
        probe = workload.build_requests(replace(spec, num_prompts=1, sizes=None), model, None, extra)[0]["body"]
        if trace:
            shape.rate = len(trace) / max(trace[-1].at, 1.0)  # what a record's offered rate says: the mean
        plan = runner.Plan(url=url, path=endpoint, model=model, out_dir=str(out),
                           requests_file=str(out / "requests.jsonl"), profile=shape, workers=workers,
                           timeout=timeout, seed=seed, web=web)
        checked = runner.preflight(plan, probe, api_key)
        from llmctl.bench.report import server_version

        server = server_version(plan.url, api_key)  # asked before the load, while the server surely answers
        tokens = tokens or ServerTokens.find(plan.url, model, api_key, spec.chat)
        if dataset_name == "sharegpt":
            spec.items = datasets.sharegpt(dataset_path, spec.num_prompts, seed,
                                           lambda texts: workload.count_texts(texts, tokens),
                                           int(outputs.a) if output_len else None)
        with console.status("making the prompts" + (f", counted by {tokens.source}" if tokens else "")):
            bodies = workload.build_requests(spec, model, tokens, extra)
    except ValueError as exc:
        fail(str(exc))
    if picked:
        console.info(picked)
    _warn_lengths(bodies, tokens, spec)
    for body, line in zip(bodies, trace or ()):
        body["at"] = line.at
    out.mkdir(parents=True, exist_ok=True)
    (out / "requests.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bodies))
    workload_config = {"dataset": dataset_name, "dataset_path": dataset_path and str(dataset_path),
                       "input_len": input_len, "output_len": output_len, "prompts": prompts and str(prompts),
                       "shared_prefix": shared_prefix, "tokenizer": tokens and tokens.source, "ignore_eos": ignore_eos}
    console.info(f"{checked}; {_describe(plan, web, web_port, sweep)}; results in {out}")
    if sweep:
        from llmctl.bench.report import build

        def benchmark_report(one):  # a finished benchmark's, from the records in its directory
            return build(one, workload_config, runner.collect(one.out_dir, tokens), slos, server)

        _sweep(sweep, plan, api_key, benchmark_report, thresholds)
        return
    ticker = _ticker(plan)
    code, _ = runner.run_locust(plan, api_key, web_port, ticker and ticker.tick)
    if ticker:
        ticker.close()
    if code != 0:
        fail(f"locust failed (exit {code}); its log: {out / 'locust.log'}")
    records = runner.collect(str(out), tokens)
    summary, written = _report(plan, workload_config, records, slos, server)
    vllm_config = {"backend": "openai-chat" if chat else "openai", "model_id": model,
                   "tokenizer_id": tokens and tokens.source, "num_prompts": requests,
                   "request_rate": request_rate if request_rate != float("inf") else "inf", "burstiness": burstiness,
                   "max_concurrency": max_concurrency, "rate_type": rate_type, "dataset_name": dataset_name}
    result = vllm_result.result(records, shown_metrics, shown_percentiles, slos, vllm_config)
    if percentile_metrics or metric_percentiles:
        console.info(vllm_result.table(result, shown_metrics, shown_percentiles))
    if save_result:
        path = (result_dir or out) / (result_filename or vllm_result.default_filename(vllm_config))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        written.append(str(path))
        if not console.json:
            console.print(f"wrote {path}")
    if console.json:  # before the verdict, whose exit code still tells a failed run
        emit({"written": written, "summary": summary})
    _judge(records, verdict.thresholds_line(thresholds, summary) if thresholds else None, out)


def _refuse_old_flags(profile: str | None, endpoint: str, extra: list[str], goodput: list[str] | None) -> None:
    """Flags whose meaning changed with vLLM's names fail loudly rather than mean something else."""
    if profile is not None:
        raise ValueError("--profile is gone (in vLLM it turns on server profiling): give the load kind as "
                         "--rate-type, e.g. --rate-type poisson --request-rate 4")
    from llmctl.bench.runner import ENDPOINTS

    if endpoint not in ENDPOINTS:
        hint = {"completions": ENDPOINTS[0], "chat": ENDPOINTS[1]}.get(endpoint)  # the kinds it once took
        raise ValueError(f"--endpoint is the API path, {' or '.join(ENDPOINTS)}, got {endpoint!r}"
                         + (f"; use --endpoint {hint}" if hint else ""))
    if extra and not goodput:  # the words after one --goodput are its SLOs, as in vLLM; others are a mistake
        raise ValueError(f"unexpected argument {extra[0]!r}")


def _json_object(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"--extra-body must be a JSON object, got {text!r}")
    return value


def _describe(plan, web: bool, web_port: int, sweep) -> str:
    p = plan.profile
    limits = " and ".join(x for x in (p.duration and f"{p.duration:g} s", p.requests and f"{p.requests} requests") if x)
    if web:
        return f"locust's UI on http://127.0.0.1:{web_port} (Ctrl-C here ends the run and writes the report)"
    if sweep:
        return (f"GuideLLM's sweep of {sweep.benchmarks} benchmarks (synchronous, throughput, then "
                f"{sweep.benchmarks - 2} constant rates up to the throughput's), each {limits}, "
                f"{plan.workers} worker(s)")
    if p.kind == "trace":
        load = f"at the trace's times (mean {p.rate:.3g} req/s), at most {p.concurrency} in flight"
    elif p.open_loop:
        even = " evenly spaced" if p.burstiness == float("inf") else f", burstiness {p.burstiness:g}"
        load = f"{p.rate:g} req/s{even}, at most {p.concurrency} in flight"
    else:
        load = f"{p.concurrency} in flight"
    return f"{p.kind} load, {load}, {limits or 'until saturated'}, {plan.workers} worker(s)"


def _warn(message: str) -> None:
    from rich.text import Text

    err_console.info(Text.assemble(("warning:", "bold yellow"), " ", message))


def _warn_lengths(bodies: list[dict], tokens, spec) -> None:
    if spec.items is not None and tokens is None:
        _warn("no tokenizer (no --tokenizer, --model is not a directory, the server has no /tokenize): the "
              "dataset's lengths are counted in words")
    if spec.prompts_file is not None or spec.items is not None:
        return
    if tokens is None:
        _warn("no tokenizer (no --tokenizer, --model is not a directory, the server has no /tokenize): prompts are "
              "common words, about a token each, so --input-len is approximate")
        return
    missed = [b for b in bodies if b["prompt_tokens"] not in (None, b["asked_tokens"])]
    if missed:
        asked, made = missed[0]["asked_tokens"], missed[0]["prompt_tokens"]
        why = ": special tokens, chat template and shared prefix leave no room" if made > asked else ""
        _warn(f"{len(missed)} of {len(bodies)} prompts could not be made the length asked (e.g. {asked} tokens "
              f"asked, {made} made{why}); requests.jsonl has each one's count")


def _ticker(plan):
    """The progress line on stderr; none with --quiet, or with --web (locust's UI shows the run)."""
    from llmctl.bench.progress import Progress, Ticker

    if err_console.verbosity < NORMAL or plan.web:
        return None
    return Ticker(Progress(plan.out_dir, plan.profile), err_console.file, tty=err_console.is_terminal)


def _report(plan, workload_config: dict, records, slos: dict, server=None) -> tuple[dict, list[str]]:
    """Show and write the run's report; its summary and the files written."""
    from llmctl.bench import report

    try:
        run = report.build(plan, workload_config, records, slos, server)
    except ValueError as exc:
        fail(str(exc))
    for table in run.tables():
        console.info(table)
    written = [str(p) for p in run.write(Path(plan.out_dir))]
    if not console.json:
        console.print(f"wrote {', '.join(written)}")
    return run.summary, written


def _sweep(sweep, plan, api_key: str | None, build, thresholds) -> None:
    """Run a sweep's benchmarks, then show and write their combined report and judge them all."""
    from llmctl.bench import sweep_report, verdict

    try:
        done = sweep.run(plan, api_key, build, console.info, _ticker)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    console.info(sweep_report.table(done))
    written = [str(p) for p in sweep_report.write(Path(plan.out_dir), sweep, done)]
    if console.json:
        emit({"written": written, "benchmarks": [sweep_report.entry(b) for b in done]})
    else:
        console.print(f"wrote {', '.join(written)} (and each benchmark's report in its directory)")
    held = verdict.sweep_thresholds_line(thresholds, [b.report.summary for b in done],
                                         [b.out_dir.name for b in done]) if thresholds else None
    _judge([r for b in done for r in b.report.records], held, Path(plan.out_dir))


def _judge(records, held: tuple[bool, str] | None, out: Path) -> None:
    """Exit 3 when every request failed, 4 when a --fail-on threshold was crossed (`held`: thresholds_line's, if
    any were given); say why in one line."""
    from llmctl.bench import verdict

    errors = verdict.errors_line(records)
    if verdict.every_request_failed(records):
        fail(f"{errors} (all in {out / 'report.json'})", EXIT_ALL_FAILED)
    if errors:
        _warn(errors)
    if held:
        ok, line = held
        if not ok:
            fail(line, EXIT_CROSSED)
        console.info(line)


@app.command()
def compare(a: Path = typer.Argument(..., help="report.json of run A."),
            b: Path = typer.Argument(..., help="report.json of run B."),
            output: str = typer.Option("text", "--output", help="text, or json: the rows (values, 95% intervals, "
                                                                "change, verdict) as one document."),
            allow_different: bool = typer.Option(False, "--allow-different-workloads",
                                                 help="Compare runs whose workloads differ (endpoint, model, "
                                                      "dataset, lengths, load, SLOs).")) -> None:
    """Show two runs side by side: B's change from A, coloured only where it is outside both runs' 95% intervals."""
    from llmctl.bench import compare as comparing
    from llmctl.bench import report

    start_output(output)
    try:
        first, second = report.load(a), report.load(b)
    except ValueError as exc:
        fail(str(exc))
    result = comparing.compare(first, second)
    if result.mismatches and not allow_different:
        fail(comparing.warning(result.mismatches) + "; pass --allow-different-workloads to compare them anyway")
    if console.json:
        emit({"a": str(a), "b": str(b), "mismatches": result.mismatches,
              "rows": [{**asdict(r), "change": r.change, "verdict": r.verdict} for r in result.rows]})
        return
    console.print(comparing.table(result, str(a), str(b)))


def _engine(model: str | None, dtype: str, device: str, kv_cache_dtype: str, speculative: str | None,
            num_speculative_tokens: int, draft_model: str | None, tensor_parallel_size: int):
    from llmctl.runtime.llm import LLM

    return LLM(model, dtype=dtype, device=device, kv_cache_dtype=kv_cache_dtype,
               speculative=engine_options.speculative_config(speculative, num_speculative_tokens, draft_model),
               tensor_parallel_size=tensor_parallel_size)


@app.command()
def throughput(
    model: str = typer.Argument(None, envvar="LLMCTL_MODEL", help="Model directory (default: the reference model).",
                                show_default=False),
    requests: int = typer.Option(256, help="Requests, all submitted at once."),
    min_len: int = typer.Option(100, help="Shortest prompt and output, tokens."),
    max_len: int = typer.Option(1024, help="Longest prompt and output, tokens."),
    hf_batch_size: int = typer.Option(0, help="Also run transformers generate in batches of this size (0: skip)."),
    hf_requests: int = typer.Option(32, help="Requests given to transformers."),
    dtype: str = typer.Option("auto", envvar="LLMCTL_DTYPE"),
    device: str = typer.Option("auto", envvar="LLMCTL_DEVICE"),
    kv_cache_dtype: str = engine_options.kv_cache_dtype(),
    speculative: str = engine_options.speculative(),
    num_speculative_tokens: int = engine_options.num_speculative_tokens(),
    draft_model: str = engine_options.draft_model(),
    tensor_parallel_size: int = engine_options.tensor_parallel_size(),
    output: str = typer.Option("text", "--output", help="text, or json: the result as one document on stdout."),
) -> None:
    """Offline throughput of the engine (no HTTP): N random-token requests, lengths uniform from min to max."""
    from llmctl.bench import offline

    start_output(output)
    try:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= --min-len <= --max-len, got {min_len} and {max_len}")
        llm = _engine(model, dtype, device, kv_cache_dtype, speculative, num_speculative_tokens, draft_model,
                      tensor_parallel_size)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    vocab = llm.engine.config.hf_config["vocab_size"]
    work = offline.Workload.uniform(requests, min_len, max_len, vocab)
    offline.run_llmctl(llm, offline.Workload.uniform(min(requests, 8), min_len, min(max_len, 64), vocab, seed=2),
                       "warm-up")
    results = [offline.run_llmctl(llm, work)]
    if hf_batch_size:
        import transformers

        runner = llm.engine.model_runner  # the same device and dtype as the engine
        hf = transformers.AutoModelForCausalLM.from_pretrained(llm.engine.config.model, dtype=runner.dtype)
        hf_work = offline.Workload(work.prompts[:hf_requests], work.output_lens[:hf_requests])
        results.append(offline.run_transformers(hf.to(runner.device), hf_work, hf_batch_size))
    _results_table(results)


@app.command()
def latency(
    model: str = typer.Argument(None, envvar="LLMCTL_MODEL", help="Model directory (default: the reference model).",
                                show_default=False),
    prompt_len: int = typer.Option(128, help="Prompt tokens."),
    output_len: int = typer.Option(512, help="Tokens to generate."),
    runs: int = typer.Option(3, help="Repetitions; each is shown."),
    dtype: str = typer.Option("auto", envvar="LLMCTL_DTYPE"),
    device: str = typer.Option("auto", envvar="LLMCTL_DEVICE"),
    kv_cache_dtype: str = engine_options.kv_cache_dtype(),
    speculative: str = engine_options.speculative(),
    num_speculative_tokens: int = engine_options.num_speculative_tokens(),
    draft_model: str = engine_options.draft_model(),
    tensor_parallel_size: int = engine_options.tensor_parallel_size(),
    output: str = typer.Option("text", "--output", help="text, or json: the result as one document on stdout."),
) -> None:
    """Offline single-stream decode speed (no HTTP): one request alone, time per output token."""
    from llmctl.bench import offline

    start_output(output)
    try:
        if prompt_len < 1 or output_len < 2 or runs < 1:
            raise ValueError("need --prompt-len >= 1, --output-len >= 2 and --runs >= 1")
        llm = _engine(model, dtype, device, kv_cache_dtype, speculative, num_speculative_tokens, draft_model,
                      tensor_parallel_size)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    vocab = llm.engine.config.hf_config["vocab_size"]
    offline.single_stream(llm, min(prompt_len, 16), 8, vocab)  # warm-up
    _results_table([offline.single_stream(llm, prompt_len, output_len, vocab) for _ in range(runs)], per_token=True)


def _results_table(results, per_token: bool = False) -> None:
    if console.json:
        emit({"results": [{**asdict(r), "output_tokens_per_second": round(r.output_tps, 1),
                           "total_tokens_per_second": round(r.total_tps, 1)} for r in results]})
        return
    from rich.table import Table

    table = Table()
    table.add_column("run", no_wrap=True)
    for col in ("requests", "seconds", "output tok/s", "total tok/s" if not per_token else "ms/token"):
        table.add_column(col, justify="right")
    for r in results:
        last = f"{r.seconds / r.output_tokens * 1000:.2f}" if per_token else f"{r.total_tps:,.1f}"
        table.add_row(r.name, str(r.requests), f"{r.seconds:.2f}", f"{r.output_tps:,.1f}", last)
    console.print(table)


@app.command()
def kernels(
    batches: list[int] = typer.Option([1, 4, 16, 64, 256, 1024], "--batch", "-m", help="M values (repeat the option)."),
    group_size: int = typer.Option(128, help="Quantization group size of the random weights."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ act-order weights (no tinygemm column then)."),
    tinygemm: bool = typer.Option(True, "--tinygemm/--no-tinygemm", help="Time torch's int4 tinygemm beside ours."),
    tune: bool = typer.Option(False, "--tune", help="Instead of the table: time every kernel choice for every M "
                              "bucket afresh and write them to --save as a tuned file for this GPU."),
    save: Path = typer.Option(None, "--save", help="The tuned file --tune writes (merged into it if it exists).",
                              dir_okay=False),
    model: Path = typer.Option(None, "--model", help="With --tune: the shapes, group size and act-order of this "
                               "model's int4 layers (its config.json); default the Llama-2-7B and -3-8B shapes.",
                               exists=True, file_okay=False),
    dtype: str = typer.Option("float16", "--dtype", help="With --tune: the activations' dtype, float16 or bfloat16."),
    max_m: int = typer.Option(8192, "--max-m", min=1, help="With --tune: the largest M bucket (a step's tokens)."),
) -> None:
    """W4A16 kernels on this GPU: speedup over fp16 cuBLAS at Llama shapes, tinygemm beside, GB/s at M=1.
    With --tune --save FILE: a tuned file for this GPU, so that servers skip tuning at start-up."""
    if any(m < 1 for m in batches) or group_size not in (32, 64, 128):
        fail(f"need M >= 1 and --group-size 32, 64 or 128, got {batches} and {group_size}")
    if tune != (save is not None):
        fail("--tune and --save go together: --tune --save FILE writes a tuned file")
    if (model is not None or dtype != "float16" or max_m != 8192) and not tune:
        fail("--model, --dtype and --max-m choose what --tune tunes: add --tune --save FILE")
    if dtype not in ("float16", "bfloat16"):
        fail(f"--dtype must be float16 or bfloat16, got {dtype!r}")
    import torch

    if not torch.cuda.is_available():
        fail("bench kernels needs a CUDA GPU")

    def show(line: str) -> None:  # one table row per line, never wrapped or styled
        console.print(line, soft_wrap=True, markup=False, highlight=False)

    if tune:
        _tune_kernels(save, model, group_size, act_order, getattr(torch, dtype), max_m, show)
        return
    from llmctl.bench import w4a16_kernels

    rows = w4a16_kernels.run(w4a16_kernels.SHAPES, batches, group_size, act_order, tinygemm, print_fn=show)
    for line in w4a16_kernels.summary(rows):
        show(line)


def _tune_kernels(save: Path, model: Path | None, group_size: int, act_order: bool, dtype, max_m: int, show) -> None:
    from llmctl.bench import w4a16_tune

    try:
        if model is not None:
            shapes, group_size, act_order = w4a16_tune.model_shapes(model)
        else:
            shapes = sorted(set(w4a16_tune.LLAMA2_7B + w4a16_tune.LLAMA3_8B))
        made = w4a16_tune.make_tuned_file(save, shapes, group_size, act_order, dtype, max_m, print_fn=show)
    except ValueError as exc:
        fail(str(exc))
    show(f"wrote {len(made)} choices ({len(shapes)} shapes, group {group_size}{', act-order' if act_order else ''}, "
         f"{str(dtype).removeprefix('torch.')}, M up to {max_m}) to {save}")
