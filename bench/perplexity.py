"""Held-out perplexity of the reference model as llmctl's own engine computes it, under any engine option
(an fp8 KV cache, FP8 weights, ...): what `llmctl.reference.evaluate` measures with transformers, from the
engine's prompt logprobs instead.

    python -m llmctl.bench.perplexity [MODEL_DIR] [--max-windows N] [--kv-cache-dtype fp8] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from llmctl.reference import default_model_path
from llmctl.reference.data import read_heldout
from llmctl.reference.evaluate import document_ids, windows


def engine_perplexity(model_dir: Path | None = None, max_windows: int | None = None, **engine_options) -> dict:
    """Perplexity as llmctl's own engine computes it (`LLM(model_dir, **engine_options)`, e.g. an fp8 KV cache),
    from its prompt logprobs. Windows are one token shorter than the context, so that each prompt leaves
    room for the one token a request must generate; they score the same tokens under every option."""
    from tokenizers import Tokenizer

    from llmctl.runtime.llm import LLM
    from llmctl.runtime.sampling_params import SamplingParams

    model_dir = Path(model_dir) if model_dir else default_model_path()
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stream = document_ids(tokenizer, [doc.text for doc in read_heldout()], config["bos_token_id"],
                          config["eos_token_id"])
    chunks = windows(stream, config["max_position_embeddings"] - 1, max_windows)
    llm = LLM(str(model_dir), **engine_options)
    results = llm.generate([c.tolist() for c in chunks], SamplingParams(max_tokens=1, prompt_logprobs=0))
    logprobs = [lp for r in results for lp, _ in r.prompt_logprobs]
    nll = -sum(logprobs) / len(logprobs)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": len(logprobs)}



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmctl.bench.perplexity", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, help="default: the shipped reference model")
    parser.add_argument("--max-windows", type=int, help="score only the first N windows")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    print(json.dumps(engine_perplexity(args.model_dir, args.max_windows, kv_cache_dtype=args.kv_cache_dtype,
                                       dtype=args.dtype, device=args.device)))


if __name__ == "__main__":
    main()
