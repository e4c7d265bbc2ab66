"""HTTP streaming throughput of `llmctl serve` against the offline engine, on the very same requests.

    python -m llmctl.bench.http_vs_offline --model DIR [--requests 256] [--min-len 100] [--max-len 1024]

DIR needs a tokenizer that maps ids to text and back exactly (`random_model --tokenizer` writes one).
Makes the offline benchmark's workload (seeded), then in separate processes, one after the other so
each has the GPU to itself: (1) the offline engine generates it all at once; (2) `llmctl serve` is
started with the same engine settings and `llmctl bench serve` sends the same prompts with the same
max_tokens and ignore_eos from as many concurrent streaming clients as there are requests. Prints both
throughputs, their ratio, and TTFT / ITL percentiles under that load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LLMCTL = [sys.executable, "-c", "from llmctl.cli.main import main; main()"]


def offline(model: str, args) -> float:
    cmd = [sys.executable, "-m", "llmctl.bench.offline", "--model", model, "--requests", str(args.requests),
           "--min-len", str(args.min_len), "--max-len", str(args.max_len), "--hf-batch-size", "0",
           "--single-prompt-len", str(args.min_len), "--single-output-len", str(args.min_len)]
    lines = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
    print("\n".join(lines), flush=True)
    run = next(json.loads(x) for x in lines if x.startswith("{") and json.loads(x).get("name") == "llmctl")
    return run["output_tps"]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"llmctl serve exited with {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError("llmctl serve was not healthy in time")


def http(model: str, prompts: Path, out: Path, args) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    log = open(out / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen([*LLMCTL, "serve", model, "--port", str(args.port), "--served-model-name", "bench"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server)
        cmd = [*LLMCTL, "bench", "serve", "--url", url, "--model", "bench", "--prompts", str(prompts),
               "--requests", str(args.requests), "--concurrency", str(args.requests), "--ignore-eos",
               "--tokenizer", model, "--timeout", "1200", "--out", str(out / "bench")]
        subprocess.run(cmd, check=True, env={**os.environ, "COLUMNS": "120"})
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    return json.loads((out / "bench" / "report.json").read_text())["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from llmctl.bench.offline import Workload
    from llmctl.bench.random_model import ids_to_text

    out = args.out or Path(tempfile.mkdtemp(prefix="llmctl-http-"))
    out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads(Path(args.model, "config.json").read_text())["vocab_size"]
    work = Workload.uniform(args.requests, args.min_len, args.max_len, vocab)  # the offline run's own seed
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": ids_to_text(p), "max_tokens": m}) + "\n"
                               for p, m in zip(work.prompts, work.output_lens)))
    offline_tps = offline(args.model, args)
    s = http(args.model, prompts, out, args)
    result = {"offline_output_tps": offline_tps, "http_output_tps": s["output_throughput"],
              "ratio": s["output_throughput"] / offline_tps, "ok": s["ok"], "requests": s["requests"],
              "output_tokens": s["output_tokens"], "expected_output_tokens": sum(work.output_lens),
              "ttft_ms": {k: s["ttft_ms"][k] for k in ("p50", "p99")}, "itl_ms": {k: s["itl_ms"][k] for k in ("p50", "p99")}}
    print(json.dumps(result), flush=True)
    print(f"offline {offline_tps:,.0f} out tok/s | HTTP {s['output_throughput']:,.0f} out tok/s "
          f"({result['ratio']:.1%}) | TTFT P50 {s['ttft_ms']['p50']:.0f} ms P99 {s['ttft_ms']['p99']:.0f} ms | "
          f"ITL P50 {s['itl_ms']['p50']:.1f} ms P99 {s['itl_ms']['p99']:.1f} ms")


if __name__ == "__main__":
    main()
