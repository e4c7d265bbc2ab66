"""Engine behaviour on a tiny model: stops, limits, aborts, errors, seeds, logprobs, n."""

from __future__ import annotations

import pytest

from llmctl.runtime import LLM, SamplingParams
from llmctl.runtime.config import EngineConfig


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], dtype="float32", max_model_len=128)


PROMPT = [5, 17, 300, 42, 7, 7, 99]


def greedy(llm, prompt=PROMPT, **kw):
    return llm.generate([prompt], SamplingParams(temperature=0.0, **kw))[0].outputs[0]


def test_max_tokens_and_length_finish(llm):
    out = greedy(llm, max_tokens=5, ignore_eos=True)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ids_end_the_sequence_and_are_kept_as_the_last_token(llm):
    full = greedy(llm, max_tokens=12, ignore_eos=True).token_ids
    stop = full[4]
    out = greedy(llm, max_tokens=12, ignore_eos=True, stop_token_ids=[stop])
    assert out.token_ids == full[: full.index(stop) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_a_step_is_queued_before_the_last_tokens_are_read_and_only_stops_cost_a_row(llm, monkeypatch):
    """Tokens the model computes for one request: a max_tokens ending is known in advance (prompt + T - 1);
    a stop token is seen one step late, so the row queued behind it is computed and dropped (+1)."""
    computed = []
    run = llm.engine.model_runner.run

    def counting(batch, *pending, **options):
        computed.append(batch.num_tokens)
        return run(batch, *pending, **options)

    monkeypatch.setattr(llm.engine.model_runner, "run", counting)
    full = greedy(llm, max_tokens=9, ignore_eos=True).token_ids
    assert sum(computed) == len(PROMPT) + 9 - 1
    computed.clear()
    stop = full[3]
    out = greedy(llm, max_tokens=9, ignore_eos=True, stop_token_ids=[stop])
    assert out.token_ids == full[: full.index(stop) + 1]
    assert sum(computed) == len(PROMPT) + full.index(stop) + 1
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_stops_amid_chunking_and_preemption_change_nothing(tiny_models):
    """Many requests ending by stop tokens (each leaving a dropped row in the step behind it) while chunked
    prefill and preemption go on: each output equals the request run alone, and every block returns."""
    model = tiny_models["llama"]
    alone = LLM(model, dtype="float32", max_model_len=256)
    prompts = [[(7 * i + j) % 500 + 1 for j in range(5 + 11 * i)] for i in range(12)]
    params, expected = [], []
    for i, prompt in enumerate(prompts):
        full = greedy(alone, prompt=prompt, max_tokens=30, ignore_eos=True).token_ids
        stop = full[(5 * i) % 25]
        params.append(SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop]))
        expected.append(full[: full.index(stop) + 1])
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4  # k+v, layers, block size, kv heads, head dim, fp32
    busy = LLM(model, dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=48,
               kv_cache_memory=24 * block_bytes)
    results = busy.generate(prompts, params)
    assert busy.engine.scheduler.num_preemptions > 0, "the cache was meant to be too small: preemption untested"
    assert [r.outputs[0].token_ids for r in results] == expected
    assert all(r.outputs[0].finish_reason == "stop" for r in results)
    assert busy.engine.block_manager.num_free_blocks == busy.engine.block_manager.num_blocks


def test_an_interrupted_wait_loses_nothing(tiny_models, monkeypatch):
    """Ctrl-C while step() waits for the GPU's tokens: the step stays in flight and the next calls apply it."""
    from llmctl.runtime.layers.sampler import PendingSample

    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=128)
    prompts = [PROMPT, PROMPT[:3], PROMPT * 2]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    wait, calls = PendingSample.wait, []

    def interrupted_once(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return wait(self)

    monkeypatch.setattr(PendingSample, "wait", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params)
    engine = llm.engine
    finished = {}
    for _ in range(100):  # a few steps are left; a lost token would leave its sequence stuck forever
        if not engine.has_unfinished():
            break
        finished.update((out.request_id, out.token_ids) for out in engine.step() if out.finished)
    assert not engine.has_unfinished()
    assert sorted(finished.values()) == sorted(expected)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert llm.generate(prompts, params)[0].outputs[0].token_ids == expected[0]


def test_a_sequence_ending_on_max_tokens_frees_its_slot_while_its_last_token_is_in_flight(tiny_models):
    """max_num_seqs=1, two 3-token requests: the second is admitted in the step that would otherwise wait
    for the first's last token, so 7 step() calls, not 8."""
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=128, max_num_seqs=1)
    engine = llm.engine
    for prompt in (PROMPT, PROMPT[:4]):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    calls, done = 0, []
    while engine.has_unfinished():
        calls += 1
        done += [out for out in engine.step() if out.finished]
    assert calls == 7 and [len(out.token_ids) for out in done] == [3, 3]


def test_eos_stops_unless_ignored(tiny_models):
    probe = LLM(tiny_models["llama"], dtype="float32", max_model_len=128)
    full = greedy(probe, max_tokens=10, ignore_eos=True).token_ids
    probe.engine.eos_token_ids = frozenset({full[2]})
    out = probe.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=10))[0].outputs[0]
    assert out.token_ids == full[: full.index(full[2]) + 1] and out.finish_reason == "stop"
    assert greedy(probe, max_tokens=10, ignore_eos=True).token_ids == full


def test_context_limit_ends_generation_with_length(llm):
    prompt = list(range(1, 121))
    out = greedy(llm, prompt=prompt, max_tokens=None, ignore_eos=True)
    assert len(prompt) + len(out.token_ids) == 128 and out.finish_reason == "length"


def test_prompt_plus_max_tokens_over_the_context_names_both_numbers(llm):
    with pytest.raises(ValueError, match=r"128 tokens.*120 tokens.*max_tokens is 20"):
        llm.generate([list(range(1, 121))], SamplingParams(max_tokens=20))


@pytest.mark.parametrize("prompt, message", [([], "empty"), ([1, 99999], "token ids must be integers"),
                                             ("text", "no tokenizer")])
def test_bad_prompts_are_value_errors(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(prompt, SamplingParams())


def test_abort_frees_every_block_running_and_waiting(llm):
    engine = llm.engine
    ids = [engine.add_request(PROMPT * (i + 1), SamplingParams(max_tokens=50, ignore_eos=True)).request_id
           for i in range(4)]
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for request_id in ids:
        engine.abort(request_id)
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.abort("no-such-request")


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    crowd = llm.generate([[1, 2, 3], PROMPT, [4, 5], [6]], [others[0], params, others[1], others[2]])
    assert crowd[1].outputs[0].token_ids == alone
    assert llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                 ignore_eos=True))[0].outputs[0].token_ids != alone


def test_n_gives_n_completions_and_logprobs_come_per_token(llm):
    result = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, logprobs=2,
                                                   ignore_eos=True))[0]
    assert len(result.outputs) == 3
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1
    for out in result.outputs:
        assert len(out.logprobs) == 6 and all(lp <= 0.0 for lp in out.logprobs)
        assert all(len(top) == 2 for top in out.top_logprobs)


@pytest.mark.parametrize("option, value, message", [
    ("dtype", "int8", "dtype must be one of"),
    ("block_size", 12, "power of two"),
    ("max_num_seqs", 0, "max_num_seqs must be a positive integer"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization"),
    ("max_model_len", 100000, "max_model_len must be in"),
])
def test_bad_engine_options_are_value_errors(tiny_models, option, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model=tiny_models["llama"], **{option: value})


def test_unsupported_architecture_and_missing_model_are_clear(tmp_path):
    with pytest.raises(ValueError, match="model directory not found"):
        EngineConfig(model=str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture"):
        EngineConfig(model=str(tmp_path))


def test_kv_cache_too_small_for_one_sequence_is_a_start_up_error(tiny_models):
    with pytest.raises(ValueError, match="KV cache holds .* tokens but one sequence of max_model_len=512"):
        LLM(tiny_models["llama"], dtype="float32", kv_cache_memory=4096)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, tiny_models):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    sharded = LLM(str(tmp_path), dtype="float32").generate([PROMPT], params)[0].outputs[0].token_ids
    single = LLM(tiny_models["qwen2"], dtype="float32").generate([PROMPT], params)[0].outputs[0].token_ids
    assert sharded == single


def test_checkpoint_without_safetensors_is_named(tmp_path, tiny_models):
    import shutil

    shutil.copy(f"{tiny_models['llama']}/config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no .safetensors weights .*pytorch_model.bin"):
        LLM(str(tmp_path), dtype="float32")


def test_an_output_cut_inside_a_character_keeps_its_text():
    """max_tokens cuts a three-byte character after its first byte tokens: the text before it survives and the
    cut character comes out as U+FFFD, whether the text is decoded at the end (offline) or token by token
    (streaming). The output is forced with a regex (llguidance: a dependency, absent from the GPU machine)."""
    pytest.importorskip("llguidance")
    from llmctl.runtime.engine import Engine
    from llmctl.runtime.structured import StructuredOutput

    reference = LLM(dtype="float32")
    force = StructuredOutput("regex", "print\\(x\\)水")
    whole = reference.generate("x = ", SamplingParams(temperature=0.0, max_tokens=30, structured=force))[0]
    ids = whole.outputs[0].token_ids
    assert whole.outputs[0].text == "print(x)水"
    assert reference.tokenizer.decode(ids[:-1]).endswith("\ufffd")  # a byte-level BPE spells 水 in pieces
    params = SamplingParams(temperature=0.0, max_tokens=len(ids) - 1, structured=force)
    offline = reference.generate("x = ", params)[0].outputs[0]
    assert offline.finish_reason == "length" and offline.text == "print(x)\ufffd"
    engine = Engine(reference.engine.config, stream=True)
    engine.add_request("x = ", params)
    deltas = []
    while engine.has_unfinished():
        deltas += [out.delta for out in engine.step()]
    assert "".join(deltas) == "print(x)\ufffd"


def test_building_the_model_imports_no_compiler_stack():
    """The model is built on the meta device and then given real storage: done with torch.nn.init's random
    draws, meta-device rotary tables and `to_empty`, that ran torch's Python reference ops, which import
    torch._dynamo and sympy (1-3 s of every start-up). A fresh process checks it (this one has them)."""
    import subprocess
    import sys

    code = """
import sys
from llmctl.runtime.config import EngineConfig
from llmctl.runtime.model_runner import ModelRunner
before = {m for m in ("sympy", "torch._dynamo") if m in sys.modules}
runner = ModelRunner(EngineConfig(model=sys.argv[1], dtype="float32", kv_cache_memory=1 << 24))
print(sorted(m for m in ("sympy", "torch._dynamo") if m in sys.modules and m not in before))
"""
    from llmctl.runtime.llm import default_model

    done = subprocess.run([sys.executable, "-c", code, default_model()], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_only_the_building_thread_skips_weight_initialization():
    """The tokenizer loads on another thread while the model is built: its torch.nn.init calls still draw."""
    import threading

    import torch

    from llmctl.runtime.model_runner import _uninitialized

    here, there = torch.zeros(64), torch.zeros(64)
    with _uninitialized():
        torch.nn.init.normal_(here)
        worker = threading.Thread(target=torch.nn.init.normal_, args=(there,))
        worker.start()
        worker.join()
    assert not here.any() and there.any()
    torch.nn.init.normal_(here)  # and none after it
    assert here.any()


def test_the_tokenizer_loads_after_the_kernels_are_timed_and_a_failure_is_raised(tiny_models, monkeypatch):
    """Beside the weights' load the tokenizer's imports held the GIL enough to slow it 3x, and beside the
    kernels' timing they would delay its launches: on a GPU the tokenizer starts once both are done, on a CPU
    (nothing timed, nothing captured after) first. A tokenizer that cannot load ends the start with its error."""
    import torch

    from llmctl.runtime import engine as engine_module
    from llmctl.runtime.model_runner import ModelRunner

    order = []
    tune, load = ModelRunner._tune_kernels, engine_module._load_tokenizer
    monkeypatch.setattr(ModelRunner, "_tune_kernels", lambda self: order.append("timed") or tune(self))
    monkeypatch.setattr(engine_module, "_load_tokenizer", lambda model: order.append("tokenizer") or load(model))
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=128)
    first = ["timed", "tokenizer"] if torch.cuda.is_available() else ["tokenizer", "timed"]
    assert order == first and llm.generate([[5, 6]])[0].outputs[0].token_ids

    def broken(model):
        raise OSError("tokenizer.json: unreadable")

    monkeypatch.setattr(engine_module, "_load_tokenizer", broken)
    with pytest.raises(OSError, match="tokenizer.json: unreadable"):
        LLM(tiny_models["llama"], dtype="float32", max_model_len=128)


@pytest.mark.parametrize("speculative", [None, {"method": "ngram", "num_tokens": 5}], ids=["plain", "speculative"])
def test_streamed_text_stops_where_a_stop_string_begins_in_an_earlier_delta(speculative):
    """The reference model continues "# the same as" in one-token deltas; the stop string "s th" begins in one
    delta and ends in a later one. Deltas hold back what a stop string could still begin in, so the joined
    deltas and every streamed `text` stop before it, as the offline text does (they ran on to "as": found by
    review)."""
    from llmctl.reference.prompts import code_edit_prompts
    from llmctl.runtime.engine import Engine

    prompt = code_edit_prompts(5)[3]
    params = SamplingParams(temperature=0.0, max_tokens=9, stop=["s th"])
    reference = LLM(dtype="float32", max_model_len=1024, speculative=speculative)
    offline = reference.generate([prompt], params)[0].outputs[0]
    assert offline.finish_reason == "stop" and offline.stop_reason == "s th"
    engine = Engine(reference.engine.config, stream=True)
    engine.add_request(prompt, params, request_id="a")
    deltas = []
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.delta)
            assert offline.text.startswith(out.text) and out.text == "".join(deltas)
    assert "".join(deltas) == offline.text and len([d for d in deltas if d]) > 1
