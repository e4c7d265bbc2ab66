"""`nox -s demo`: the whole pipeline on the embedded reference model, as a user would run it.

    python scripts/demo.py [--out DIR] [--method awq|gptq|rtn]

1. `llmctl quantize` the reference model (4-bit, calibration from the builtin set);
2. `llmctl generate` from the quantized checkpoint;
3. `llmctl build-image` it, with Kubernetes manifests: a real image when LLMCTL_DEMO_BASE names a base
   image already in the engine at DOCKER_HOST (a CPU one: the wheels follow constraints-cpu.txt),
   otherwise `--context-only` for a Debian 12 base (the Dockerfile and the context a build would use);
4. `llmctl serve` it on loopback;
5. `llmctl bench serve` against that server, which prints the latency and throughput report;
6. SIGTERM the server (it drains and exits 0).
Every step is the real command in its own process; the first failure stops the demo with its exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

LLMCTL = [sys.executable, "-c", "from llmctl.cli.main import main; main()"]


def step(title: str, *args: str) -> None:
    print(f"\n\033[1m== {title}\033[0m\n$ llmctl {' '.join(args)}", flush=True)
    done = subprocess.run([*LLMCTL, *args])
    if done.returncode != 0:
        sys.exit(f"demo: `llmctl {args[0]}` failed with exit code {done.returncode}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--method", default="awq", choices=("awq", "gptq", "rtn"))
    args = parser.parse_args()
    from llmctl.bench.http_vs_offline import wait_healthy
    from llmctl.runtime.llm import default_model

    out = args.out or Path(tempfile.mkdtemp(prefix="llmctl-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"reference-{args.method}"
    step("quantize the embedded reference model", "quantize", str(default_model()), str(model),
         "--method", args.method, "--samples", "16", "--eval-windows", "8")
    step("generate from the 4-bit checkpoint", "generate", str(model), "--max-tokens", "60",
         "--prompt", "def read_config(path):")
    constraints = Path(__file__).resolve().parent.parent / "constraints-cpu.txt"
    image = ["build-image", str(model), "--tag", f"llmctl-demo:{args.method}", "--k8s", str(out / "k8s"),
             "-c", str(constraints)]
    base = os.environ.get("LLMCTL_DEMO_BASE")
    if base:
        step("build the serving image", *image, "--base", base)
    else:
        print("\n(LLMCTL_DEMO_BASE names no local base image: writing the build context instead of building)")
        step("write the image's build context", *image, "--base", "debian:12", "--python-version", "3.11",
             "--context-only", str(out / "image"))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"\n\033[1m== serve it\033[0m\n$ llmctl serve {model} --port {port}", flush=True)
    log = open(out / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen([*LLMCTL, "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                               "--served-model-name", "reference"], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_healthy(url, server, timeout=180)
        except RuntimeError as exc:
            sys.exit(f"demo: {exc}")
        step("measure it", "bench", "serve", "--url", url, "--model", "reference", "--tokenizer", str(model),
             "--concurrency", "8", "--requests", "64", "--warmup", "8", "--input-len", "uniform:32,256",
             "--output-len", "uniform:16,96", "--out", str(out / "bench"))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"\nserver drained and exited with {code}; its JSON access log: {out / 'server.log'}")
    print(f"everything the demo wrote is under {out}")
    sys.exit(code)


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "120")
    main()
