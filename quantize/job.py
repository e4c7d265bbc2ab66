"""One quantize job, what `llmctl quantize` runs: llmctl's own pipeline or a peer library writes the
checkpoint into `out`, and `quant_report.json` beside it records the settings, the time and the held-out
perplexity before and after, read back through llmctl's reader whoever wrote the checkpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmctl.quantize.methods import MethodConfig
from llmctl.quantize.pipeline import LayerStats


def quantize_llmctl(src: Path, out: Path, cfg: MethodConfig, calib_ids: torch.Tensor, eval_ids: torch.Tensor | None,
                    device: str, batch_size: int, calibration: dict,
                    on_layer: Callable[[LayerStats, int], None] | None = None,
                    on_stage: Callable[[str, int | None], None] | None = None) -> dict:
    """Quantize layer by layer and write checkpoint and report; on_stage and on_layer as quantize_model's."""
    from llmctl.quantize.export import write_checkpoint
    from llmctl.quantize.pipeline import quantize_model
    from llmctl.quantize.report import build_report

    result = quantize_model(src, cfg, calib_ids, eval_ids, device, batch_size, on_layer, on_stage)
    if on_stage:
        on_stage("writing the checkpoint", None)
    report = build_report(cfg, result, str(src), calibration)
    write_checkpoint(src, out, result.tensors, result.dtype, report["quantization_config"], report)
    return report


def quantize_with_peer(backend: str, src: Path, out: Path, cfg: MethodConfig, calib_ids: torch.Tensor,
                       eval_ids: torch.Tensor | None, device: str, calibration: dict) -> dict:
    """The peer writes the checkpoint; llmctl times it and measures it through its own reader."""
    from llmctl.quantize.backends import run_backend

    start = time.perf_counter()
    run_backend(backend, src, out, cfg, calib_ids, device)
    seconds = time.perf_counter() - start
    quant_config = json.loads((out / "config.json").read_text()).get("quantization_config")
    report = {"backend": backend, "source": str(src), "method": cfg.method, "seconds": round(seconds, 3),
              "quantization_config": quant_config, "calibration": calibration,
              "perplexity": _perplexity(src, out, eval_ids, quant_config), "peak_memory": {}, "layers": []}
    (out / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _perplexity(src: Path, out: Path, eval_ids: torch.Tensor | None, quant_config: dict | None) -> dict | None:
    if eval_ids is None or quant_config is None:
        return None
    from llmctl.quantize.dense import dense_model
    from llmctl.reference.evaluate import perplexity

    results = []
    for model_dir in (src, out):
        model = dense_model(model_dir)
        results.append(perplexity(lambda ids, model=model: model(input_ids=ids).logits, list(eval_ids)))
    before, after = results
    return {"before": before["perplexity"], "after": after["perplexity"], "tokens": after["tokens"]}
