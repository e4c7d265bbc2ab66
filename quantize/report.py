"""`quant_report.json` and the table the CLI closes with."""

from __future__ import annotations

from dataclasses import asdict

from llmctl.quantize.methods import MethodConfig
from llmctl.quantize.pipeline import Result


def build_report(cfg: MethodConfig, result: Result, source: str, calibration: dict | None,
                 backend: str = "llmctl") -> dict:
    from llmctl import __version__

    return {
        "llmctl_version": __version__,
        "backend": backend,
        "source": source,
        "method": cfg.method,
        "quantization_config": cfg.quantization_config(tuple(result.ignore)),
        "calibration": calibration,
        "perplexity": result.perplexity,
        "seconds": round(result.seconds, 3),
        "peak_memory": result.peak_memory,
        "layers": [{**asdict(s), "seconds": round(s.seconds, 3)} for s in result.layers],
        "unrouted_experts": sum(s.unrouted_experts for s in result.layers),
    }


def summary_table(report: dict):
    from rich.table import Table

    table = Table(title=f"{report['method']} via {report['backend']}", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("output error", justify="right")
    for layer in report["layers"]:
        error = "-" if layer["error"] is None else f"{layer['error']:.2e}"
        table.add_row(str(layer["index"]), f"{layer['seconds']:.2f}", error)
    table.add_section()
    table.add_row("total", f"{report['seconds']:.2f}", "")
    return table


def summary_lines(report: dict) -> list[str]:
    lines = [scheme_line(report["quantization_config"] or {})]
    ppl = report.get("perplexity")
    if ppl:
        lines.append(f"held-out perplexity {ppl['before']:.3f} -> {ppl['after']:.3f} ({ppl['tokens']} tokens)")
    if report.get("unrouted_experts"):
        lines.append(f"{report['unrouted_experts']} experts saw no calibration token and were rounded to nearest: "
                     "more or longer calibration samples reach more experts")
    mem = report.get("peak_memory") or {}
    if "max_memory_allocated_bytes" in mem:
        lines.append(f"peak GPU memory {mem['max_memory_allocated_bytes'] / 2**30:.2f} GiB")
    elif "peak_rss_bytes" in mem:
        lines.append(f"peak process memory {mem['peak_rss_bytes'] / 2**30:.2f} GiB")
    return lines


def scheme_line(qc: dict) -> str:
    """What the checkpoint stores, in a few words: GPTQ and AWQ give bits and group size at the top level,
    compressed-tensors in its (first) config group."""
    if qc.get("quant_method") != "compressed-tensors":
        return f"{qc.get('quant_method')} {qc.get('bits', '?')}-bit, group size {qc.get('group_size', '?')}"
    group = next(iter(qc["config_groups"].values()))
    w, inputs = group["weights"], group.get("input_activations")
    size = {"group": f"group size {w['group_size']}", "channel": "a scale per output channel"}.get(
        w["strategy"], f"{w['strategy']} scales")
    line = f"compressed-tensors {group.get('format') or qc['format']}: {w['type']}{w['num_bits']} weights, {size}"
    if inputs:
        line += f"; {inputs['type']}{inputs['num_bits']} activations per {inputs['strategy']}" + (
            " at run time" if inputs.get("dynamic") else "")
    kv = qc.get("kv_cache_scheme")
    if kv:
        line += f"; {kv['type']}{kv['num_bits']} KV cache, calibrated k and v scales per layer"
    return line
