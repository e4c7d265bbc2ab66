"""Engine options that several commands share (serve, generate, bench throughput / latency): one definition,
one help text, one environment variable each."""

from __future__ import annotations

import typer


def kv_cache_dtype() -> str:
    return typer.Option("auto", envvar="LLMCTL_KV_CACHE_DTYPE",
                        help="auto (the model's dtype) or fp8 (e4m3, a scale per layer: twice the tokens in "
                             "the same memory; Ada/Hopper GPUs or CPU).")


def speculative() -> str:
    return typer.Option(None, envvar="LLMCTL_SPECULATIVE", show_default=False,
                        help="Speculative decoding, exact (greedy outputs unchanged): ngram (prompt lookup: drafts "
                             "copied from earlier in the prompt or output) or draft (a smaller model's guesses, "
                             "--draft-model).")


def num_speculative_tokens() -> int:
    return typer.Option(4, envvar="LLMCTL_NUM_SPECULATIVE_TOKENS", min=1, max=16,
                        help="Drafts a sequence brings to one step, with --speculative.")


def draft_model() -> str:
    return typer.Option(None, envvar="LLMCTL_DRAFT_MODEL", show_default=False,
                        help="With --speculative draft: the draft model's directory (the target's vocabulary).")


def tensor_parallel_size() -> int:
    return typer.Option(1, envvar="LLMCTL_TENSOR_PARALLEL_SIZE", min=1,
                        help="GPUs (processes, on a CPU) one model is split over, one process each; it must divide "
                             "the attention heads and the MLP width. fp16 / bf16 / fp32 dense models for now.")


def speculative_config(method: str | None, num_tokens: int, draft: str | None = None) -> dict | None:
    """EngineConfig's `speculative` for the flags (it checks them)."""
    if method is None:
        if draft is not None:
            raise ValueError("--draft-model needs --speculative draft")
        return None
    return {"method": method, "num_tokens": num_tokens, **({"draft_model": draft} if draft is not None else {})}
