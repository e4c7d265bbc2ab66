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
                        help="Speculative decoding: ngram (prompt lookup: drafts copied from earlier in the "
                             "prompt or output; exact, greedy outputs unchanged).")


def num_speculative_tokens() -> int:
    return typer.Option(4, envvar="LLMCTL_NUM_SPECULATIVE_TOKENS", min=1, max=16,
                        help="Drafts a sequence brings to one step, with --speculative.")


def speculative_config(method: str | None, num_tokens: int) -> dict | None:
    """EngineConfig's `speculative` for the flags (it checks the method)."""
    return None if method is None else {"method": method, "num_tokens": num_tokens}
