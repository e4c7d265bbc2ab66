"""lm-evaluation-harness (its Python API, in this process) against the server, on the tasks of lm_eval_task/:
`local-completions` scores multiple choice from prompt logprobs (echo), `local-chat-completions` generates
greedily with the chat template applied. The tokenizer is the model's folder, so nothing is fetched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
openai = pytest.importorskip("openai")

TASKS = Path(__file__).parent / "lm_eval_task"


@pytest.fixture
def evaluate(monkeypatch, tmp_path):
    """evaluate(task, model, model_args, **options): simple_evaluate on a task of lm_eval_task/."""
    import datasets
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASKS)  # the tasks' data_files are relative paths
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)

    def run(task: str, model: str, model_args: str, **options) -> dict:
        # max_retries=1: a refused request fails the test at once instead of after backing off.
        return lm_eval.simple_evaluate(model=model, model_args=f"{model_args},max_retries=1", tasks=[task],
                                       task_manager=tasks, bootstrap_iters=0, **options)

    return run


def reference_loglikelihoods(model_dir: str, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(the continuation's summed logprobs, whether greedy decoding picks it) for each (context, continuation),
    by transformers on the same weights, tokenized as lm-eval does: the whole text, split after the context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    results = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())  # lm-eval moves them to the continuation
        context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
        ids = tokenizer(context + continuation, add_special_tokens=False).input_ids
        start = len(tokenizer(context, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        # Position i predicts token i + 1. logprobs: [len(continuation tokens), vocab]
        logprobs = torch.log_softmax(logits[start - 1:-1].double(), dim=-1)
        target = torch.tensor(ids[start:])
        results.append((logprobs.gather(-1, target[:, None]).sum().item(),
                        bool((logprobs.argmax(-1) == target).all())))
    return results


def test_multiple_choice_loglikelihoods_are_the_models(evaluate, server, chat_model):
    results = evaluate("llmctl_tiny_mc", "local-completions",
                       f"model={server.model},base_url={server.url}/v1/completions,"
                       f"tokenizer_backend=huggingface,tokenizer={chat_model}", batch_size=4)
    samples = sorted(results["samples"]["llmctl_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == 10 and all(len(s["resps"]) == 4 for s in samples)
    got = [resp[0] for s in samples for resp in s["resps"]]
    want = reference_loglikelihoods(chat_model, [tuple(args) for s in samples for args in s["arguments"]])
    for (loglikelihood, greedy), (expected, expected_greedy) in zip(got, want):
        assert loglikelihood == pytest.approx(expected, abs=1e-3)
        assert greedy == expected_greedy

    # The score is the argmax of those loglikelihoods against the label.
    hits = [max(range(4), key=lambda c, i=i: want[4 * i + c][0]) == s["doc"]["label"] for i, s in enumerate(samples)]
    assert results["results"]["llmctl_tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_chat_generations_are_the_servers_greedy_answers(evaluate, server):
    results = evaluate("llmctl_tiny_gen", "local-chat-completions",
                       f"model={server.model},base_url={server.url}/v1/chat/completions",
                       apply_chat_template=True)
    samples = results["samples"]["llmctl_tiny_gen"]
    assert len(samples) == 5
    assert "exact_match,none" in results["results"]["llmctl_tiny_gen"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for sample in samples:
        [(context, _)] = sample["arguments"]
        # With the chat template applied, lm-eval sends the conversation as messages, not a rendered prompt.
        # (a JsonChatStr, or its fields as a tuple once lm-eval has serialized the samples)
        messages = json.loads(context.prompt if hasattr(context, "prompt") else context[0])
        assert messages == [{"role": "user", "content": sample["doc"]["question"]}]
        direct = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8,
                                                temperature=0, stop=["\n\n"])
        assert sample["resps"] == [[direct.choices[0].message.content]]
