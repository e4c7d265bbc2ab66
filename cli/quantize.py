"""`llmctl quantize`: an HF model directory in, a GPTQ or AWQ 4-bit checkpoint (or an FP8 one) out."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.console import console, emit, fail, start_output


def quantize(
    src: Path = typer.Argument(..., help="Model directory to quantize (HF layout, safetensors).", show_default=False),
    out: Path = typer.Argument(..., help="New or empty output directory.", show_default=False),
    method: str = typer.Option("awq", "--method", "-m", envvar="LLMCTL_QUANT_METHOD",
                               help="awq, gptq, rtn (round-to-nearest, the baseline; writes GPTQ format) or fp8 "
                                    "(FP8 weights, a scale per output channel, FP8 activations per token at run "
                                    "time; no calibration; llm-compressor's FP8_DYNAMIC layout). fp8 takes none of "
                                    "the grid options below."),
    fmt: str = typer.Option(None, "--format", envvar="LLMCTL_QUANT_FORMAT", show_default=False,
                            help="native (GPTQ v1 for gptq and rtn, AWQ GEMM for awq; the default) or "
                                 "compressed-tensors (llm-compressor's pack-quantized, which vLLM and transformers "
                                 "load; fp8 always writes compressed-tensors float-quantized)."),
    bits: int = typer.Option(None, show_default=False,
                             help="Bits per weight: 4 for awq; 2, 4 or 8 for gptq and rtn. Default: 4."),
    group_size: int = typer.Option(None, envvar="LLMCTL_QUANT_GROUP_SIZE", show_default=False,
                                   help="Input channels per scale and zero point; -1 for one per row. "
                                        "Default: 128."),
    sym: bool = typer.Option(None, "--sym/--asym", show_default=False,
                             help="Symmetric grid (zero point fixed) or fitted zero points. "
                                  "Default: --sym for gptq and rtn, --asym for awq."),
    desc_act: bool = typer.Option(False, "--desc-act", help="GPTQ act-order: quantize columns by activation size."),
    static_groups: bool = typer.Option(False, "--static-groups",
                                       help="GPTQ: fit groups before act-order so they stay consecutive channels."),
    damp_percent: float = typer.Option(None, show_default=False,
                                       help="GPTQ: Hessian dampening, a fraction of its mean diagonal. "
                                            "Default: 0.01."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype", envvar="LLMCTL_QUANT_KV_CACHE_DTYPE",
                                       help="auto (no KV-cache scales) or fp8: calibrate one FP8 (e4m3) scale per "
                                            "layer for keys and one for values on the calibration text, as "
                                            "llm-compressor's kv_cache_scheme does, for `serve --kv-cache-dtype "
                                            "fp8` and vLLM's. Needs --format compressed-tensors (fp8 writes it)."),
    calib: str = typer.Option("builtin", envvar="LLMCTL_QUANT_CALIB",
                              help="Calibration text: builtin (shipped Python source), a .txt or a .jsonl "
                                   "file with a \"text\" field (.gz too). rtn and fp8 use it only to measure "
                                   "each layer's output error."),
    samples: int = typer.Option(128, min=1, help="Calibration windows."),
    seq_len: int = typer.Option(512, min=2, help="Tokens per calibration window."),
    device: str = typer.Option("auto", envvar="LLMCTL_DEVICE", help="auto, cuda or cpu: where each layer is quantized."),
    backend: str = typer.Option("llmctl", envvar="LLMCTL_QUANT_BACKEND",
                                help="llmctl, or a peer library: autoawq, gptqmodel, llmcompressor."),
    eval_windows: int = typer.Option(16, min=0, help="Held-out windows for perplexity before/after; 0 skips it."),
    batch_size: int = typer.Option(8, min=1, help="Calibration windows per forward pass."),
    output: str = typer.Option("text", "--output", help="text, or json: the report (layers, perplexity, "
                                                        "timings) as one document."),
) -> None:
    """Quantize a model to 4 bits with AWQ, GPTQ or RTN, or to FP8, one decoder layer at a time."""
    start_output(output)
    try:
        import torch

        from llmctl.quantize.methods import MethodConfig

        cfg = MethodConfig(method, bits, group_size, sym, desc_act, static_groups, damp_percent, format=fmt,
                           kv_cache_dtype=kv_cache_dtype)
        device = _resolve_device(device, torch)
        _check_dirs(src, out)
        if backend != "llmctl":
            from llmctl.quantize.backends import check_backend

            check_backend(backend, method, kv_cache_dtype)
        from llmctl.quantize.calibration import calibration_ids, heldout_windows

        calib_ids = calibration_ids(calib, src, samples, seq_len)
        eval_ids = heldout_windows(src, eval_windows)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    calibration = {"source": calib, "samples": samples, "seq_len": seq_len}
    try:
        report = (_run_llmctl(src, out, cfg, calib_ids, eval_ids, device, batch_size, calibration) if backend == "llmctl"
                  else _run_peer(backend, src, out, cfg, calib_ids, eval_ids, device, calibration))
    except ValueError as exc:
        fail(str(exc))
    from llmctl.quantize.report import summary_lines, summary_table

    if console.json:
        emit({"output": str(out), **report})
        return
    console.info(summary_table(report))
    for line in summary_lines(report):
        console.info(line)
    console.print(f"wrote {out}")


def _resolve_device(device: str, torch) -> str:
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    return device


def _check_dirs(src: Path, out: Path) -> None:
    from llmctl.quantize.export import check_output_dir, check_source

    check_source(src)
    check_output_dir(src, out)


def _run_llmctl(src, out, cfg, calib_ids, eval_ids, device, batch_size, calibration) -> dict:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from llmctl.quantize.job import quantize_llmctl

    # One bar: the stage's name, then the layers with the time left (from the layers done so far).
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[last]}"), console=console,
                  transient=False, disable=console.quiet_progress) as progress:
        task = progress.add_task("starting", total=None, last="")

        def on_stage(name, steps):
            if steps is not None:
                progress.reset(task, total=steps, description=name, last="")
            else:
                progress.update(task, description=name)

        def on_layer(stats, total):
            error = "" if stats.error is None else f", error {stats.error:.2e}"
            progress.update(task, advance=1, last=f"layer {stats.index}: {stats.seconds:.1f}s{error}")

        return quantize_llmctl(src, out, cfg, calib_ids, eval_ids, device, batch_size, calibration, on_layer,
                               on_stage)


def _run_peer(backend, src, out, cfg, calib_ids, eval_ids, device, calibration) -> dict:
    from llmctl.quantize.job import quantize_with_peer

    with console.status(f"{cfg.method} via {backend} (its own progress output follows)"):
        return quantize_with_peer(backend, src, out, cfg, calib_ids, eval_ids, device, calibration)
