"""Calibrated fp8 KV-cache scales: held-out perplexity of the reference model through llmctl's engine with
an fp8 KV cache at scale 1.0 and at calibrated scales, with the model's own weights and with FP8 weights.

    python scripts/kv_scale_quality.py [--model DIR] [--out DIR] [--max-windows 64] [--no-peer]

Checkpoints, all on the same builtin calibration windows (128 x 512 tokens; one already in --out is reused):
  fp8            `llmctl quantize --method fp8` (no KV-cache scales: an fp8 cache uses 1.0)
  fp8-kv         `llmctl quantize --method fp8 --kv-cache-dtype fp8`
  peer-fp8-kv    the same through `--backend llmcompressor` (its kv_cache_scheme), unless --no-peer
  kv             the unquantized weights with KV-cache scales only, a KV-only compressed-tensors config
                 (config_groups empty, kv_cache_scheme set, as the runtime reads llm-compressor's): `llmctl quantize` always quantizes weights,
                 so this script measures the float model with the same observer (`quantize/kv_cache.py`)
  kv-absmax      the same with every scale the largest magnitude seen over all calibration tokens / 448
Each is scored by `engine_perplexity(dir, max_windows, dtype="float32", kv_cache_dtype=...)`. Prints JSON
lines, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SAMPLES, SEQ_LEN = 128, 512  # llmctl quantize's defaults


def quantize(src: Path, out: Path, *options: str) -> str | None:
    cmd = [sys.executable, "-c", "from llmctl.cli.main import main; main()", "quantize", str(src), str(out),
           "--device", "cpu", "--eval-windows", "0", "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN), *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[-1] if lines else f"exit {done.returncode}"
    return None


class AbsMax:
    """The other rule llm-compressor offers (observer "static_minmax"): the largest magnitude over every
    calibration token, so that nothing seen in calibration is clipped."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.k, self.v, self.samples = dtype, 0.0, 0.0, 0

    def update(self, k: torch.Tensor, v: torch.Tensor, *args, **kwargs):
        self.k, self.v = max(self.k, k.abs().max().item()), max(self.v, v.abs().max().item())
        self.samples += len(k)
        return k, v

    def check_saw(self, samples: int) -> None:
        if self.samples != samples:
            raise RuntimeError(f"saw {self.samples} of {samples} calibration samples")

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor([m], dtype=self.dtype) / torch.tensor(448.0, dtype=self.dtype)
                     for m in (self.k, self.v))


@torch.no_grad()
def kv_only_checkpoint(src: Path, out: Path, observer=None) -> None:
    """src's own tensors plus a k_scale / v_scale per layer, measured on the float model (each attention's
    post-rotary keys, through the observer `llmctl quantize` uses unless another is given), with a KV-only
    compressed-tensors config."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from llmctl.checkpoint.formats.compressed_tensors import fp8_kv_cache_scheme, kv_cache_scale_tensors
    from llmctl.checkpoint.loader import read_tensors
    from llmctl.quantize.calibration import calibration_ids
    from llmctl.quantize.kv_cache import KVCacheObserver
    from llmctl.quantize.pipeline import save_dtype

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation="sdpa")
    tensors = dict(read_tensors(src))
    dtype = save_dtype(next(iter(tensors.values())).dtype)
    observers = [(observer or KVCacheObserver)(dtype) for _ in model.model.layers]
    for layer, observer in zip(model.model.layers, observers):
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs, o=observer: (args, {**kwargs, "past_key_values": o}), with_kwargs=True)
    ids = calibration_ids("builtin", src, SAMPLES, SEQ_LEN)
    for chunk in ids.split(8):
        model(input_ids=chunk, use_cache=False)
    for i, observer in enumerate(observers):
        observer.check_saw(len(ids))
        tensors.update({f"model.layers.{i}.{n}": t for n, t in kv_cache_scale_tensors(*observer.scales(), dtype).items()})
    shutil.copytree(src, out)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
        "config_groups": {}, "ignore": [], "sparsity_config": {}, "transform_config": {},
        "kv_cache_scheme": fp8_kv_cache_scheme()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def scale_range(path: Path) -> str:
    """The checkpoint's k and v scales, smallest to largest over the layers."""
    from llmctl.checkpoint.loader import read_tensors

    values: dict[str, list[float]] = {"k_scale": [], "v_scale": []}
    for name, t in read_tensors(path):
        if name.endswith(("self_attn.k_scale", "self_attn.v_scale")):
            values[name.rsplit(".", 1)[1]].append(t.item())
    return ", ".join(f"{k} {min(v):.4g}-{max(v):.4g}" for k, v in values.items() if v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the embedded reference model")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    args = parser.parse_args()
    from llmctl.bench.perplexity import engine_perplexity
    from llmctl.reference import default_model_path

    src = args.model or default_model_path()
    root = args.out or Path(tempfile.mkdtemp(prefix="llmctl-kv-"))
    if not (root / "kv").exists():
        kv_only_checkpoint(src, root / "kv")
    if not (root / "kv-absmax").exists():
        kv_only_checkpoint(src, root / "kv-absmax", AbsMax)
    jobs = {"fp8": ("--method", "fp8"), "fp8-kv": ("--method", "fp8", "--kv-cache-dtype", "fp8")}
    if not args.no_peer:
        jobs["peer-fp8-kv"] = (*jobs["fp8-kv"], "--backend", "llmcompressor")
    errors = {name: quantize(src, root / name, *options) for name, options in jobs.items() if not (root / name).exists()}
    runs = [("model's weights", src, "float32", "none"), ("model's weights", src, "fp8", "1.0"),
            ("model's weights", root / "kv", "fp8", "calibrated (llmctl observer)"),
            ("model's weights", root / "kv-absmax", "fp8", "absmax over all calibration tokens / 448"),
            ("FP8 (llmctl)", root / "fp8", "float32", "none"), ("FP8 (llmctl)", root / "fp8", "fp8", "1.0"),
            ("FP8 (llmctl)", root / "fp8-kv", "fp8", "calibrated (llmctl)")]
    if not args.no_peer:
        runs.append(("FP8 (llm-compressor)", root / "peer-fp8-kv", "fp8", "calibrated (llm-compressor)"))
    rows = []
    for weights, path, kv_dtype, kv_scales in runs:
        error = errors.get(Path(path).name)
        if error:
            rows.append((weights, kv_dtype, kv_scales, error, None))
            continue
        options = {"kv_cache_dtype": "fp8"} if kv_dtype == "fp8" else {}
        result = engine_perplexity(Path(path), args.max_windows, dtype="float32", device="cpu", **options)
        print(json.dumps({"weights": weights, "kv": kv_dtype, "scales": kv_scales, "checkpoint_scales": scale_range(Path(path)), **result}), flush=True)
        rows.append((weights, kv_dtype, kv_scales, f"{result['perplexity']:.4f}", result))
    base = rows[0][4]
    print(f"\n{base['tokens']} scored tokens ({args.max_windows} windows)\n")
    print("| weights | KV cache | KV scales | perplexity | vs fp32 KV, same weights |")
    print("| --- | --- | --- | ---: | ---: |")
    reference = {}
    for weights, kv_dtype, kv_scales, ppl, result in rows:
        if result is not None and kv_dtype == "float32":
            reference[weights] = result["perplexity"]
        ref = reference.get(weights) or reference.get("FP8 (llmctl)")
        delta = f"{(result['perplexity'] / ref - 1) * 100:+.2f}%" if result and ref and kv_dtype == "fp8" else "–"
        print(f"| {weights} | {kv_dtype} | {kv_scales} | {ppl} | {delta} |")


if __name__ == "__main__":
    main()
