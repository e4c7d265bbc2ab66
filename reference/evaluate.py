"""Held-out perplexity of a causal LM on the reference corpus's held-out split.

How it counts: every held-out file becomes `<bos> tokens <eos>`; the files are concatenated in their
shipped order and cut into non-overlapping windows of the model's context length (the last one
shorter). Within a window, each token after the first is predicted from the ones before it, so
every window's first token is never scored. Perplexity is exp(mean negative log-likelihood) over
the scored tokens. The unigram baseline scores exactly the same tokens.

`perplexity` takes any `logits_fn(ids) -> logits`, so a quantized or runtime model can be measured on
the same tokens as the transformers model: `heldout_perplexity` is the transformers wrapper.

    python -m llmctl.reference.evaluate [MODEL_DIR] [--device cuda] [--max-windows N]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llmctl.reference import default_model_path
from llmctl.reference.data import read_heldout

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids: [batch, seq] -> logits: [batch, seq, vocab]


def document_ids(tokenizer, texts: Sequence[str], bos_id: int, eos_id: int) -> list[int]:
    """`<bos> text <eos>` for each text, concatenated; `tokenizer` is a `tokenizers.Tokenizer`."""
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        stream += [bos_id, *encoding.ids, eos_id]
    return stream


def windows(stream: Sequence[int], context: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of `context` tokens; windows of one token score nothing and are dropped."""
    ids = torch.tensor(stream, dtype=torch.long)
    chunks = [c for c in ids.split(context) if len(c) > 1]
    return chunks[:max_windows] if max_windows is not None else chunks


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, chunks: list[torch.Tensor], device: str = "cpu", batch_size: int = 8) -> dict:
    total_nll, scored = 0.0, 0
    # Full windows go in batches; a shorter last window goes alone.
    full = [c for c in chunks if len(c) == len(chunks[0])]
    groups = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    groups += [c[None] for c in chunks if len(c) != len(chunks[0])]
    for ids in groups:
        ids = ids.to(device)  # [batch, seq]
        logits = logits_fn(ids[:, :-1]).float()  # [batch, seq - 1, vocab]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        scored += ids[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / scored), "nll": total_nll / scored, "tokens": scored}


def unigram_perplexity(counts: torch.Tensor, chunks: list[torch.Tensor]) -> dict:
    """Add-one smoothed unigram model from `counts` (train-split token counts, [vocab]), scored like `perplexity`."""
    log_probs = torch.log((counts.double() + 1) / (counts.double().sum() + len(counts)))
    targets = torch.cat([c[1:] for c in chunks])
    nll = -log_probs[targets].mean().item()
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": len(targets)}


def heldout_chunks(model_dir: Path, max_windows: int | None = None) -> list[torch.Tensor]:
    """The held-out split tokenized with `model_dir`'s tokenizer, in windows of its context length."""
    from tokenizers import Tokenizer

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = [doc.text for doc in read_heldout()]
    stream = document_ids(tokenizer, texts, config["bos_token_id"], config["eos_token_id"])
    return windows(stream, config["max_position_embeddings"], max_windows)


def heldout_perplexity(model_dir: Path | None = None, device: str = "cpu", max_windows: int | None = None) -> dict:
    """Perplexity of a transformers-loadable model directory, computed in float32."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir) if model_dir else default_model_path()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.to(device).eval()
    return perplexity(lambda ids: model(input_ids=ids).logits, heldout_chunks(model_dir, max_windows), device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmctl.reference.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, help="default: the shipped reference model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-windows", type=int, help="score only the first N windows")
    args = parser.parse_args(argv)
    print(json.dumps(heldout_perplexity(args.model_dir, args.device, args.max_windows), indent=2))


if __name__ == "__main__":
    main()
