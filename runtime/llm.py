"""The offline API: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llmctl.runtime.config import EngineConfig
from llmctl.runtime.outputs import RequestOutput
from llmctl.runtime.sampling_params import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class GenerationResult:
    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[Completion]  # n of them
    num_cached_tokens: int = 0
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # tokens 1, 2, ... when asked


def default_model() -> str:
    from llmctl.reference import default_model_path

    return str(default_model_path())


def expand_n(params: SamplingParams) -> list[SamplingParams]:
    """n completions as n one-sequence requests; seeded ones get seeds seed, seed+1, ... so each differs."""
    if params.n == 1:
        return [params]
    return [replace(params, n=1, seed=None if params.seed is None else params.seed + i) for i in range(params.n)]


class LLM:
    def __init__(self, model: str | None = None, **engine_options) -> None:
        from llmctl.runtime.engine import Engine

        self.engine = Engine(EngineConfig(model=model or default_model(), **engine_options))

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit)."""
        self.engine.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priority: list[int] | None = None,
    ) -> list[GenerationResult]:
        """priority: one per prompt, lower first, for an engine made with scheduling_policy="priority"."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        priority = priority if priority is not None else [0] * len(prompts)
        if not len(params_list) == len(priority) == len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params and "
                             f"{len(priority)} priorities")
        owners: dict[str, tuple[int, int]] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            for j, sub in enumerate(expand_n(p)):
                seq = self.engine.add_request(prompt, sub, priority=priority[i])
                owners[seq.request_id] = (i, j)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        results = [GenerationResult(prompt, [], [None] * p.n) for prompt, p in zip(prompts, params_list)]
        for request_id, (i, j) in owners.items():
            out = finished[request_id]
            results[i].prompt_token_ids = out.prompt_token_ids
            results[i].num_cached_tokens = max(results[i].num_cached_tokens, out.num_cached_tokens)
            results[i].prompt_logprobs = results[i].prompt_logprobs or out.prompt_logprobs
            results[i].outputs[j] = Completion(out.text, out.token_ids, out.finish_reason, out.stop_reason,
                                               out.logprobs, out.top_logprobs)
        return results
