"""The recipe for the shipped reference model: corpus -> tokenizer -> token ids -> Llama -> report.

    python -m llmctl.reference.train --out reference/model [--device cuda|cpu] [--steps N] [--seed S]

Two phases, so the corpus can be built on one machine and trained on another:
`prepare` reads this Python's standard library (data.py), writes the held-out and calibration
package data, trains the byte-level BPE tokenizer on the train split and saves the train token ids
as uint16 in `--data` (reused when present). Training samples random windows from that id stream
(files joined as `<bos> text <eos>`), with AdamW, linear warmup then cosine decay, bf16 autocast
on CUDA and fp32 master weights, then saves an fp16 HF Llama checkpoint and `training_report.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmctl.reference import data

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..5, in this order
# Zephyr-style turns: the role marker on its own line, the content, eos to end the turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class TrainConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    context: int = 1024
    batch_size: int = 128  # windows per step: 128 x 1024 tokens
    steps: int = 1121  # what 90 s of an H100 fitted for the shipped model (--time-budget 90)
    warmup_steps: int = 200
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 64

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 128:
                raise ValueError(f"{name} must be a multiple of 128 (quantization group size), got {getattr(self, name)}")
        if self.num_kv_heads >= self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"need grouped-query attention: {self.num_kv_heads} KV heads for {self.num_heads} heads")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")


def prepare(data_dir: Path, vocab_size: int) -> dict:
    """Build (or reuse) the tokenizer and train ids in `data_dir`; writes the package's data files."""
    meta_file = data_dir / "prepared.json"
    if meta_file.is_file():
        return json.loads(meta_file.read_text())
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = data.load_corpus()
    data.write_artifacts(corpus)
    texts = [doc.text for doc in corpus.train]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[(BOS, 0)])
    from llmctl.reference.evaluate import document_ids

    ids = np.asarray(document_ids(tokenizer, texts, 0, 1), dtype=np.uint16)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(data_dir / "tokenizer.json"), pretty=False)
    np.save(data_dir / "train_ids.npy", ids)
    meta = {"corpus": corpus.manifest(), "vocab_size": tokenizer.get_vocab_size(), "train_tokens": int(len(ids))}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = min(cfg.warmup_steps, max(total // 10, 1))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def llama_config(cfg: TrainConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=cfg.context, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )


def train(cfg: TrainConfig, ids: np.ndarray, heldout: list, device: str, time_budget: float | None):
    """Returns the fp32 model, the number of steps run and a log of losses."""
    import torch
    from transformers import LlamaForCausalLM

    from llmctl.reference.evaluate import perplexity

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg)).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), fused=device == "cuda")
    stream = torch.from_numpy(ids.astype(np.int64)).to(device)
    offsets = torch.arange(cfg.context + 1, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def logits_fn(x):
        with autocast:
            return model(input_ids=x).logits

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    total, log, running = cfg.steps, {"train_loss": [], "heldout_loss": []}, torch.zeros((), device=device)
    # With a time budget, steps 10..40 are timed and the step count that fits is fixed then. The warmup is
    # a tenth of the steps (at most warmup_steps), so it shortens with them and the LR ramps faster from step 40.
    timed = (10, 40) if time_budget else ()
    start = now()
    step = 0
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        starts = torch.randint(0, len(stream) - cfg.context - 1, (cfg.batch_size,), device=device, generator=generator)
        batch = stream[starts[:, None] + offsets]  # [batch, context + 1]
        loss = torch.nn.functional.cross_entropy(logits_fn(batch[:, :-1]).float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        step += 1
        if timed and step == timed[0]:
            marks = now()
        elif timed and step == timed[1]:
            per_step = (now() - marks) / (timed[1] - timed[0])
            total = min(cfg.steps, step + int((time_budget - (now() - start)) / per_step))
            print(f"{per_step * 1000:.0f} ms/step: {total} steps fit {time_budget:.0f} s", flush=True)
        if step % 50 == 0 or step == total:
            log["train_loss"].append([step, round(running.item() / (step % 50 or 50), 4)])
            running.zero_()
            print(f"step {step}/{total} loss {log['train_loss'][-1][1]:.4f} lr {lr_at(step - 1, total, cfg):.2e} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
        if step % cfg.eval_every == 0 or step == total:
            model.eval()
            nll = perplexity(logits_fn, heldout[: cfg.eval_windows], device)["nll"]
            model.train()
            log["heldout_loss"].append([step, round(nll, 4)])
            print(f"step {step} held-out loss (first {cfg.eval_windows} windows) {nll:.4f}", flush=True)
    return model, step, log


def save_tokenizer(data_dir: Path, out: Path, context: int) -> None:
    """tokenizer.json as trained, plus the config files transformers 4.x and 5.x both read."""
    (out / "tokenizer.json").write_bytes((data_dir / "tokenizer.json").read_bytes())
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": list(ROLE_TOKENS)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": context,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def save_model(model, out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    # transformers 5 writes "dtype" and "rope_parameters"; 4.x and other loaders read these keys.
    config["torch_dtype"] = "float16"
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="python -m llmctl.reference.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="model directory to write (e.g. reference/model)")
    parser.add_argument("--data", type=Path, default=Path("build/reference-data"),
                        help="prepared tokenizer and train ids; built here when absent (default: %(default)s)")
    parser.add_argument("--prepare-only", action="store_true", help="build --data and stop")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="upper bound with --time-budget")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--time-budget", type=float, help="seconds of training; caps --steps from measured step time")
    args = parser.parse_args(argv)
    if args.out is None and not args.prepare_only:
        parser.error("--out is required unless --prepare-only")

    wall_start = time.perf_counter()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    meta = prepare(args.data, cfg.vocab_size)
    print(f"corpus: {meta['corpus']['train_files']} train files, {meta['train_tokens']} train tokens", flush=True)
    if args.prepare_only:
        return
    from tokenizers import Tokenizer

    from llmctl.reference.evaluate import document_ids, heldout_perplexity, unigram_perplexity, windows

    tokenizer = Tokenizer.from_file(str(args.data / "tokenizer.json"))
    ids = np.load(args.data / "train_ids.npy")
    heldout = windows(document_ids(tokenizer, [d.text for d in data.read_heldout()], 0, 1), cfg.context)
    start = time.perf_counter()
    model, steps, log = train(cfg, ids, heldout, args.device, args.time_budget)
    train_seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, args.out)
    save_tokenizer(args.data, args.out, cfg.context)
    model_ppl = heldout_perplexity(args.out, args.device)  # the saved fp16 weights, evaluated in fp32
    unigram = unigram_perplexity(torch.from_numpy(np.bincount(ids, minlength=cfg.vocab_size)), heldout)
    report = {
        "seed": cfg.seed,
        "corpus_python_version": meta["corpus"]["python_version"],
        "trainer": {"python": platform.python_version(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"},
        "corpus": {k: v for k, v in meta["corpus"].items() if k != "heldout_paths"},
        "vocab_size": meta["vocab_size"],
        "train_tokens": meta["train_tokens"],
        "heldout_tokens_scored": model_ppl["tokens"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": asdict(cfg) | {"steps": steps},
        "tokens_seen": steps * cfg.batch_size * cfg.context,
        "epochs": round(steps * cfg.batch_size * cfg.context / meta["train_tokens"], 2),
        "final_train_loss": log["train_loss"][-1][1],
        "heldout_perplexity": round(model_ppl["perplexity"], 4),
        "unigram_perplexity": round(unigram["perplexity"], 4),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "loss_curve": log,
        "command": "python -m llmctl.reference.train " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("parameters", "tokens_seen", "final_train_loss",
                                             "heldout_perplexity", "unigram_perplexity", "train_seconds")}))


if __name__ == "__main__":
    main()
