"""The output directory: a checkpoint that AutoGPTQ / GPTQModel / AutoAWQ, vLLM, transformers and llmctl read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# Everything besides the weights that a loader or a tokenizer may look for.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def check_source(src: Path) -> None:
    """src holds an unquantized model: quantizing a quantized one would fail deep in transformers' loader."""
    if not (src / "config.json").is_file():
        raise ValueError(f"no model in {src}: config.json not found")
    config = json.loads((src / "config.json").read_text())
    quant = config.get("quantization_config") or config.get("compression_config")
    if quant is None and (src / "quantize_config.json").is_file():  # AutoGPTQ's own file
        quant = {"quant_method": "gptq", **json.loads((src / "quantize_config.json").read_text())}
    if isinstance(quant, dict):
        method = quant.get("quant_method") or quant.get("format") or "unknown method"
        bits = f", {quant['bits']} bits" if "bits" in quant else ""
        raise ValueError(f"{src} is already quantized ({method}{bits}): quantize the original "
                         f"fp16/bf16/fp32 model instead")


def check_output_dir(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise ValueError("the output directory must differ from the source model directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} exists and is not empty; choose a new one")


def write_checkpoint(src: Path, out: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                     quant_config: dict, report: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant_config
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES[dtype]  # transformers < 5 reads torch_dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors writes the weights 0600; they get the mode the umask gives every other file here, so that
    # a server running as another user (the image's UID 1001, a mounted volume) can read them.
    (out / "model.safetensors").chmod((out / "config.json").stat().st_mode & 0o777)
    if quant_config["quant_method"] == "gptq":
        # AutoGPTQ reads its settings from here rather than from config.json.
        (out / "quantize_config.json").write_text(json.dumps(quant_config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    (out / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")
