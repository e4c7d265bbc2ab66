"""The quantization quality table: held-out perplexity of the reference model, llmctl beside its peers.

    python scripts/quant_quality.py [--out DIR] [--eval-windows 64] [--group-sizes 128 32]

Runs `llmctl quantize` once per (method, group size, backend) on the same builtin calibration
windows, each in its own process (peers patch global state), and reads every checkpoint's
perplexity from its quant_report.json: all of them are measured by llmctl's one evaluator on the
same held-out windows. Peers that are not installed are listed as skipped. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [  # (method, backend, extra flags)
    ("rtn", "llmctl", []),
    ("gptq", "llmctl", []),
    ("gptq", "gptqmodel", []),
    ("awq", "llmctl", []),
    ("awq", "autoawq", []),
]


def quantize(src: str, out: Path, method: str, backend: str, group: int, windows: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-c", "from llmctl.cli.main import main; main()", "quantize", src, str(out),
           "--method", method, "--backend", backend, "--group-size", str(group), "--device", "cpu",
           "--eval-windows", str(windows), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    report = json.loads((out / "quant_report.json").read_text())
    return {"ppl": report["perplexity"], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded reference model")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[128, 32])
    args = parser.parse_args()
    from llmctl.runtime.llm import default_model

    src = args.model or str(default_model())
    root = args.out or Path(tempfile.mkdtemp(prefix="llmctl-quality-"))
    rows, base = [], None
    for group in args.group_sizes:
        for method, backend, extra in RUNS:
            out = root / f"{method}-{backend}-g{group}"
            result = quantize(src, out, method, backend, group, args.eval_windows, extra)
            if "ppl" in result:
                base = result["ppl"]["before"]
            rows.append((method, backend, group, result))
            print(json.dumps({"method": method, "backend": backend, "group_size": group, **result}), flush=True)
    print(f"\nheld-out perplexity, {rows[0][3].get('ppl', {}).get('tokens', '?')} tokens; fp16 model: {base:.3f}\n")
    print("| method | group size | llmctl | peer | peer library | llmctl vs peer |")
    print("|---|---|---|---|---|---|")
    for group in args.group_sizes:
        for method in ("rtn", "gptq", "awq"):
            ours = next(r for m, b, g, r in rows if m == method and b == "llmctl" and g == group)
            peer = next(((b, r) for m, b, g, r in rows if m == method and b != "llmctl" and g == group), None)
            cell = f"{ours['ppl']['after']:.3f}" if "ppl" in ours else ours["error"]
            if peer is None:
                print(f"| {method} | {group} | {cell} | – | – | – |")
                continue
            name, theirs = peer
            if "ppl" not in theirs:
                print(f"| {method} | {group} | {cell} | {theirs['error']} | {name} | – |")
                continue
            delta = (ours["ppl"]["after"] / theirs["ppl"]["after"] - 1) * 100
            print(f"| {method} | {group} | {cell} | {theirs['ppl']['after']:.3f} | {name} | {delta:+.2f}% |")


if __name__ == "__main__":
    main()
