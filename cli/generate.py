"""`llmctl generate`: stream a completion to the terminal from the runtime engine."""

from __future__ import annotations

import typer

from llmctl.cli import engine_options
from llmctl.cli.console import console, emit, fail, start_output


def generate(
    model: str = typer.Argument(None, help="Model directory (default: the embedded reference model).",
                                envvar="LLMCTL_MODEL", show_default=False),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for several prompts."),
    max_tokens: int = typer.Option(128, help="Tokens to generate at most.", min=1),
    temperature: float = typer.Option(0.0, help="0 is greedy.", min=0.0),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(None, help="Sample among the k most likely tokens.", show_default=False),
    seed: int = typer.Option(None, help="Seed for reproducible sampling.", show_default=False),
    stop: list[str] = typer.Option(None, help="Stop string, taken literally (in bash, $'\\n' is a newline); repeatable.", show_default=False),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat template as a user message."),
    dtype: str = typer.Option("auto", envvar="LLMCTL_DTYPE", help="auto, float16, bfloat16 or float32."),
    kv_cache_dtype: str = engine_options.kv_cache_dtype(),
    speculative: str = engine_options.speculative(),
    num_speculative_tokens: int = engine_options.num_speculative_tokens(),
    draft_model: str = engine_options.draft_model(),
    tensor_parallel_size: int = engine_options.tensor_parallel_size(),
    device: str = typer.Option("auto", envvar="LLMCTL_DEVICE", help="auto, cuda or cpu."),
    max_model_len: int = typer.Option(None, envvar="LLMCTL_MAX_MODEL_LEN", help="Context length cap.",
                                      show_default=False),
    output: str = typer.Option("text", "--output", help="text (streamed), or json: one document with every "
                                                        "completion, its tokens and finish reason."),
) -> None:
    """Generate text from prompts, streaming tokens as they come."""
    start_output(output)
    try:
        from llmctl.runtime.config import EngineConfig
        from llmctl.runtime.engine import Engine
        from llmctl.runtime.llm import default_model
        from llmctl.runtime.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stop or [])
        config = EngineConfig(model=model or default_model(), dtype=dtype, device=device,
                              max_model_len=max_model_len, kv_cache_dtype=kv_cache_dtype,
                              speculative=engine_options.speculative_config(speculative, num_speculative_tokens, draft_model),
                              tensor_parallel_size=tensor_parallel_size,
                              enforce_eager=True)
        engine = Engine(config, stream=True)
        for i, text in enumerate(prompt):
            engine.add_request(_apply_chat(engine, text) if chat else text, params, request_id=str(i))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if console.json:
        emit(_collect(engine, prompt, config.model))
    else:
        _stream(engine, prompt)


def _collect(engine, texts: list[str], model: str) -> dict:
    import time

    start, done = time.perf_counter(), {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    seconds = time.perf_counter() - start
    outs = [done[str(i)] for i in range(len(texts))]
    generated = sum(len(o.token_ids) for o in outs)
    return {"model": str(model), "seconds": round(seconds, 3), "output_tokens_per_second": round(generated / seconds, 1),
            "completions": [{"prompt": text, "text": o.text, "finish_reason": o.finish_reason,
                             "prompt_tokens": len(o.prompt_token_ids), "completion_tokens": len(o.token_ids),
                             "token_ids": list(o.token_ids)} for text, o in zip(texts, outs)]}


def _stream(engine, texts: list[str]) -> None:
    """All prompts run together; each one's text prints live in turn, the later ones catching up first."""
    arrived: dict[str, list[str]] = {str(i): [] for i in range(len(texts))}
    finished: set[str] = set()
    for i, text in enumerate(texts):
        live = str(i)
        if len(texts) > 1:
            console.info(f"[bold]--- prompt {i}[/]")
        console.info(text, end="", style="dim", markup=False)
        console.print("".join(arrived[live]), end="", markup=False)
        while live not in finished:
            for out in engine.step():
                if out.finished:
                    finished.add(out.request_id)
                if out.request_id == live:
                    console.print(out.delta, end="", markup=False)
                else:
                    arrived[out.request_id].append(out.delta)
        console.print()


def _apply_chat(engine, text: str) -> list[int]:
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        fail("--chat needs a model whose tokenizer has a chat template")
    # The template writes its own special tokens: encode it without adding a second BOS.
    templated = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
    return engine.tokenizer.encode(templated, add_special_tokens=False)
