"""Checkpoints on disk: the one place that knows their layouts, shared by the runtime and quantize.

    loader.py   reading a model directory: config, safetensors shards, tokenizer, eos ids, weights
    formats/    the quantized layouts (GPTQ, AWQ, compressed-tensors, FP8) read into layout-neutral weights

`llmctl.runtime` reads checkpoints and `llmctl.quantize` writes them; both import this package and
neither imports the other. Importing it is cheap: torch loads with the modules that need it.
"""
