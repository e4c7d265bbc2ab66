"""The serving engine: paged KV cache, continuous batching, Triton kernels, an offline and an async API.

Heavy modules (torch, transformers) load on first use, so `import llmctl.runtime` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmctl.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmctl.runtime.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from llmctl.runtime.llm import LLM

        return LLM
    raise AttributeError(name)
