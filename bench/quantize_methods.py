"""Quantization time and peak GPU memory on a random-weight model of Llama-2-7B's shape.

    python -m llmctl.bench.quantize_methods [--methods awq gptq rtn] [--samples 128] [--seq-len 2048] [--device cuda]

Writes the random fp16 model (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000) to a
temporary directory, then for each method times `quantize_model` on random calibration tokens (load,
every layer, packing) and writing the checkpoint, and prints one JSON line per method. Random
weights make the timing honest (every layer does all the work) but say nothing about quality.
The shape options shrink the model for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def write_random_llama(path: Path, hidden: int, intermediate: int, layers: int, heads: int, vocab: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=4096, dtype="float16")
    config.save_pretrained(path)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden).half(),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}self_attn.{name}.weight"] = rand(hidden, hidden)
        tensors[f"{p}mlp.gate_proj.weight"] = rand(intermediate, hidden)
        tensors[f"{p}mlp.up_proj.weight"] = rand(intermediate, hidden)
        tensors[f"{p}mlp.down_proj.weight"] = rand(hidden, intermediate)
        tensors[f"{p}input_layernorm.weight"] = torch.ones(hidden).half()
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden).half()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def bench(model_dir: Path, method: str, samples: int, seq_len: int, device: str, vocab: int) -> dict:
    from llmctl.quantize.export import write_checkpoint
    from llmctl.quantize.methods import MethodConfig
    from llmctl.quantize.pipeline import quantize_model

    cfg = MethodConfig(method, 4, 128, sym=method != "awq")
    calib = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    result = quantize_model(model_dir, cfg, calib, device=device)
    with tempfile.TemporaryDirectory() as out:
        write_checkpoint(model_dir, Path(out) / "q", result.tensors, result.dtype, cfg.quantization_config(), {})
    return {"method": method, "samples": samples, "seq_len": seq_len, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "quantize_seconds": round(result.seconds, 1), "total_seconds": round(time.perf_counter() - start, 1),
            "slowest_layer_seconds": round(max(s.seconds for s in result.layers), 2),
            "peak_memory": result.peak_memory}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmctl.bench.quantize_methods", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--model-dir", type=Path, help="reuse (or create) the random model here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / "random-llama"
        if not (model_dir / "model.safetensors").is_file():
            model_dir.mkdir(parents=True, exist_ok=True)
            write_random_llama(model_dir, args.hidden, args.intermediate, args.layers, args.heads, args.vocab)
        for method in args.methods:
            print(json.dumps(bench(model_dir, method, args.samples, args.seq_len, args.device, args.vocab)), flush=True)


if __name__ == "__main__":
    main()
