"""The engine: requests in, one scheduling step at a time, outputs out.

Steps overlap: `step()` schedules and queues step n + 1 on the GPU before it waits for step n's tokens
and turns them into outputs, so the host's bookkeeping runs while the GPU computes. Step n + 1 is
scheduled as if step n's sampled tokens were known (each counts as pending, and its value reaches the
next forward pass on the device); a sequence that step n ends (eos, a stop token or string) has its row
in step n + 1 computed and thrown away, while max_tokens endings are known in advance and never cost a
row. Penalties read every token of a row, so a step whose rows have them is waited for before the next
is scheduled; so is every step around one that speculates (speculative.py: drafts start from the newest
token, and a verified step's token count is known only at its end), which is why speculation is for
small batches.

A fault in work for one request ends that request alone, with finish reason "error": its sampling set-up
(ModelRunner's `_sampling_batch`, before the sampler) or its output (OutputProcessor's `process`, after).
A failed set-up keeps its row as a placeholder whose token is dropped, as a finished sequence's is, so
rows stay aligned with the step's sequences. A fault in the batched work (the forward pass, the sampler
kernel) is raised from `step()`: no one request caused it, and the device may be unusable."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from llmctl.checkpoint.loader import eos_token_ids, load_tokenizer
from llmctl.runtime.block_manager import BlockManager
from llmctl.runtime.config import EngineConfig
from llmctl.runtime.output_processor import OutputProcessor
from llmctl.runtime.outputs import RequestOutput
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.scheduler import ScheduledBatch, Scheduler
from llmctl.runtime.sequence import FinishReason, Sequence
from llmctl.runtime.speculative import Speculator
from llmctl.runtime.structured import Grammars

if TYPE_CHECKING:
    from llmctl.runtime.layers.sampler import PendingSample, SamplerOutput

log = logging.getLogger("llmctl.engine")


class Engine:
    def __init__(self, config: EngineConfig, stream: bool = False) -> None:
        from llmctl.runtime.model_runner import ModelRunner

        self.config = config
        # The tokenizer loads on a thread beside the model runner: importing transformers' AutoTokenizer alone
        # takes 3-5 s (~3,900 modules). On a GPU it starts once the weights are loaded and the kernels timed
        # (ModelRunner's after_timing): beside the weights' load it held the GIL enough to slow that 3x, and
        # beside the timing it would delay the launches timed.
        with ThreadPoolExecutor(1, thread_name_prefix="llmctl-tokenizer") as pool:
            tokenizer: list[Future] = []  # the runner submits it once
            self.speculator = _speculator(config)  # first: a draft model takes its share of the GPU before the target
            self.model_runner = ModelRunner(
                config, after_timing=lambda: tokenizer.append(pool.submit(_load_tokenizer, config.model)))
            try:
                self.tokenizer = tokenizer[0].result()
            except BaseException:
                self.model_runner.close()  # its tensor-parallel workers, if any
                raise
        self.eos_token_ids = eos_token_ids(config.model, config.hf_config, self.tokenizer)
        self.block_manager = BlockManager(self.model_runner.num_blocks, config.block_size, config.enable_prefix_caching)
        windows = set(self.model_runner.args.layer_windows)
        window = windows.pop() if len(windows) == 1 else None  # only a model windowed everywhere frees blocks
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, window,
                                   config.scheduling_policy)
        # stream: an output for every new token, as servers need; else one when a request finishes.
        self.output_processor = OutputProcessor(self.tokenizer, stream, self.scheduler.finish)
        self.grammars = self.model_runner.masks.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._in_flight: deque[_InFlight] = deque()  # steps queued on the GPU whose tokens are not yet applied

    @property
    def vocab_size(self) -> int:
        return self.model_runner.args.vocab_size

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.config.model} has no tokenizer: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[:3]}")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time: float | None = None, cache_salt: str | None = None, priority: int = 0) -> Sequence:
        """Queue a request; arrival_time (time.monotonic()) defaults to now, and is where TTFT and E2E start.
        Only requests with the same cache_salt share prefix-cache blocks (None: those without one). Under the
        priority scheduling policy a lower priority is served first (and may preempt higher ones)."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n != 1:
            raise ValueError("the engine takes one sequence per request; expand n > 1 into separate requests")
        if cache_salt is not None and not (isinstance(cache_salt, str) and cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {cache_salt!r}")
        token_ids = self.tokenize(prompt)
        outside = [t for t in params.logit_bias if t >= self.vocab_size]
        if outside:
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {self.vocab_size}, got {outside[:3]}")
        limit = self.config.max_model_len
        wanted = len(token_ids) + (params.max_tokens or 1)
        if not token_ids or wanted > limit:
            raise ValueError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {len(token_ids)} tokens "
                f"and max_tokens is {params.max_tokens}" if token_ids else "the prompt is empty")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        seq = Sequence(request_id, token_ids, params, self.eos_token_ids, cache_salt=cache_salt, priority=priority)
        if params.structured is not None:
            seq.grammar = self.grammars.matcher(params.structured)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        seq.max_output_tokens = min(params.max_tokens or limit, limit - len(token_ids))
        self.seqs[request_id] = seq
        self.output_processor.add(seq)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """End a request now and free its blocks; unknown or finished ids are ignored."""
        seq = self.seqs.pop(request_id, None)
        self.output_processor.forget(request_id)
        if seq is not None:
            self.scheduler.finish(seq, FinishReason.ABORT)
            seq.finish_time = time.monotonic()
            if self.speculator is not None:
                self.speculator.forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit)."""
        self.model_runner.close()

    def step(self) -> list[RequestOutput]:
        """Queue the next step, then return the outputs of the one before it."""
        outputs = self._finish_waited_for()
        if self.speculator is not None:
            if self.speculator.wanted(self.scheduler.running):
                while self._in_flight:  # drafts start from each sequence's newest token: it must be known
                    outputs += self._finish(self._in_flight[0])
                self.speculator.propose(self.scheduler.running)
            else:
                self.speculator.clear(self.scheduler.running)
        prev = self._in_flight[0] if self._in_flight else None
        batch = self.scheduler.schedule()
        if batch:
            outputs += self._launch(batch, prev)
        if prev is not None and not prev.done:
            outputs += self._finish(prev)
        return outputs

    def _finish_waited_for(self) -> list[RequestOutput]:
        """Normally one step is in flight here. Finish it first when rows need its tokens; finish older ones
        first when an interrupted call (Ctrl-C in a wait, say) left more than one."""
        outputs = []
        while len(self._in_flight) > 1 or (self._in_flight and self._in_flight[-1].needs_tokens_first):
            outputs += self._finish(self._in_flight[0])
        return outputs

    def _launch(self, batch: ScheduledBatch, prev: _InFlight | None) -> list[RequestOutput]:
        """Queue the batch's forward pass and sampling on the device; its tokens count as pending. Returns
        the error outputs of sequences whose sampling set-up failed."""
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        applied: list[RequestOutput] = []

        def before_sampling(start_masks) -> None:
            """Structured outputs: the step before's tokens advance the grammars, then this step's masks are
            filled while that step's outputs are applied; the forward pass is queued already, so all of it
            overlaps the GPU's work."""
            if prev is None or prev.done:
                return start_masks()
            if prev.output is None:
                prev.output = prev.sample.wait()
            tokens = prev.output.token_ids
            self.grammars.accept_ahead([(seq.grammar, tokens[i]) for i, seq in enumerate(prev.seqs)
                                        if seq.grammar is not None and not seq.is_finished and i >= prev.next_row])
            start_masks()
            applied.extend(self._finish(prev))

        pending, failed = self.model_runner.run(batch, *((prev.sample.token_ids, prev.rows) if prev else (None, None)),
                                                before_sampling=before_sampling)
        sampled = self.scheduler.postprocess(batch)
        for seq in sampled:
            seq.num_pending += 1
        if pending is not None:
            drafts = {seq: d for seq, d in zip(batch.seqs, batch.drafts) if d}
            self._in_flight.append(_InFlight(sampled, pending, drafts))
        # Ended after postprocess, which must not advance a sequence whose blocks are freed; their rows stay
        # in the step in flight, to be skipped there as finished.
        outputs = applied + [self.output_processor.fail(seq, exc, now) for seq, exc in failed.items()]
        for seq in failed:
            self.seqs.pop(seq.request_id, None)
        return outputs

    def _finish(self, step: _InFlight) -> list[RequestOutput]:
        """Wait for a step's tokens and apply them, row by row. Resumable: a call that was interrupted
        leaves the step in flight, and the next call applies the rows it had not reached."""
        if step.output is None:
            step.output = step.sample.wait()
        out, now = step.output, time.monotonic()
        outputs = []
        while step.next_row < len(step.seqs):
            i, seq = step.next_row, step.seqs[step.next_row]
            step.next_row += 1
            if seq.is_finished:  # aborted, or ended by its previous token while this one was computed
                continue
            row = step.first_rows[i]
            if seq in step.drafts:
                output = self._apply_drafts(seq, step.drafts[seq], out, row, now)
            else:
                output = self.output_processor.process(seq, out.token_ids[row], out.logprobs[row],
                                                       out.top_logprobs[row], now)
                if self.speculator is not None and seq.spec_skip and not seq.is_finished:
                    self.speculator.observe(seq)
            if seq.is_finished:
                self.seqs.pop(seq.request_id, None)
                if self.speculator is not None:
                    self.speculator.forget(seq)
            if output is not None:
                outputs.append(output)
        self._in_flight.remove(step)
        step.done = True
        return outputs


    def _apply_drafts(self, seq: Sequence, drafts: list[int], out: SamplerOutput, row: int, now: float
                      ) -> RequestOutput | None:
        """A speculative row's tokens: the drafts up to the first the sampler rejected, then its own token
        there, applied one by one (a stop ends it anywhere); one output carries them all."""
        tokens = out.token_ids[row : row + len(drafts) + 1]
        accepted = 0
        while accepted < len(drafts) and tokens[accepted] == drafts[accepted]:
            accepted += 1
        self.speculator.settle(seq, drafts, accepted)
        emitted: list[RequestOutput] = []
        for j, token in enumerate(tokens[: accepted + 1]):
            seq.num_pending += j > 0  # the step counted one token as pending; the others arrive with it
            output = self.output_processor.process(seq, token, out.logprobs[row + j], out.top_logprobs[row + j], now)
            emitted += [output] if output is not None else []
            if seq.is_finished:
                break
        self.scheduler.accept_drafts(seq, accepted)
        if len(emitted) <= 1:
            return emitted[0] if emitted else None
        return replace(emitted[-1], new_token_ids=[t for o in emitted for t in o.new_token_ids],
                       delta="".join(o.delta for o in emitted))


def _load_tokenizer(model: str):
    start = time.perf_counter()
    tokenizer = load_tokenizer(model)
    log.info("loaded the tokenizer in %.1f s, beside the model runner", time.perf_counter() - start)
    return tokenizer


def _speculator(config: EngineConfig) -> Speculator | None:
    spec = config.speculative
    if spec is None or spec.method != "draft":
        return Speculator(spec) if spec is not None else None
    from llmctl.runtime.draft import DraftModel, draft_engine_config

    return Speculator(spec, DraftModel(draft_engine_config(config), config.hf_config["vocab_size"]))


@dataclass
class _InFlight:
    """A queued step: the sequences it samples, in row order, and their tokens on the way."""

    seqs: list[Sequence]
    sample: PendingSample
    drafts: dict[Sequence, list[int]]  # the speculating sequences' drafts: they have 1 + len(drafts) rows
    output: SamplerOutput | None = None  # once waited for
    next_row: int = 0  # sequences before it are applied
    done: bool = False  # every row applied, out of the queue

    def __post_init__(self) -> None:
        counts = [1 + len(self.drafts.get(seq, ())) for seq in self.seqs]
        self.first_rows = list(itertools.accumulate(counts, initial=0))[:-1]  # each sequence's first sampler row
        self.rows = {seq: row for seq, row in zip(self.seqs, self.first_rows)}  # where the next step finds its token
        # Penalties read every token; a speculative step's token count is known only once it is verified.
        self.needs_tokens_first = bool(self.drafts) or any(seq.sampling_params.has_penalties for seq in self.seqs)
