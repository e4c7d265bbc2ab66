"""The structured-output bench's tokenizer: a 150,000-token byte-level BPE, trained on the Python and C sources
installed here (the masks' cost depends on the vocabulary's size and kind, so it stands in for Qwen's 151k).

    python scripts/bench_tokenizer.py OUT_DIR SOURCE_DIR [SOURCE_DIR ...]

e.g. `.gl/tok150k .nox/tests/lib/python3.11/site-packages/{transformers,torch,sympy} /usr/lib/python3.11`
(~170 MB, ~5 minutes on 2 cores). Ids 0, 1, 2 are <pad>, <s>, </s>, as llmctl.bench.random_model's configs say:
were eos a byte token, the engine would stop on it in mid-string.
"""

from __future__ import annotations

import glob
import os
import sys

EXTENSIONS = ("py", "md", "txt", "rst", "json", "c", "h", "html")
SPECIALS = ["<pad>", "<s>", "</s>"]


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out, roots = sys.argv[1], sys.argv[2:]
    files = [f for root in roots for ext in EXTENSIONS for f in glob.glob(f"{root}/**/*.{ext}", recursive=True)
             if os.path.isfile(f) and os.path.getsize(f) < 2_000_000]
    print(f"{len(files)} files, {sum(map(os.path.getsize, files)) / 1e6:.0f} MB")

    def texts():
        for name in files:
            with open(name, encoding="utf-8", errors="ignore") as f:
                yield f.read()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=150_000, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert [fast.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2]
    fast.save_pretrained(out)
    print(f"vocabulary {tok.get_vocab_size():,} -> {out}")


if __name__ == "__main__":
    main()
