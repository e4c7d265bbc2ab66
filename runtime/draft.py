"""Draft-model proposals for speculative decoding (`--speculative draft --draft-model DIR`).

A smaller model with the target's vocabulary guesses each speculating sequence's next K tokens greedily, in K
batched steps of its own: the first also catches the draft up with what the sequence gained since its last
proposal (its prompt, the first time), the others decode one token each. Greedy guesses are a deterministic
proposal, so the target's verification (the sampler's rejection sampling) keeps its output distribution
exact whatever the draft says; a better draft only means more accepted tokens.

The draft keeps, per sequence, a shadow sequence in a paged KV cache of its own (no prefix caching). A
shadow holds the sequence's tokens and the draft's last guesses; at the next proposal the guesses the target
rejected are cut back (their KV is recomputed), and a shadow whose sequence has finished or was preempted
is dropped with its blocks.
"""

from __future__ import annotations

from llmctl.runtime.block_manager import BlockManager
from llmctl.runtime.config import EngineConfig
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.scheduler import ScheduledBatch
from llmctl.runtime.sequence import Sequence, SequenceStatus

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


def draft_engine_config(target: EngineConfig) -> EngineConfig:
    """The draft's engine settings: the target's dtype, device, kernels and CUDA graphs (its one-token steps
    replay them: eagerly, a small draft's launches would cost more than its arithmetic), its context (or the
    draft's own, if shorter), no prefix cache, and a share of the GPU (it is loaded first)."""
    import json
    from pathlib import Path

    spec = target.speculative
    path = Path(spec.draft_model)
    if not (path / "config.json").is_file():
        raise ValueError(f"draft model directory not found or without config.json: {spec.draft_model}")
    draft_max = int(json.loads((path / "config.json").read_text()).get("max_position_embeddings", 2048))
    return EngineConfig(model=spec.draft_model, dtype=target.dtype, device=target.device,
                        kernel_backend=target.kernel_backend, max_model_len=min(target.max_model_len, draft_max),
                        max_num_seqs=spec.max_batch, max_num_batched_tokens=target.max_num_batched_tokens,
                        block_size=target.block_size, gpu_memory_utilization=spec.draft_memory_utilization,
                        kv_cache_memory=target.kv_cache_memory, enable_prefix_caching=False,
                        enforce_eager=target.enforce_eager)


class DraftModel:
    def __init__(self, config: EngineConfig, target_vocab_size: int) -> None:
        from llmctl.runtime.model_runner import ModelRunner

        vocab_size = config.hf_config["vocab_size"]  # checked before the weights and the KV cache are set up
        if vocab_size != target_vocab_size:
            raise ValueError(f"the draft model's vocabulary has {vocab_size} tokens, the target's "
                             f"{target_vocab_size}: a draft must share the target's tokenizer")
        self.runner = ModelRunner(config)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, enable_prefix_caching=False)
        self.shadows: dict[Sequence, Sequence] = {}
        self.known: dict[Sequence, int] = {}  # how many of seq's tokens its shadow held at the last proposal

    def propose(self, wanted: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        """Up to wanted[seq] greedy guesses for each sequence (fewer where the draft's cache is full)."""
        self._drop_stale()
        live = [s for s in wanted if self._sync(s)]
        guesses: dict[Sequence, list[int]] = {s: [] for s in live}
        for _ in range(max((wanted[s] for s in live), default=0)):
            live = [s for s in live if len(guesses[s]) < wanted[s] and self._room(s)]
            if not live:
                break
            for seq, token in zip(live, self._step([self.shadows[s] for s in live])):
                guesses[seq].append(token)
        return guesses

    def forget(self, seq: Sequence) -> None:
        self.known.pop(seq, None)
        shadow = self.shadows.pop(seq, None)
        if shadow is not None:
            self.blocks.free(shadow)

    def _drop_stale(self) -> None:
        for seq in [s for s in self.shadows if s.is_finished or s.status is SequenceStatus.WAITING]:
            self.forget(seq)

    def _sync(self, seq: Sequence) -> bool:
        """Make seq's shadow hold seq's tokens, its KV valid up to where the two agree; whether it has the
        blocks to go on."""
        shadow = self.shadows.get(seq)
        if shadow is None:
            shadow = self.shadows[seq] = Sequence(seq.request_id, list(seq.token_ids), GREEDY)
        else:  # a sequence's tokens only grow: only the shadow's guesses past them can disagree
            agree = self.known[seq]
            limit = min(len(shadow.token_ids), len(seq.token_ids))
            while agree < limit and shadow.token_ids[agree] == seq.token_ids[agree]:
                agree += 1
            shadow.token_ids[agree:] = seq.token_ids[agree:]
            # its last token is computed again where the sequence has not moved since (left out of the
            # target's step): the next guess is read from its logits
            shadow.num_computed_tokens = min(shadow.num_computed_tokens, agree, len(shadow.token_ids) - 1)
            self.blocks.trim(shadow, shadow.num_tokens)
        self.known[seq] = len(seq.token_ids)
        return self._room(seq)

    def _room(self, seq: Sequence) -> bool:
        """Blocks for the shadow's uncomputed tokens (allocated here); False drops it for this proposal."""
        shadow = self.shadows[seq]
        need = shadow.num_uncomputed_tokens()
        if len(shadow.token_ids) >= self.runner.config.max_model_len or not self.blocks.can_allocate(shadow, need):
            return False
        self.blocks.allocate(shadow, need)
        return True

    def _step(self, shadows: list[Sequence]) -> list[int]:
        """One forward pass over each shadow's uncomputed tokens; its greedy next token, appended."""
        batch = ScheduledBatch()
        for shadow in shadows:
            batch.add(shadow, shadow.num_uncomputed_tokens())
        pending, failed = self.runner.run(batch)
        if failed:
            raise next(iter(failed.values()))
        tokens = pending.wait().token_ids
        by_shadow = dict(zip(batch.seqs, tokens))
        for shadow, n in zip(batch.seqs, batch.num_new_tokens):
            shadow.num_computed_tokens += n
            shadow.token_ids.append(by_shadow[shadow])
        return [by_shadow[s] for s in shadows]
