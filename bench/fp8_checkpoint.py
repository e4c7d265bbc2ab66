"""An FP8 copy of a dense checkpoint, for the FP8 benchmarks (the hub's FP8 releases cannot be downloaded here).

    python -m llmctl.bench.fp8_checkpoint SRC OUT --scales channel   # llm-compressor's FP8-dynamic layout
    python -m llmctl.bench.fp8_checkpoint SRC OUT --scales block     # `quant_method: fp8`, 128 x 128 blocks

channel: compressed-tensors `float-quantized`, one scale per output channel, activations quantized per token
at run time (what llm-compressor's FP8_DYNAMIC scheme writes). block: DeepSeek-V3's layout (`weight_scale_inv`
per 128 x 128 block, dynamic 1 x 128 activation groups). Each decoder linear's weight is scaled so that its
channel's (or block's) largest magnitude maps to FP8's largest value; everything else is copied as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from llmctl.checkpoint.loader import read_tensors

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = 128


def quantize(weight: torch.Tensor, scales: str) -> dict[str, torch.Tensor]:
    """One linear's FP8 tensors, keyed by suffix."""
    w = weight.float()
    if scales == "channel":
        scale = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [out, 1]
        return {"weight": (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), "weight_scale": scale}
    out, inp = w.shape
    if out % BLOCK or inp % BLOCK:
        raise ValueError(f"a {out} x {inp} weight is not whole {BLOCK} x {BLOCK} blocks")
    blocks = w.unflatten(0, (-1, BLOCK)).unflatten(-1, (-1, BLOCK))  # [out/B, B, in/B, B]
    scale = (blocks.abs().amax((1, 3)) / FP8_MAX).clamp(min=1e-12)  # [out/B, in/B]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(2).flatten(0, 1)
    return {"weight": q, "weight_scale_inv": scale}


def config(scales: str) -> dict:
    if scales == "block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": [BLOCK, BLOCK]}
    float8 = {"num_bits": 8, "type": "float", "symmetric": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {
                "targets": ["Linear"], "format": "float-quantized",
                "weights": {**float8, "strategy": "channel", "dynamic": False},
                "input_activations": {**float8, "strategy": "token", "dynamic": True},
                "output_activations": None}}}


def convert(src: Path, out: Path, scales: str, device: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=False)
    tensors = {}
    for name, tensor in read_tensors(src):
        module, _, part = name.rpartition(".")
        if part == "weight" and module.rpartition(".")[2] in LINEARS and ".layers." in name:
            for suffix, value in quantize(tensor.to(device), scales).items():
                tensors[f"{module}.{suffix}"] = value.cpu().contiguous()
        else:
            tensors[name] = tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = json.loads((src / "config.json").read_text())
    hf_config["quantization_config"] = config(scales)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for file in src.iterdir():
        if file.name not in ("config.json", "model.safetensors", "model.safetensors.index.json") \
                and not file.name.endswith(".safetensors") and file.is_file():
            shutil.copy2(file, out / file.name)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llmctl.bench.fp8_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scales", choices=("channel", "block"), default="channel")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    convert(args.src, args.out, args.scales, args.device)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
