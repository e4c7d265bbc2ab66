"""`llmctl bench`: load-test any OpenAI-compatible server (serve), put two runs side by side (compare), and
measure the engine offline without HTTP (throughput, latency)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import typer

from llmctl.cli.console import NORMAL, console, err_console, fail

app = typer.Typer(help="Measure a served model (TTFT, ITL, E2E, throughput) or the engine itself.",
                  no_args_is_help=True)

PROFILE_HELP = "constant | ramp | spike (closed loop: users) or rate | sweep (open loop: arrivals per second)."
FAIL_ON_HELP = ("NAME=LIMIT: exit 4 when the run crosses it (repeat for more; space-separated in the environment). "
                "NAME is error_rate (a fraction), "
                "{mean|p50|p90|p95|p99}_{ttft|tpot|itl|e2e}_ms (ceilings), or min_request_throughput, "
                "min_output_throughput, min_goodput (floors, per second). E.g. --fail-on p99_ttft_ms=500.")
EXIT_ALL_FAILED = 3  # every measured request failed
EXIT_CROSSED = 4  # a --fail-on threshold was crossed


@app.command()
def serve(
    url: str = typer.Option(..., envvar="LLMCTL_BENCH_URL", help="Server base URL, e.g. http://127.0.0.1:8000."),
    model: str = typer.Option(..., envvar="LLMCTL_BENCH_MODEL", help="Model name the server serves."),
    endpoint: str = typer.Option("completions", help="completions or chat."),
    api_key: str = typer.Option(None, envvar="LLMCTL_API_KEY", help="Bearer token.", show_default=False),
    profile: str = typer.Option("constant", help=PROFILE_HELP),
    concurrency: int = typer.Option(8, help="Users (constant; ramp's end; spike's base); open loop: most in flight."),
    ramp_from: int = typer.Option(1, help="Ramp: users at the start."),
    spike_users: int = typer.Option(0, help="Spike: users during the spike."),
    spike_at: float = typer.Option(0.0, help="Spike: seconds into the run."),
    spike_for: float = typer.Option(0.0, help="Spike: seconds it lasts."),
    rate: float = typer.Option(1.0, help="Rate: requests/s; sweep: the first step's."),
    burstiness: float = typer.Option(1.0, help="Arrival gaps' gamma shape: 1 Poisson, <1 burstier, >1 more even."),
    rate_step: float = typer.Option(0.0, help="Sweep: rate added each step (0: the first rate)."),
    step_duration: float = typer.Option(10.0, help="Sweep: seconds per step."),
    max_rate: float = typer.Option(None, help="Sweep: last rate to try.", show_default=False),
    duration: float = typer.Option(None, envvar="LLMCTL_BENCH_DURATION", help="Seconds to run.", show_default=False),
    requests: int = typer.Option(None, help="Measured requests to send.", show_default=False),
    warmup: int = typer.Option(0, help="Requests sent first and left out of the statistics."),
    input_len: str = typer.Option("128", help="Prompt tokens after any shared prefix, as the server counts them "
                                  "(BOS, chat template): N, uniform:LO,HI or normal:MEAN,STD. Exact with a tokenizer "
                                  "(--tokenizer, or the server's /tokenize), else about a word a token."),
    output_len: str = typer.Option("128", help="max_tokens: N, uniform:LO,HI or normal:MEAN,STD."),
    prompts: Path = typer.Option(None, help="JSONL file of {\"prompt\"} or {\"messages\"} (+ max_tokens).",
                                 show_default=False),
    shared_prefix: int = typer.Option(0, help="Tokens of one shared prefix leading every prompt."),
    num_prompts: int = typer.Option(1000, help="Random prompts made, cycled over."),
    tokenizer: str = typer.Option(None, help="Tokenizer directory for exact prompts and token counts (default: "
                                  "--model if a directory, else the server's POST /tokenize).", show_default=False),
    ignore_eos: bool = typer.Option(False, help="Ask for exactly max_tokens (vLLM's extension; not every server)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature sent."),
    extra_body: str = typer.Option(None, help="JSON merged into every request body.", show_default=False),
    slo: str = typer.Option(None, help="Goodput SLOs, e.g. ttft=200ms,tpot=50ms,e2e=5s.", show_default=False),
    fail_on: list[str] = typer.Option(None, "--fail-on", envvar="LLMCTL_BENCH_FAIL_ON", metavar="NAME=LIMIT",
                                      help=FAIL_ON_HELP, show_default=False),
    timeout: float = typer.Option(300.0, help="Seconds a request may take before it counts as a timeout."),
    workers: int = typer.Option(1, envvar="LLMCTL_BENCH_WORKERS", help="Locust worker processes (>1: master + N)."),
    web: bool = typer.Option(False, help="Run locust's web UI (127.0.0.1) and drive the users from it."),
    web_port: int = typer.Option(8089, help="Port of locust's web UI."),
    seed: int = typer.Option(0, help="Seed for prompts, lengths and arrivals."),
    out: Path = typer.Option(None, help="Directory for the report (default bench-results/<time>).", show_default=False),
) -> None:
    """Load-test an OpenAI-compatible server with locust and report TTFT, TPOT, ITL, E2E and throughput.

    Exit codes: 0 the run finished (and every --fail-on threshold held); 1 bad input, or no run (the server
    unreachable, locust failed, no request finished); 2 a malformed command line; 3 every measured request
    failed; 4 a --fail-on threshold was crossed.
    """
    from llmctl.bench import runner, workload
    from llmctl.bench.metrics import parse_slo
    from llmctl.bench.profiles import Profile
    from llmctl.bench.tokens import FileTokens, ServerTokens
    from llmctl.bench.verdict import Threshold

    try:
        if endpoint not in runner.ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(runner.ENDPOINTS)}, got {endpoint!r}")
        if workers < 1 or timeout <= 0:
            raise ValueError(f"need --workers >= 1 and --timeout > 0, got {workers} and {timeout}")
        if web and profile != "constant":
            raise ValueError("--web drives the users from locust's UI; leave out --profile")
        shape = Profile(kind=profile, concurrency=concurrency, ramp_from=ramp_from, spike_users=spike_users,
                        spike_at=spike_at, spike_for=spike_for, rate=rate, burstiness=burstiness,
                        rate_step=rate_step, step_duration=step_duration, duration=duration, requests=requests,
                        warmup=warmup, max_rate=float("inf") if max_rate is None else max_rate)
        if not web:
            shape.check_bounded()
        slos = parse_slo(slo)
        thresholds = [Threshold.parse(text, slos) for text in fail_on or ()]
        extra = {"temperature": temperature, **_json_object(extra_body), **({"ignore_eos": True} if ignore_eos else {})}
        spec = workload.WorkloadSpec(workload.Lengths.parse(input_len, "--input-len"),
                                     workload.Lengths.parse(output_len, "--output-len"), endpoint == "chat",
                                     prompts, shared_prefix, (requests + warmup) if requests else num_prompts, seed)
        tok_name = tokenizer or (model if Path(model, "tokenizer_config.json").is_file() else None)
        tokens = FileTokens.load(tok_name) if tok_name else None
        probe = workload.build_requests(replace(spec, num_prompts=1), model, None, extra)[0]["body"]
        out = out or Path("bench-results", time.strftime("%Y%m%d-%H%M%S"))
        if any(out.glob("records-*.jsonl")):
            raise ValueError(f"{out} already holds a run's records; give another --out")
        plan = runner.Plan(url=runner.base_url(url), path=runner.ENDPOINTS[endpoint], model=model, out_dir=str(out),
                           requests_file=str(out / "requests.jsonl"), profile=shape,
                           workers=workers, timeout=timeout, seed=seed, web=web)
        runner.require_locust()
        checked = runner.preflight(plan, probe, api_key)
        tokens = tokens or ServerTokens.find(plan.url, model, api_key, spec.chat)
        with console.status("making the prompts" + (f", counted by {tokens.source}" if tokens else "")):
            bodies = workload.build_requests(spec, model, tokens, extra)
    except ValueError as exc:
        fail(str(exc))
    _warn_lengths(bodies, tokens, spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "requests.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bodies))
    console.info(f"{checked}; {_describe(plan, web, web_port)}; results in {out}")
    ticker = _ticker(plan)
    code = runner.run_locust(plan, api_key, web_port, ticker and ticker.tick)
    if ticker:
        ticker.close()
    if code != 0:
        fail(f"locust failed (exit {code}); its log: {out / 'locust.log'}")
    workload_config = {"input_len": input_len, "output_len": output_len, "prompts": prompts and str(prompts),
                       "shared_prefix": shared_prefix, "tokenizer": tokens and tokens.source, "ignore_eos": ignore_eos}
    records = runner.collect(str(out), tokens)
    _judge(records, _report(plan, workload_config, records, slos), thresholds, out)


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


def _describe(plan, web: bool, web_port: int) -> str:
    if web:
        return f"locust's UI on http://127.0.0.1:{web_port} (Ctrl-C here ends the run and writes the report)"
    p = plan.profile
    load = f"{p.rate:g} req/s" if p.open_loop else f"{p.concurrency} users"
    limits = " and ".join(x for x in (p.duration and f"{p.duration:g} s", p.requests and f"{p.requests} requests") if x)
    return f"{p.kind} profile, {load}, {limits or 'until saturated'}, {plan.workers} worker(s)"


def _warn(message: str) -> None:
    from rich.text import Text

    err_console.info(Text.assemble(("warning:", "bold yellow"), " ", message))


def _warn_lengths(bodies: list[dict], tokens, spec) -> None:
    if spec.prompts_file is not None:
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


def _report(plan, workload_config: dict, records, slos: dict) -> dict:
    """Show and write the run's report; its summary."""
    from llmctl.bench import report

    try:
        run = report.build(plan, workload_config, records, slos)
    except ValueError as exc:
        fail(str(exc))
    for table in run.tables():
        console.info(table)
    console.print(f"wrote {', '.join(str(p) for p in run.write(Path(plan.out_dir)))}")
    return run.summary


def _judge(records, summary: dict, thresholds, out: Path) -> None:
    """Exit 3 when every request failed, 4 when a --fail-on threshold was crossed; say why in one line."""
    from llmctl.bench import verdict

    errors = verdict.errors_line(records)
    if verdict.every_request_failed(records):
        fail(f"{errors} (all in {out / 'report.json'})", EXIT_ALL_FAILED)
    if errors:
        _warn(errors)
    if thresholds:
        held, line = verdict.thresholds_line(thresholds, summary)
        if not held:
            fail(line, EXIT_CROSSED)
        console.info(line)


@app.command()
def compare(a: Path = typer.Argument(..., help="report.json of run A."),
            b: Path = typer.Argument(..., help="report.json of run B.")) -> None:
    """Show two runs side by side, B's change from A coloured by whether it is better."""
    from llmctl.bench import report

    try:
        first, second = report.load(a), report.load(b)
    except ValueError as exc:
        fail(str(exc))
    console.print(report.compare_table(first, second, str(a), str(b)))


def _engine(model: str | None, dtype: str, device: str):
    from llmctl.runtime.llm import LLM

    return LLM(model, dtype=dtype, device=device)


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
) -> None:
    """Offline throughput of the engine (no HTTP): N random-token requests, lengths uniform from min to max."""
    from llmctl.bench import offline

    try:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= --min-len <= --max-len, got {min_len} and {max_len}")
        llm = _engine(model, dtype, device)
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
) -> None:
    """Offline single-stream decode speed (no HTTP): one request alone, time per output token."""
    from llmctl.bench import offline

    try:
        if prompt_len < 1 or output_len < 2 or runs < 1:
            raise ValueError("need --prompt-len >= 1, --output-len >= 2 and --runs >= 1")
        llm = _engine(model, dtype, device)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    vocab = llm.engine.config.hf_config["vocab_size"]
    offline.single_stream(llm, min(prompt_len, 16), 8, vocab)  # warm-up
    _results_table([offline.single_stream(llm, prompt_len, output_len, vocab) for _ in range(runs)], per_token=True)


def _results_table(results, per_token: bool = False) -> None:
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
) -> None:
    """W4A16 kernels on this GPU: speedup over fp16 cuBLAS at Llama shapes, tinygemm beside, GB/s at M=1."""
    if any(m < 1 for m in batches) or group_size not in (32, 64, 128):
        fail(f"need M >= 1 and --group-size 32, 64 or 128, got {batches} and {group_size}")
    import torch

    if not torch.cuda.is_available():
        fail("bench kernels needs a CUDA GPU")
    from llmctl.bench import w4a16_kernels

    def show(line: str) -> None:  # one table row per line, never wrapped or styled
        console.print(line, soft_wrap=True, markup=False, highlight=False)

    rows = w4a16_kernels.run(w4a16_kernels.SHAPES, batches, group_size, act_order, tinygemm, print_fn=show)
    for line in w4a16_kernels.summary(rows):
        show(line)
