"""Quantization: AWQ, GPTQ and RTN, layer by layer, into GPTQ v1 / AWQ GEMM / compressed-tensors checkpoints;
FP8 weights (compressed-tensors float-quantized, llm-compressor's FP8_DYNAMIC).

The checkpoint layouts themselves (packing, configs, reading) live in `llmctl.checkpoint`, which the
runtime shares; this package never imports `llmctl.runtime`.

    grid.py         the integer grid (scale, zero), RTN
    fp8.py          FP8 weights with a scale per output channel, as llm-compressor computes them
    gptq.py         GPTQ on one matrix: Hessian, dampening, Cholesky inverse, blocked error propagation
    awq.py          AWQ's scale and clipping searches
    layer.py        one transformers decoder layer on the device, run on calibration activations
    methods.py      each method applied to one decoder layer; MethodConfig
    kv_cache.py     calibrated FP8 KV-cache scales (llm-compressor's kv_cache_scheme), one a layer for k and v
    pipeline.py     the layer-by-layer driver (one layer on the accelerator at a time)
    calibration.py  builtin / text / JSONL calibration data into token windows
    export.py       the output directory;  report.py  quant_report.json and the closing table
    dense.py        any GPTQ / AWQ checkpoint as a dense transformers model (tests, quality table)
    backends.py     the same job via AutoAWQ, GPTQModel or llm-compressor
    bench.py        time and peak GPU memory on a random Llama-2-7B-shape model

Importing this package is cheap: torch and transformers load with the modules that need them.
"""
