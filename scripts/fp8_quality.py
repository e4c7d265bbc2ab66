"""The FP8 quality table: held-out perplexity of the reference model in fp16, after `llmctl quantize
--method fp8`, and after llm-compressor's FP8_DYNAMIC (`--backend llmcompressor`), on the same windows.

    python scripts/fp8_quality.py [--model DIR] [--out DIR] [--eval-windows 64]

Each checkpoint is written by `llmctl quantize` in its own process and measured by llmctl's one evaluator
(its quant_report.json: weights dequantized, activations in fp32). The "W8A8" column measures the same
checkpoints again with every quantized linear's input rounded to FP8 per token first, as a Hopper GPU
computes the FP8_DYNAMIC scheme (vLLM's per-token scale: absmax / 448, at least 1 / (448 * 512)).
The two checkpoints are also compared tensor by tensor. Prints JSON lines, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FLOAT8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FLOAT8).max
MIN_SCALE = 1 / (FP8_MAX * 512)  # vLLM's floor for a dynamic per-token activation scale


def quantize(src: str, out: Path, backend: str, windows: int) -> dict:
    cmd = [sys.executable, "-c", "from llmctl.cli.main import main; main()", "quantize", src, str(out),
           "--method", "fp8", "--backend", backend, "--device", "cpu", "--eval-windows", str(windows)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    report = json.loads((out / "quant_report.json").read_text())
    return {"ppl": report["perplexity"], "seconds": report["seconds"]}


def fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x: [..., in] rounded to FP8 with one scale per token, returned dequantized (fp32 math, as vLLM's)."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)  # [..., 1]
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FLOAT8).float() * scale).to(x.dtype)


def w8a8_perplexity(model_dir: Path, eval_ids: torch.Tensor) -> float:
    from llmctl.checkpoint.loader import read_tensors
    from llmctl.quantize.dense import dense_model
    from llmctl.reference.evaluate import perplexity

    model = dense_model(model_dir)
    for name, _ in read_tensors(model_dir):
        if name.endswith(".weight_scale"):  # a quantized linear (an MoE expert is no module here: refused)
            linear = model.get_submodule(name.removesuffix(".weight_scale"))
            linear.register_forward_pre_hook(lambda m, args: (fp8_per_token(args[0]),))
    with torch.no_grad():
        return perplexity(lambda ids: model(input_ids=ids).logits, list(eval_ids))["perplexity"]


def same_tensors(a: Path, b: Path) -> str:
    from llmctl.checkpoint.loader import read_tensors

    ours, theirs = dict(read_tensors(a)), dict(read_tensors(b))
    if ours.keys() != theirs.keys():
        return f"different names: {sorted(ours.keys() ^ theirs.keys())[:3]}"
    differ = [n for n, t in ours.items() if t.dtype != theirs[n].dtype or t.shape != theirs[n].shape
              or not torch.equal(t.view(torch.uint8), theirs[n].view(torch.uint8))]
    return f"{len(ours) - len(differ)} of {len(ours)} tensors bit-identical"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded reference model")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--eval-windows", type=int, default=64)
    args = parser.parse_args()
    from llmctl.quantize.calibration import heldout_windows
    from llmctl.runtime.llm import default_model

    src = args.model or str(default_model())
    root = args.out or Path(tempfile.mkdtemp(prefix="llmctl-fp8-"))
    eval_ids = heldout_windows(src, args.eval_windows)
    rows = {}
    for backend in ("llmctl", "llmcompressor"):
        out = root / backend
        rows[backend] = quantize(src, out, backend, args.eval_windows)
        if "ppl" in rows[backend]:
            rows[backend]["w8a8"] = w8a8_perplexity(out, eval_ids)
        print(json.dumps({"backend": backend, **rows[backend]}), flush=True)
    base = next((r["ppl"]["before"] for r in rows.values() if "ppl" in r), None)
    tokens = next((r["ppl"]["tokens"] for r in rows.values() if "ppl" in r), "?")
    if all("ppl" in r for r in rows.values()):
        print(f"\nllmctl vs llm-compressor checkpoints: {same_tensors(root / 'llmctl', root / 'llmcompressor')}")
    print(f"\nheld-out perplexity, {tokens} tokens; fp16 model: {base:.3f}\n")
    print("| checkpoint | FP8 weights | vs fp16 | W8A8 (FP8 activations per token) | vs fp16 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| fp16 (unquantized) | {base:.3f} | – | – | – |")
    for backend, name in (("llmctl", "llmctl `--method fp8`"), ("llmcompressor", "llm-compressor FP8_DYNAMIC")):
        r = rows[backend]
        if "ppl" not in r:
            print(f"| {name} | {r['error']} | – | – | – |")
            continue
        after, w8a8 = r["ppl"]["after"], r["w8a8"]
        print(f"| {name} | {after:.3f} | {(after / base - 1) * 100:+.2f}% | {w8a8:.3f} | {(w8a8 / base - 1) * 100:+.2f}% |")


if __name__ == "__main__":
    main()
