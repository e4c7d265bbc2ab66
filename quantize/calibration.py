"""Calibration data: texts from the builtin set or a file, tokenized into equal windows of token ids.

Texts are joined as `<bos> text <eos>` (like the reference evaluation) into one token stream that is
cut into windows of exactly `seq_len` tokens, and `samples` of them are taken evenly across the
stream. Equal windows need no padding and no attention mask, and a peer library fed the same
windows sees exactly the same tokens.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

BUILTIN = "builtin"


def builtin_path() -> Path:
    """The shipped calibration set: windows of the reference corpus's train split (Python source)."""
    from llmctl.reference import DATA_DIR
    from llmctl.reference.data import CALIBRATION_FILE

    return DATA_DIR / CALIBRATION_FILE


def load_texts(source: str) -> list[str]:
    """`builtin`, a JSONL file with a "text" field per line, or a plain text file (one text); .gz is read too."""
    path = builtin_path() if source == BUILTIN else Path(source)
    if not path.is_file():
        raise ValueError(f"calibration file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read calibration file {path}: {exc}") from None
    if ".jsonl" in path.suffixes:
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: each JSONL line needs a string field \"text\"")
            texts.append(record["text"])
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"calibration data {path} is empty")
    return texts


def token_windows(texts: list[str], tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] int64 token ids; `tokenizer` is a transformers tokenizer."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 sample of at least 2 tokens, got {samples} x {seq_len}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        stream += [*bos, *ids, *eos]
    available = len(stream) // seq_len
    if available == 0:
        raise ValueError(f"calibration data is too short: {len(stream)} tokens, less than one "
                         f"window of --seq-len {seq_len}")
    if available < samples:
        raise ValueError(f"calibration data is too short: {len(stream)} tokens make {available} windows of "
                         f"{seq_len}, but --samples asks for {samples}; give more text or lower --samples / --seq-len")
    windows = torch.tensor(stream[: available * seq_len]).view(available, seq_len)
    pick = torch.linspace(0, available - 1, samples).round().long()
    return windows[pick]


def calibration_ids(source: str, model_dir: str | Path, samples: int, seq_len: int) -> torch.Tensor:
    from llmctl.checkpoint.loader import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer to turn calibration text into tokens")
    return token_windows(load_texts(source), tokenizer, samples, seq_len)


EVAL_CONTEXT = 2048  # held-out windows are at most this long, whatever context the model allows


def heldout_windows(model_dir: str | Path, max_windows: int) -> torch.Tensor | None:
    """[windows, context] full windows of the reference held-out text in the model's own tokenizer,
    framed as reference/evaluate.py frames it; None where the model lacks what that needs."""
    from tokenizers import Tokenizer

    from llmctl.reference.data import read_heldout
    from llmctl.reference.evaluate import document_ids, windows

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    if max_windows < 1 or not (model_dir / "tokenizer.json").is_file() or not isinstance(bos, int) or not isinstance(eos, int):
        return None
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stream = document_ids(tokenizer, [doc.text for doc in read_heldout()], bos, eos)
    context = min(int(config.get("max_position_embeddings", EVAL_CONTEXT)), EVAL_CONTEXT)
    full = [w for w in windows(stream, context, max_windows) if len(w) == context]
    return torch.stack(full) if full else None
