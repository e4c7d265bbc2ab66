"""The engine's one typed configuration; user input is checked here with ValueError, never assert."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llmctl.checkpoint.formats import format_for, quantization_config
from llmctl.runtime.models.families import FAMILIES, Family, family_for
from llmctl.runtime.speculative import SpeculativeConfig

SUPPORTED_DTYPES = ("auto", "float16", "bfloat16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # auto: the model's dtype; fp8 is e4m3 (vLLM's names)
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class EngineConfig:
    """Everything the engine needs to start. `hf_config` and `max_model_len` are filled from the model."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    kv_cache_memory: int | None = None  # bytes; the CPU's KV budget, or an explicit override on CUDA
    kv_cache_dtype: str = "auto"  # or "fp8": e4m3 codes with a scale per layer, half of fp16's bytes
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs (neither with kernel_backend="torch")
    kernel_backend: str = "auto"  # Triton kernels (attention, norms, rotary...): auto = on CUDA only
    scheduling_policy: str = "fcfs"  # or "priority": requests' priority values order admission and preemption
    speculative: SpeculativeConfig | dict | None = None  # speculative decoding (a dict: SpeculativeConfig's fields)
    tensor_parallel_size: int = 1  # processes (GPUs) one model is split over (parallel.py)
    seed: int = 0
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        path = Path(self.model)
        if not path.is_dir():
            raise ValueError(f"model directory not found: {self.model}")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"no config.json in model directory {self.model}")
        try:
            self.hf_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
        if family_for(self.hf_config) is None:
            architectures = self.hf_config.get("architectures") or "none"
            raise ValueError(f"unsupported architecture {architectures} in {config_file}; supported: "
                             f"{', '.join(FAMILIES)}")
        quant_config = quantization_config(path)
        if quant_config is not None:
            format_for(quant_config)  # a format llmctl cannot read fails here, naming the field, not at load
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
                             + (" (e5m2 is not supported: use fp8, which is e4m3)" if "e5m2" in self.kv_cache_dtype else ""))
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if self.kernel_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel_backend must be auto, triton or torch, got {self.kernel_backend!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if isinstance(self.speculative, dict):
            unknown = sorted(set(self.speculative) - {f.name for f in fields(SpeculativeConfig)})
            if unknown:
                raise ValueError(f"unknown speculative option(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(f.name for f in fields(SpeculativeConfig))}")
            self.speculative = SpeculativeConfig(**self.speculative)
        self._check_positive("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size")
        if self.tensor_parallel_size > 1:
            self._check_tensor_parallel()
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        model_max = int(self.hf_config.get("max_position_embeddings", 2048))
        if self.max_model_len is None:
            self.max_model_len = model_max
        elif not 1 <= self.max_model_len <= model_max:
            raise ValueError(f"max_model_len must be in [1, {model_max}] for this model, got {self.max_model_len}")

    def _check_tensor_parallel(self) -> None:
        """What tensor parallelism splits must split evenly."""
        from llmctl.runtime.parallel import check_divisible

        cfg = self.hf_config
        heads = cfg["num_attention_heads"]
        moe = self.family.moe_module is not None
        check_divisible(heads, cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"],
                        self.tensor_parallel_size,
                        (cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) if moe else None)

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype != "auto"

    @property
    def family(self) -> Family:
        return family_for(self.hf_config)
