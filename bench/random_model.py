"""Write a random-weight model of a well-known shape, for speed benchmarks that need no trained weights.

`python -m llmctl.bench.random_model --shape llama2-7b --out DIR` saves config.json + model.safetensors
(fp16) the way transformers saves them. The weights are drawn on the GPU when there is one.

A random model has no tokenizer, but a server needs one. `word_tokenizer` writes one that names every
id `t<id>` (a word-level vocabulary, split on spaces; ids 0-2 are `<unk>`, `<s>`, `</s>`): any id sequence
decodes to text that encodes back to exactly those ids, so an HTTP benchmark can send the offline
benchmark's very prompts.
"""

from __future__ import annotations

import argparse

# shape -> (transformers config class, its fields): the published models' configs, less what random
# weights do not need. Qwen3-30B-A3B is 48 layers; `--layers` writes fewer (its 61 GB do not fit a
# 64 GB disk beside anything else), each layer of the full shape.
SHAPES = {
    "llama2-7b": ("LlamaConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                                      max_position_embeddings=4096)),
    "llama3-8b": ("LlamaConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                      max_position_embeddings=8192, rope_theta=500000.0)),
    "codellama-34b": ("LlamaConfig", dict(hidden_size=8192, num_hidden_layers=48, num_attention_heads=64,
                                          num_key_value_heads=8, intermediate_size=22016, vocab_size=32000,
                                          max_position_embeddings=16384, rope_theta=1000000.0)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                                     vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                                     tie_word_embeddings=False)),
    "gemma2-9b": ("Gemma2Config", dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
                                       num_key_value_heads=8, head_dim=256, intermediate_size=14336,
                                       vocab_size=256000, max_position_embeddings=8192, query_pre_attn_scalar=256,
                                       sliding_window=4096, attn_logit_softcapping=50.0,
                                       final_logit_softcapping=30.0)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                             num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                                             moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                             norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
                                             rope_theta=1000000.0, tie_word_embeddings=False)),
}


def write_random_model(shape: str, out: str, dtype: str = "float16", seed: int = 0, layers: int | None = None) -> str:
    import torch
    import transformers

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    config_cls, fields = SHAPES[shape]
    if layers is not None:
        fields = {**fields, "num_hidden_layers": layers}
    config = getattr(transformers, config_cls)(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="100GB")
    return out


def word_tokenizer(out: str, vocab_size: int) -> None:
    """Save a tokenizer whose token i is the word `t<i>` (special tokens excepted, see `word`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(vocab_size)}, unk_token=word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with one space
    # Special tokens must not look like words: added tokens are matched inside words ("t2" in "t27").
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=word(0), bos_token=word(1), eos_token=word(2),
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)


def word(i: int) -> str:
    return ("<unk>", "<s>", "</s>")[i] if i < 3 else f"t{i}"


def ids_to_text(ids: list[int]) -> str:
    """The prompt text that `word_tokenizer`'s tokenizer encodes to exactly `ids`."""
    return " ".join(map(word, ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape's (each of the full shape)")
    parser.add_argument("--tokenizer", action="store_true", help="also save a word-level tokenizer (t0, t1, ...)")
    args = parser.parse_args()
    print(write_random_model(args.shape, args.out, args.dtype, layers=args.layers))
    if args.tokenizer:
        word_tokenizer(args.out, SHAPES[args.shape][1]["vocab_size"])


if __name__ == "__main__":
    main()
