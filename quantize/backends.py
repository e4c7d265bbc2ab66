"""`--backend autoawq | gptqmodel | llmcompressor`: the same job done by a peer library, where installed.

Each peer gets exactly llmctl's calibration windows (token ids, no padding), so results compare.
AutoAWQ and GPTQModel write the same GPTQ / AWQ layouts as llmctl; llm-compressor writes
compressed-tensors checkpoints (whatever --format says), which llmctl, vLLM and transformers read.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llmctl.checkpoint.formats.compressed_tensors import fp8_kv_cache_scheme
from llmctl.quantize.export import COPIED_FILES
from llmctl.quantize.methods import MethodConfig

BACKENDS = {  # name: (import name, what to install, methods it runs)
    "autoawq": ("awq", "autoawq", ("awq",)),
    "gptqmodel": ("gptqmodel", "gptqmodel", ("gptq", "awq")),
    "llmcompressor": ("llmcompressor", "llmcompressor", ("gptq", "awq", "fp8")),
}


class BackendError(ValueError):
    """The peer library is not installed, cannot run this job, or failed doing it."""


def check_backend(name: str, method: str, kv_cache_dtype: str = "auto") -> None:
    if name not in BACKENDS:
        raise BackendError(f"backend must be llmctl, {', '.join(BACKENDS)}; got {name!r}")
    module, package, methods = BACKENDS[name]
    if method not in methods:
        raise BackendError(f"--backend {name} runs --method {' or '.join(methods)}, not {method}")
    if kv_cache_dtype != "auto" and name != "llmcompressor":
        raise BackendError(f"--backend {name} writes no KV-cache scales: --kv-cache-dtype {kv_cache_dtype} runs "
                           "with --backend llmctl or llmcompressor")
    if name == "gptqmodel" and (os.cpu_count() or 1) < 4:
        # GPTQModel sizes its CPU worker pool as half the cores and then asks that pool for 2 loader
        # workers, which fails on 2- and 3-core machines unless the pool size is given.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(
            f"--backend {name} needs the {package} package, which is not importable here ({exc}); "
            f"install it with `pip install {package}` or `pip install 'llmctl[quantize-peers]'`") from None


def run_backend(name: str, src: Path, out: Path, cfg: MethodConfig, calib_ids: torch.Tensor, device: str) -> None:
    """Quantize src into out with the peer library; raises BackendError when it cannot."""
    check_backend(name, cfg.method, cfg.kv_cache_dtype)
    if name == "llmcompressor" and cfg.method == "awq" and device == "cpu":
        # Its AWQ smoothing step asks for an accelerator even when the model is on the CPU.
        raise BackendError("llm-compressor's AWQ needs a GPU (--device cuda); its GPTQ runs on the CPU")
    runner = {"autoawq": _autoawq, "gptqmodel": _gptqmodel, "llmcompressor": _llmcompressor}[name]
    try:
        runner(src, out, cfg, calib_ids, device)
    except BackendError:
        raise
    except Exception as exc:  # a peer fails in its own ways (GPTQModel's AWQ: "CUDA is not available")
        raise BackendError(f"{name} failed: {type(exc).__name__}: {exc}") from exc
    for file in COPIED_FILES:  # peers copy the tokenizer only when they loaded one themselves
        if (src / file).is_file() and not (out / file).exists():
            shutil.copy2(src / file, out / file)


def _autoawq(src: Path, out: Path, cfg: MethodConfig, calib_ids: torch.Tensor, device: str) -> None:
    from awq import AutoAWQForCausalLM

    if cfg.sym:
        raise BackendError("AutoAWQ writes GEMM checkpoints with zero points only; use --asym")
    # AutoAWQ picks its device itself (CUDA when present); its loader cannot reload on CPU without IPEX.
    model = AutoAWQForCausalLM.from_pretrained(str(src), dtype=torch.float16)
    quant_config = {"zero_point": True, "q_group_size": cfg.group_size, "w_bit": cfg.bits, "version": "GEMM"}
    with _autoawq_backup_fix():
        model.quantize(None, quant_config=quant_config, calib_data=calib_ids.tolist(),
                       max_calib_samples=len(calib_ids), max_calib_seq_len=calib_ids.shape[1])
    model.save_quantized(str(out))


@contextmanager
def _autoawq_backup_fix() -> Iterator[None]:
    """AutoAWQ 0.2.9's scale search backs the block's weights up as `{k: v.cpu() for k, v in
    state_dict().items()}` and then scales the live weights in place. On a GPU `.cpu()` copies; on a
    CPU it returns the same tensors, so the backup is scaled too: every grid point after the first
    starts from corrupted weights and the layer keeps an extra, unfolded scale (its CPU checkpoints
    come out worse than RTN). Handing the search a state dict of copies restores the intended algorithm."""
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._compute_best_scale

    def with_copied_backup(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        live = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {n: t.clone() for n, t in live(*a, **k).items()}
        try:
            return search(self, x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict

    AwqQuantizer._compute_best_scale = with_copied_backup
    try:
        yield
    finally:
        AwqQuantizer._compute_best_scale = search


def _gptqmodel(src: Path, out: Path, cfg: MethodConfig, calib_ids: torch.Tensor, device: str) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    options = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym, "desc_act": cfg.desc_act}
    if cfg.method == "gptq":
        qcfg = QuantizeConfig(**options, damp_percent=cfg.damp_percent, static_groups=cfg.static_groups,
                              true_sequential=cfg.true_sequential, format="gptq")
    else:
        qcfg = QuantizeConfig(**options, quant_method="awq", format="gemm")
    model = GPTQModel.load(str(src), qcfg, device=device)
    mask = torch.ones_like(calib_ids[0])
    model.quantize([{"input_ids": ids[None], "attention_mask": mask[None]} for ids in calib_ids], batch_size=1)
    model.save(str(out))


def _llmcompressor(src: Path, out: Path, cfg: MethodConfig, calib_ids: torch.Tensor, device: str) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto", device_map=device)
    if cfg.method == "fp8" and cfg.kv_cache_dtype == "auto":  # data-free, as its FP8 examples run it
        oneshot(model=model, recipe=_llmcompressor_recipe(cfg))
    else:
        data = Dataset.from_dict({"input_ids": calib_ids.tolist(),
                                  "attention_mask": torch.ones_like(calib_ids).tolist()})
        oneshot(model=model, dataset=data, recipe=_llmcompressor_recipe(cfg), max_seq_length=calib_ids.shape[1],
                num_calibration_samples=len(calib_ids), shuffle_calibration_samples=False)
    model.save_pretrained(str(out), save_compressed=True)


def _llmcompressor_recipe(cfg: MethodConfig) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    kv = {"kv_cache_scheme": fp8_kv_cache_scheme()} if cfg.kv_cache_dtype == "fp8" else {}
    if cfg.method == "fp8":
        return [QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=["lm_head"], **kv)]
    scheme = {"targets": ["Linear"], "weights": {
        "num_bits": cfg.bits, "type": "int", "symmetric": cfg.sym, "strategy": "group", "group_size": cfg.group_size,
        "actorder": "group" if cfg.desc_act and not cfg.static_groups else "static" if cfg.desc_act else None}}
    if cfg.method == "gptq":
        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=cfg.damp_percent,
                             **kv)]
    return [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], **kv)]
