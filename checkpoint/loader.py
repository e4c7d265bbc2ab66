"""Reading a model directory: safetensors weights (single file or sharded), tokenizer, generation config.

Everything that opens a model directory goes through here: the runtime's model runner and engine, and
quantize's calibration and dense reference model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from llmctl.checkpoint.formats.weights import Fp8Weight, QuantizedWeight

Neutral = QuantizedWeight | Fp8Weight


def safetensors_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = f" (found {', '.join(other)}: convert them to safetensors)" if other else ""
        raise ValueError(f"no .safetensors weights in {model_dir}{hint}")
    return files


def tensor_names(model_dir: str | Path) -> list[str]:
    """The names of every tensor in the checkpoint, read from the shards' headers alone."""
    from safetensors import safe_open

    names = []
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names.extend(f.keys())
    return names


def read_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint as stored, on the CPU, shard by shard."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def iter_weights(model_dir: str | Path, dtype: torch.dtype, device: torch.device
                 ) -> Iterator[tuple[str, torch.Tensor | Neutral]]:
    """The checkpoint's tensors on device, floating ones in dtype; a quantized checkpoint's linears arrive as
    one layout-neutral weight each (`formats.read_quantized`), read on the device, for the model to repack
    for its kernels or dequantize."""
    from llmctl.checkpoint.formats import quantization_config, read_quantized

    weights = ((name, tensor.to(device, non_blocking=True)) for name, tensor in read_tensors(model_dir))
    quant_config = quantization_config(model_dir)
    if quant_config:
        weights = read_quantized(weights, quant_config)
    for name, value in weights:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(dtype)
        yield name, value


def checkpoint_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float16"
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(name, torch.float16)


def eos_token_ids(model_dir: str | Path, hf_config: dict, tokenizer=None) -> frozenset[int]:
    """Every id that ends a reply: the generation config's eos ids (chat models list several: Llama 3's
    <|eot_id|> beside <|end_of_text|>, Gemma's <end_of_turn>, Phi-3's <|end|>), else the model config's,
    and the tokenizer's eos (a chat fine-tune often sets <|im_end|> there and nowhere else)."""
    gen = Path(model_dir) / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = hf_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_tokenizer(model_dir: str | Path):
    """The model's own tokenizer, offline; None when the directory has none (token-id prompts only)."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    legacy = model_dir / "chat_template.json"  # where processors (Gemma 3, multimodal releases) keep it
    if not getattr(tokenizer, "chat_template", None) and legacy.is_file():
        tokenizer.chat_template = json.loads(legacy.read_text()).get("chat_template")
    return tokenizer
