"""Turns one engine step's logits into one token per sequence.

The pipeline, applied to all rows at once:
    raw logits -> fp32 -> repetition penalty -> presence/frequency penalties -> greedy rows: argmax
              -> temperature -> top-k -> top-p -> min-p -> exponential race: argmax(probs / q), q ~ Exp(1)
Log-probabilities come from `log_softmax` of the raw logits (before penalties and temperature), as vLLM's default.

A row may verify a speculative draft d (`SamplingBatch.draft_tokens`): a greedy row's token is its argmax,
which is d when the model agrees; a sampled row takes d with probability p(d) (its final distribution,
normalized) and otherwise draws from p without d, from the same exponential race. Either way the row's
token follows p, and it equals d exactly when d is accepted, which is how the engine tells.

Each stage is skipped when no row in the batch uses it, and a row that does not use a stage holds a neutral
value (penalty 1, temperature 1, top_k = V, top_p = 1, min_p = 0) so that the stage leaves it bit-for-bit
unchanged. That is why a seeded row gives the same tokens whatever else shares the step: its randoms come only
from its own generator and every other operation is row-wise.

Everything stays on the device until one copy to the host at the end. `launch` only starts that copy,
so the engine can queue the next step (whose input ids read the sampled tokens on the device) before it
waits for this one's tokens with `PendingSample.wait`.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from llmctl.runtime.sampling_params import SamplingParams

# Below this temperature, dividing the logits overflows towards inf; such rows are treated as greedy (as vLLM does).
MIN_TEMPERATURE = 1e-5


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own random stream, seeded once and advanced by every step that samples it."""
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplingBatch:
    """One step's sampling settings as tensors, one row per sequence. A field is None when no row needs it."""

    vocab_size: int
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    temperature: torch.Tensor | None  # [B, 1] fp32; 1.0 on greedy rows
    top_k: torch.Tensor | None  # [B, 1] int64; vocab_size where off
    max_top_k: int  # the largest top_k below vocab_size; bounds the torch.topk call
    top_p: torch.Tensor | None  # [B, 1] fp32
    min_p: torch.Tensor | None  # [B, 1] fp32
    repetition_penalty: torch.Tensor | None  # [B, 1] fp32
    seen: torch.Tensor | None  # [B, V] bool: prompt + output tokens of rows with a repetition penalty
    frequency_penalty: torch.Tensor | None  # [B, 1] fp32; set together with output_counts
    presence_penalty: torch.Tensor | None  # [B, 1] fp32; set together with output_counts
    output_counts: torch.Tensor | None  # [B, V] fp32: output token counts of rows with presence/frequency
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None  # ([N] flat row * V + token int64, [N] fp32 bias)
    seeded: list[tuple[int, torch.Generator]]  # sampled rows that draw from their own generator
    any_unseeded: bool  # some sampled row draws from the default generator
    num_logprobs: list[int | None]
    logprob_rows: torch.Tensor | None  # [R] int64: the rows that asked for logprobs
    draft_rows: torch.Tensor | None = None  # [D] int64: the rows that verify a draft
    draft_tokens: torch.Tensor | None = None  # [D] int64: their drafts
    draft_seeded: tuple[tuple[int, torch.Generator], ...] = ()  # (index in D, generator) of seeded sampled rows

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
        banned: list[frozenset[int]] | None = None,
        drafts: list[int] | None = None,
    ) -> SamplingBatch:
        """banned: per row, token ids that must not be sampled this step (min_tokens' eos and stop tokens);
        drafts: per row, the speculative draft it verifies, or -1."""
        n = len(params)
        for name, rows in (
            ("prompt_token_ids", prompt_token_ids),
            ("output_token_ids", output_token_ids),
            ("generators", generators),
        ):
            if len(rows) != n:
                raise ValueError(f"{name} has {len(rows)} rows but there are {n} sampling params")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
        device = torch.device(device)
        greedy = [p.temperature < MIN_TEMPERATURE for p in params]
        seeded = []
        for i, (p, g) in enumerate(zip(params, generators)):
            if p.seed is not None and g is None:
                raise ValueError(f"row {i} has seed={p.seed} but no generator; make one with make_generator")
            if g is not None and g.device.type != device.type:
                raise ValueError(f"row {i}'s generator is on {g.device}, the batch on {device}")
            if g is not None and not greedy[i]:
                seeded.append((i, g))

        def column(values: list[float], neutral: float, needed: bool = False) -> torch.Tensor | None:
            if not needed and all(v == neutral for v in values):
                return None
            return to_device(torch.tensor(values, dtype=torch.float32).unsqueeze(1), device)

        # Greedy rows keep neutral filter values: their sample is discarded, and neutral values keep them cheap.
        num_sampled = greedy.count(False)
        top_k = [
            vocab_size if g or p.top_k is None else min(p.top_k, vocab_size) for p, g in zip(params, greedy)
        ]
        seen, output_counts = _penalty_tensors(params, prompt_token_ids, output_token_ids, vocab_size, device)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        draft_fields = _draft_fields(drafts, greedy, generators, vocab_size, device) if drafts is not None else {}
        return cls(
            vocab_size=vocab_size,
            greedy=to_device(torch.tensor(greedy, dtype=torch.bool), device),
            all_greedy=num_sampled == 0,
            temperature=column([1.0 if g else p.temperature for p, g in zip(params, greedy)], 1.0),
            top_k=None
            if all(k == vocab_size for k in top_k)
            else to_device(torch.tensor(top_k).unsqueeze(1), device),
            max_top_k=max((k for k in top_k if k < vocab_size), default=vocab_size),
            top_p=column([1.0 if g else p.top_p for p, g in zip(params, greedy)], 1.0),
            min_p=column([0.0 if g else p.min_p for p, g in zip(params, greedy)], 0.0),
            repetition_penalty=column([p.repetition_penalty for p in params], 1.0),
            seen=seen,
            frequency_penalty=column(
                [p.frequency_penalty for p in params], 0.0, needed=output_counts is not None
            ),
            presence_penalty=column(
                [p.presence_penalty for p in params], 0.0, needed=output_counts is not None
            ),
            output_counts=output_counts,
            logit_bias=_bias_tensors(params, vocab_size, device, banned),
            seeded=seeded,
            any_unseeded=len(seeded) < num_sampled,
            num_logprobs=[p.logprobs for p in params],
            logprob_rows=to_device(torch.tensor(logprob_rows, dtype=torch.int64), device)
            if logprob_rows
            else None,
            **draft_fields,
        )

    @property
    def num_rows(self) -> int:
        return len(self.num_logprobs)

    @property
    def has_penalties(self) -> bool:
        """Whether the logits change before sampling (penalties or a logit bias)."""
        return self.seen is not None or self.output_counts is not None or self.logit_bias is not None

    @property
    def logprob_indices(self) -> list[int]:
        return [i for i, k in enumerate(self.num_logprobs) if k is not None]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # chosen token's logprob; None for rows that did not ask
    top_logprobs: list[list[tuple[int, float]] | None]  # (token id, logprob), most likely first


@dataclass
class PendingSample:
    """One step's sampled tokens: on the device at once, on the host after `wait()`."""

    token_ids: torch.Tensor  # [B] int64 on the device; the next step's inputs may read them there
    host: torch.Tensor  # the ids, or ids and logprobs packed as float64, copying to (pinned) host memory
    event: torch.cuda.Event | None  # recorded after the copy; None off CUDA, where the copy is synchronous
    batch: SamplingBatch
    k: int  # top logprobs per logprob row in `host`
    host_work: Future | None = None  # host work the tokens depend on (a structured output's mask fill)

    def wait(self) -> SamplerOutput:
        if self.host_work is not None:
            self.host_work.result()  # its error, if any; on CUDA the device waited for it
        if self.event is not None:
            self.event.synchronize()
        packed = self.host.tolist()
        batch, n, k = self.batch, self.batch.num_rows, self.k
        if batch.logprob_rows is None:
            return SamplerOutput(packed, [None] * n, [None] * n)
        out = SamplerOutput([int(t) for t in packed[:n]], [None] * n, [None] * n)
        for j, i in enumerate(batch.logprob_indices):
            row = packed[n + j * (1 + 2 * k) : n + (j + 1) * (1 + 2 * k)]
            want = batch.num_logprobs[i]
            out.logprobs[i] = row[0]
            out.top_logprobs[i] = [(int(t), v) for t, v in zip(row[1 : 1 + want], row[1 + k : 1 + k + want])]
        return out


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        return self.launch(logits, batch).wait()

    def launch(self, logits: torch.Tensor, batch: SamplingBatch) -> PendingSample:
        """Sample on the device and start the one copy to the host; no host sync."""
        _check_logits(logits, batch)
        token_ids = self.sample(logits, batch)  # [B]
        packed, k = token_ids, 0
        if batch.logprob_rows is not None:
            packed, k = self._pack_logprobs(logits, token_ids, batch)
        if packed.device.type != "cuda":
            return PendingSample(token_ids, packed, None, batch, k)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingSample(token_ids, host, event, batch, k)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Chosen token ids [B] int64, on the logits' device; no host sync."""
        if batch.all_greedy and not batch.has_penalties:
            return logits.argmax(dim=-1)
        x = apply_penalties(logits.to(torch.float32, copy=True), batch)  # [B, V]
        greedy_ids = x.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_ids
        if batch.temperature is not None:
            x.div_(batch.temperature)
        probs = filtered_probs(x, batch)
        q = torch.empty_like(probs)
        if batch.any_unseeded:
            q.exponential_()
        for row, generator in batch.seeded:
            q[row].exponential_(generator=generator)
        # exponential_ can return 0 on some backends; 0/0 would be NaN, which argmax prefers.
        q.clamp_(min=torch.finfo(torch.float32).tiny)
        verified = _verify_drafts(probs, q, batch) if batch.draft_rows is not None else None
        sampled_ids = probs.div_(q).argmax(dim=-1)
        if verified is not None:
            sampled_ids.index_copy_(0, batch.draft_rows, verified)
        return torch.where(batch.greedy, greedy_ids, sampled_ids)

    def _pack_logprobs(
        self, logits: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch
    ) -> tuple[torch.Tensor, int]:
        """Ids, then per logprob row its chosen logprob, top-k ids and top-k logprobs, as one float64 tensor
        (ids below 2**53 are exact), so that one copy brings everything to the host."""
        rows = batch.logprob_rows  # [R]
        k = max(batch.num_logprobs[i] for i in batch.logprob_indices)
        raw = logits if rows.numel() == batch.num_rows else logits.index_select(0, rows)
        logprobs = torch.log_softmax(raw, dim=-1, dtype=torch.float32)  # [R, V]
        chosen = logprobs.gather(1, token_ids.index_select(0, rows).unsqueeze(1))  # [R, 1]
        top = logprobs.topk(k, dim=-1)  # [R, k], most likely first
        per_row = torch.cat([chosen.double(), top.indices.double(), top.values.double()], dim=1)  # [R, 1 + 2k]
        return torch.cat([token_ids.double(), per_row.flatten()]), k


def _draft_fields(drafts: list[int], greedy: list[bool], generators: list, vocab_size: int,
                  device: torch.device) -> dict:
    rows = [i for i, d in enumerate(drafts) if d >= 0]
    bad = [drafts[i] for i in rows if drafts[i] >= vocab_size]
    if len(drafts) != len(greedy) or bad:
        raise ValueError(f"drafts must be one per row (got {len(drafts)} for {len(greedy)}) and inside the "
                         f"vocabulary (size {vocab_size}), got {bad[:3]}")
    if not rows:
        return {}
    seeded = tuple((j, generators[i]) for j, i in enumerate(rows) if generators[i] is not None and not greedy[i])
    return {"draft_rows": to_device(torch.tensor(rows, dtype=torch.int64), device),
            "draft_tokens": to_device(torch.tensor([drafts[i] for i in rows], dtype=torch.int64), device),
            "draft_seeded": seeded}


def _verify_drafts(probs: torch.Tensor, q: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[D] tokens of the rows that verify a draft d: d with probability p(d), else the exponential race
    over p without d (so the token follows p). probs: [B, V] unnormalized; q: [B, V] the race's draws."""
    p = probs.index_select(0, batch.draft_rows)  # [D, V]
    d = batch.draft_tokens.unsqueeze(1)  # [D, 1]
    p_draft = (p.gather(1, d) / p.sum(dim=-1, keepdim=True)).squeeze(1)
    u = torch.rand(p_draft.shape, device=p.device)
    for j, generator in batch.draft_seeded:
        u[j] = torch.rand((), generator=generator, device=p.device)
    others = p.scatter(1, d, 0.0).div_(q.index_select(0, batch.draft_rows)).argmax(dim=-1)
    return torch.where(u < p_draft, d.squeeze(1), others)


def apply_penalties(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Penalized fp32 logits: the logit bias first, as OpenAI adds it to the model's logits; repetition as
    transformers (over prompt + output), presence/frequency as OpenAI."""
    if batch.logit_bias is not None:
        index, bias = batch.logit_bias
        x = x.view(-1).index_add(0, index, bias).view_as(x)
    if batch.seen is not None:
        p = batch.repetition_penalty
        x = torch.where(batch.seen, torch.where(x < 0, x * p, x / p), x)
    if batch.output_counts is not None:
        counts = batch.output_counts
        x = x - (batch.frequency_penalty * counts + batch.presence_penalty * (counts > 0))
    return x


def filtered_probs(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Unnormalized probabilities after top-k, top-p and min-p, matching transformers' warpers in that order.

    Modifies x in place. Ties at the k-th value are kept, as in transformers' TopKLogitsWarper.
    """
    if batch.top_p is not None:
        # One ascending sort serves both filters: the k-th largest sits at V - k.
        x_sorted, order = x.sort(dim=-1)
        if batch.top_k is not None:
            kth = x_sorted.gather(1, batch.vocab_size - batch.top_k)
            x_sorted.masked_fill_(x_sorted < kth, float("-inf"))
        cumulative = x_sorted.softmax(dim=-1).cumsum_(dim=-1)
        drop = cumulative <= 1 - batch.top_p
        drop[:, -1] = False
        x_sorted.masked_fill_(drop, float("-inf"))
        x = x.scatter_(1, order, x_sorted)
    elif batch.top_k is not None:
        top = x.topk(batch.max_top_k, dim=-1).values  # [B, max_top_k], descending
        kth = top.gather(1, batch.top_k.clamp(max=batch.max_top_k) - 1)
        kth = kth.masked_fill_(batch.top_k > batch.max_top_k, float("-inf"))
        x.masked_fill_(x < kth, float("-inf"))
    probs = x.softmax(dim=-1)
    if batch.min_p is not None:
        floor = batch.min_p * probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < floor, 0.0)  # the race needs no renormalization
    return probs


def _bias_tensors(params: list[SamplingParams], vocab_size: int, device: torch.device,
                  banned: list[frozenset[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's logit_bias, and -inf for its banned tokens, as flat indices and values."""
    if not any(p.logit_bias for p in params) and not (banned and any(banned)):
        return None
    index, bias = [], []
    for row, p in enumerate(params):
        for token, value in p.logit_bias.items():
            if token >= vocab_size:
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary (size {vocab_size})")
            index.append(row * vocab_size + token)
            bias.append(value)
        for token in banned[row] if banned else ():
            if token < vocab_size:
                index.append(row * vocab_size + token)
                bias.append(float("-inf"))
    return (to_device(torch.tensor(index, dtype=torch.int64), device),
            to_device(torch.tensor(bias, dtype=torch.float32), device))


def _penalty_tensors(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The repetition penalty's seen-token mask [B, V] and the output token counts [B, V], each only if needed.

    Only rows with a penalty contribute token ids: the others would pay for a scatter that changes nothing.
    """
    has_rep = [p.repetition_penalty != 1.0 for p in params]
    has_count = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    seen = output_counts = None
    n = len(params)
    if any(has_rep):
        rows = [(prompt, out) if use else () for prompt, out, use in zip(prompt_token_ids, output_token_ids, has_rep)]
        index = _flat_token_index(rows, vocab_size, device, "prompt/output")
        seen = torch.zeros(n * vocab_size, dtype=torch.bool, device=device).index_fill_(0, index, True)
        seen = seen.view(n, vocab_size)
    if any(has_count):
        rows = [(out,) if use else () for out, use in zip(output_token_ids, has_count)]
        index = _flat_token_index(rows, vocab_size, device, "output")
        output_counts = torch.zeros(n * vocab_size, dtype=torch.float32, device=device)
        output_counts = output_counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.float32))
        output_counts = output_counts.view(n, vocab_size)
    return seen, output_counts


def _flat_token_index(
    rows: list[tuple], vocab_size: int, device: torch.device, what: str
) -> torch.Tensor:
    """row * V + token for every token of every row, on the device, in one transfer. A row is a tuple of
    pieces (prompt, output): Python lists, or int arrays (`Sequence.token_array` slices, what the model
    runner passes for rows with penalties), joined here in one copy.

    numpy's fromiter converts Python ints about 8x faster than torch.tensor, and concatenating arrays
    is faster still: a 256-row batch with 1,200 tokens a row would otherwise spend tens of milliseconds
    here every step.
    """
    lengths = np.fromiter((sum(len(piece) for piece in row) for row in rows), dtype=np.int64, count=len(rows))
    pieces = [piece for row in rows for piece in row]
    if all(isinstance(piece, np.ndarray) for piece in pieces):
        tokens = np.concatenate(pieces).astype(np.int64, copy=False) if pieces else np.empty(0, np.int64)
    else:
        tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(lengths.sum()))
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        row = int(np.searchsorted(lengths.cumsum(), bad[0], side="right"))
        raise ValueError(
            f"row {row} has {what} token id {int(tokens[bad[0]])} outside the vocab [0, {vocab_size})"
        )
    index = np.repeat(np.arange(len(rows), dtype=np.int64) * vocab_size, lengths) + tokens
    return to_device(torch.from_numpy(index), device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on device without waiting for the device's queued work."""
    # Pinned memory makes the copy truly asynchronous, so building a batch never waits on the GPU.
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _check_logits(logits: torch.Tensor, batch: SamplingBatch) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D float tensor [batch, vocab], got {logits.dtype} {tuple(logits.shape)}"
        )
    if logits.shape[0] != batch.num_rows:
        raise ValueError(
            f"logits have {logits.shape[0]} rows but the batch has {batch.num_rows} sampling params"
        )
    if logits.shape[1] != batch.vocab_size:
        raise ValueError(
            f"logits have vocab {logits.shape[1]} but the batch was built for {batch.vocab_size}"
        )
    if logits.device != batch.greedy.device:
        raise ValueError(f"logits are on {logits.device} but the batch is on {batch.greedy.device}")
