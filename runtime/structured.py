"""Structured outputs: what a request's text must match, compiled once, enforced token by token.

A request carries a `StructuredOutput`: a JSON schema, any JSON object, a regex, a choice of strings or a
grammar (Lark, or GBNF when it has `::=`). The engine gives each such sequence a `Matcher` (llguidance's):
before a step samples it, the matcher's bitmask of the tokens that keep the text valid sets every other
logit to -inf, and the token it samples advances the matcher. Once the text is complete and nothing may
follow, the sequence stops.

llguidance was measured against xgrammar (BENCHMARKS.md): it refuses schema keywords it cannot enforce
rather than ignoring them, produced no invalid output over random walks where xgrammar did, masks special
tokens, and compiles in ~1-2 ms. A strict schema with a keyword it cannot enforce is an error that names it;
a non-strict one (OpenAI: best effort) is compiled leniently, those keywords unenforced. JSON is written on
one line, at most one space between tokens (`WHITESPACE`): small models otherwise fill a schema's every gap
with blank lines until max_tokens cuts the object short.

Known limit (llguidance 1.9): text that a grammar forces and that the tokenizer spells with one added token
(Qwen's `<tool_call>`) cannot be produced: llguidance takes added tokens for control tokens. Tool calls are
therefore constrained as JSON (constraints.py), never through the model's own markers.

Grammars are compiled and validated once per spec (an LRU cache, thread-safe), so the server compiles a
request's grammar in a worker thread and the engine thread finds it ready.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

KINDS = ("json", "json_object", "regex", "choice", "grammar")
CACHE_SIZE = 512  # compiled grammars kept
WHITESPACE = r"[ ]?"  # between JSON tokens: `{"a": 1}` and `{"a":1}` both fit; runaway blank space does not


@dataclass(frozen=True)
class StructuredOutput:
    """kind: one of KINDS; value: the schema as JSON text (json), the regex, the choices as a JSON array of
    strings (choice), the grammar text (grammar); "" for json_object. strict=False compiles a schema
    leniently (keywords that cannot be enforced are ignored, as OpenAI's non-strict mode allows)."""

    kind: str
    value: str = ""
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | bool, strict: bool = True) -> StructuredOutput:
        return cls("json", json.dumps(schema, ensure_ascii=False), strict)  # key order is the output's order

    @classmethod
    def choice(cls, options: list[str]) -> StructuredOutput:
        return cls("choice", json.dumps(list(options), ensure_ascii=False))


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher) -> None:
        self._m = matcher
        self._ahead: tuple[int, bool] | None = None  # a token consumed ahead (Grammars.accept_ahead), its result
        # Read once per token, never while a worker thread fills this matcher's mask.
        self.done = False  # the text is complete and nothing may follow (or the matcher failed): stop

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False (and the matcher is dead) when the grammar forbids it."""
        if self._ahead is not None and self._ahead[0] == token:
            ok, self._ahead = self._ahead[1], None
            return ok
        ok = self._m.consume_token(token)
        self.done = self._m.is_stopped()
        return ok

    @property
    def error(self) -> str:
        return self._m.get_error()


class Grammars:
    """Compiles specs for one tokenizer and vocabulary, and fills batches' token bitmasks."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._llg_tokenizer = None  # built on first use: ~1.5 s for a 150k vocabulary
        self._cache: OrderedDict[StructuredOutput, str] = OrderedDict()
        self._executor = None  # llguidance's thread pool for parallel masks
        self._thread: ThreadPoolExecutor | None = None  # where start_fill runs the fill
        self.words = -(-vocab_size // 32)  # int32 words per bitmask row

    def compile(self, spec: StructuredOutput) -> str:
        """The spec as a validated llguidance grammar; ValueError, naming the problem, when it cannot be."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        import llguidance as llg

        grammar = _grammar(spec)
        error = llg.LLMatcher.validate_grammar(grammar, self._tokenizer())
        if error:
            raise ValueError(f"the {_describe(spec)} cannot be enforced: {error}")
        with self._lock:
            self._cache[spec] = grammar
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutput) -> Matcher:
        import llguidance as llg

        matcher = llg.LLMatcher(self._tokenizer(), self.compile(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"the {_describe(spec)} cannot be enforced: {matcher.get_error()}")
        return Matcher(matcher)

    def accept_ahead(self, pairs: list[tuple[Matcher, int]]) -> None:
        """Consume each matcher's newly sampled token, in parallel, before the step's outputs are processed (whose
        `accept` then only reads the result), so that the next masks can be filled while they are."""
        if not pairs:
            return
        for (matcher, token), ok in zip(pairs, self._parallel().consume_token_par([(m._m, t) for m, t in pairs])):
            matcher._ahead, matcher.done = (token, ok), matcher._m.is_stopped()

    def _parallel(self):
        import llguidance as llg

        if self._executor is None:  # every CPU: the engine thread waits for the fill (H200 host, 16 cores:
            # 3.49 ms for 64 masks against 3.92 with llguidance's default of 80%, BENCHMARKS.md)
            self._executor = llg.LLExecutor(num_threads=len(os.sched_getaffinity(0)))
        return self._executor

    def fill(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None:
        """Row i of bitmask (int32 [>= len(matchers), words], on the CPU): the tokens matchers[i] allows. The
        rows are filled in parallel, without the GIL."""
        import llguidance.torch as llgt

        llgt.fill_next_token_bitmask_par(self._parallel(), [(m._m, i) for i, m in enumerate(matchers)], bitmask)

    def start_fill(self, matchers: list[Matcher], bitmask: torch.Tensor,
                   then: Callable[[], None] | None = None) -> Future:
        """`fill` in a worker thread, so that the caller can process outputs meanwhile; returns once the worker
        is running. Waiting for that matters: a thread woken while this one runs Python gets the GIL only
        when this one blocks or after the switch interval (5 ms), which would start the fill after the work
        it is meant to overlap. `then` runs in the worker after the fill, even one that failed."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="llmctl-masks")
        started = threading.Event()

        def run() -> None:
            started.set()  # the caller wakes once this thread leaves Python for the fill, which frees the GIL
            try:
                self.fill(matchers, bitmask)
            finally:
                if then is not None:
                    then()

        future = self._thread.submit(run)
        started.wait()
        return future

    def _tokenizer(self):
        with self._lock:
            if self._llg_tokenizer is None:
                if self.hf_tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer, and this model has none")
                import llguidance.hf

                self._llg_tokenizer = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None)
            return self._llg_tokenizer


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits[rows[i], t] = -inf wherever bit t of bitmask[i] is 0; bitmask int32 [R, words] on logits' device."""
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, : logits.shape[1]]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def _grammar(spec: StructuredOutput) -> str:
    import llguidance as llg

    try:
        if spec.kind in ("json", "json_object"):
            overrides = {"whitespace_pattern": WHITESPACE, **({} if spec.strict else {"lenient": True})}
            schema = spec.value if spec.kind == "json" else '{"type": "object"}'
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=overrides)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            return llg.grammar_from("choice", spec.value)
        return llg.grammar_from("gbnf" if "::=" in spec.value else "lark", spec.value)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"the {_describe(spec)} cannot be enforced: {exc}") from None


def _describe(spec: StructuredOutput) -> str:
    return {"json": "JSON schema", "json_object": "JSON object format", "regex": "regex", "choice": "choice",
            "grammar": "grammar"}[spec.kind]
