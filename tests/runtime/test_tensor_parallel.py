"""Tensor parallelism on CPU (gloo, one process per rank): greedy outputs token-identical to one process,
batched under chunked prefill and preemption, int4 and FP8 checkpoints too; a worker that dies takes rank 0
down within seconds; what it cannot split is refused by name."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from llmctl.runtime.config import EngineConfig
from llmctl.runtime.llm import LLM
from llmctl.runtime.sampling_params import SamplingParams


def batch(count: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    shared = [rng.randrange(512) for _ in range(30)]
    prompts = [(shared if i % 3 == 0 else []) + [rng.randrange(512) for _ in range(rng.randrange(1, 120))]
               for i in range(count)]
    return prompts, [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 40), ignore_eos=True) for _ in prompts]


def outputs(model: str, prompts, params, **options) -> tuple[list[list[int]], int]:
    llm = LLM(model, dtype="float32", **options)
    try:
        results = llm.generate(prompts, params)
        engine = llm.engine
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return [r.outputs[0].token_ids for r in results], engine.scheduler.num_preemptions
    finally:
        llm.close()


SLOW = pytest.mark.slow  # (four processes, or families whose code paths the default cases already cross)


@pytest.mark.parametrize("family,size", [("llama", 2), ("qwen2", 2), ("mixtral", 2), pytest.param("qwen3", 2, marks=SLOW),
                                         pytest.param("gemma2", 2, marks=SLOW), pytest.param("phi3", 2, marks=SLOW),
                                         pytest.param("qwen3_moe", 2, marks=SLOW), pytest.param("llama", 4, marks=SLOW)])
def test_greedy_outputs_equal_one_process(tiny_models, family, size):
    """16 mixed prompts in a cache too small for all (preemption), a 64-token budget (chunked prefill).
    Qwen2: q/k/v biases; Mixtral, Qwen3-MoE: every expert split, the router whole; Qwen3: per-head norms; Gemma
    2: windows, soft-capping, sandwich norms; Phi-3: fused qkv / gate_up weights and LongRoPE; size 4: fewer KV
    heads (2) than ranks, so each is replicated."""
    from test_generate_matches_hf import kv_block_bytes

    model = tiny_models[family]
    prompts, params = batch(16, seed=size)
    options = dict(max_num_seqs=12, max_num_batched_tokens=64, block_size=16, max_model_len=256)
    want, _ = outputs(model, prompts, params, **options)
    kv_heads_per_rank = max(2 // size, 1)  # of the 2: split, or one replicated on each rank
    got, preemptions = outputs(model, prompts, params, tensor_parallel_size=size,
                               kv_cache_memory=24 * kv_block_bytes(model, 16) * kv_heads_per_rank // 2, **options)
    assert got == want
    assert preemptions > 0, "the cache was meant to be too small: preemption untested"


@pytest.mark.gpu
def test_captured_graphs_equal_eager_steps_on_gpus(tiny_models, monkeypatch):
    """LLMCTL_TP_CUDA_GRAPHS=1: every rank captures its decode graphs (all-reduces and the head's gather
    inside) and replays what rank 0 staged; outputs equal the eager steps'."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    prompts, params = batch(16, seed=7)
    want, _ = outputs(tiny_models["llama"], prompts, params, tensor_parallel_size=2)
    monkeypatch.setenv("LLMCTL_TP_CUDA_GRAPHS", "1")
    got, _ = outputs(tiny_models["llama"], prompts, params, tensor_parallel_size=2)
    assert got == want


def test_reference_model_equals_one_process():
    from llmctl.reference import default_model_path
    from llmctl.reference.prompts import code_edit_prompts

    prompts = code_edit_prompts(4)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    model = str(default_model_path())
    assert outputs(model, prompts, params, tensor_parallel_size=2)[0] == outputs(model, prompts, params)[0]


@pytest.mark.parametrize("tied", [False, True])
def test_a_vocabulary_the_ranks_do_not_divide_is_split_and_padded(tiny_model, tmp_path, tied):
    """515 tokens over 2 ranks: each holds 258 rows, rank 1's last one padding; ids on either side of the
    split (257 | 258) are embedded by their rank alone and every logit comes back, tied embeddings too."""
    model = tiny_model(tmp_path / "odd", "llama", vocab_size=515, tie_word_embeddings=tied)
    prompts = [[1, 257, 258, 514, 3, 300], [513, 2, 256, 100] * 5]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3, prompt_logprobs=2)] * 2
    llm = LLM(model, dtype="float32", tensor_parallel_size=2)
    try:
        got = llm.generate(prompts, params)
        assert llm.engine.model_runner.model.embed_tokens.weight.shape[0] == 258
    finally:
        llm.close()
    want = LLM(model, dtype="float32").generate(prompts, params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids and len(g.outputs[0].top_logprobs) == 20
        assert [[t for t, _ in top] for _, top in g.prompt_logprobs] == [[t for t, _ in top] for _, top in w.prompt_logprobs]
        assert g.prompt_logprobs[0][0] == pytest.approx(w.prompt_logprobs[0][0], abs=1e-4)
        assert [[t for t, _ in top] for top in g.outputs[0].top_logprobs] == \
            [[t for t, _ in top] for top in w.outputs[0].top_logprobs]


@pytest.mark.parametrize("method,options", [("rtn", ("--group-size", "64")), ("fp8", ())])
def test_quantized_checkpoints_split_with_their_scales(quantized_reference, method, options):
    """int4 (GPTQ layout, groups of 64: o_proj's 128 columns a rank hold two) and FP8-dynamic checkpoints of
    the reference model: each rank reads its codes and their scales; outputs equal one process's."""
    from llmctl.reference.prompts import code_edit_prompts

    model = quantized_reference(method, *options)
    prompts, params = code_edit_prompts(3), SamplingParams(temperature=0.0, max_tokens=24)
    assert outputs(model, prompts, params, tensor_parallel_size=2)[0] == outputs(model, prompts, params)[0]


def test_act_order_checkpoints_are_refused_by_name(quantized_reference):
    import multiprocessing

    model = quantized_reference("gptq", "--desc-act", "--group-size", "64")
    with pytest.raises(ValueError, match=r"layers\.0\.\w+\.(o|down)_proj\.weight: an act-order \(desc_act\) weight"):
        LLM(model, dtype="float32", tensor_parallel_size=2)
    assert not multiprocessing.active_children()


def test_a_dead_worker_ends_rank_0_within_seconds(tiny_models):
    script = textwrap.dedent(f"""
        import sys
        from llmctl.runtime.llm import LLM
        from llmctl.runtime.sampling_params import SamplingParams
        if __name__ == "__main__":
            llm = LLM({tiny_models["llama"]!r}, dtype="float32", tensor_parallel_size=2)
            print(llm.engine.model_runner.workers.processes[0].pid, flush=True)
            while True:
                llm.generate([[1, 2, 3]], SamplingParams(max_tokens=50, ignore_eos=True))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        time.sleep(1.0)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        code = proc.wait(timeout=30)
        assert code != 0 and time.monotonic() - start < 10
    finally:
        proc.kill()


def test_what_cannot_be_split_is_refused(tiny_models):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 must divide the model's attention heads \(4\)"):
        EngineConfig(model=tiny_models["llama"], tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer, got 0"):
        EngineConfig(model=tiny_models["llama"], tensor_parallel_size=0)


def test_a_rank_0_start_up_error_is_raised_and_stops_the_workers(tiny_models):
    """A cache too small for one sequence: rank 0 raises the error (the workers fail likewise) and the
    caller can go on, with no worker left."""
    import multiprocessing

    with pytest.raises(ValueError, match="the KV cache holds"):
        LLM(tiny_models["llama"], dtype="float32", tensor_parallel_size=2, kv_cache_memory=1024, max_model_len=256)
    assert not multiprocessing.active_children()
    assert outputs(tiny_models["llama"], [[1, 2, 3]], [SamplingParams(max_tokens=4)], tensor_parallel_size=2)[0]


def worker_pids(pid: int) -> list[int]:
    """The spawned tensor-parallel ranks among a process's children (not multiprocessing's resource tracker)."""
    from pathlib import Path

    children = [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def start_server(port: int) -> subprocess.Popen:
    """`llmctl serve --tensor-parallel-size 2` of the reference model on loopback, once /health answers 200."""
    import httpx

    command = [sys.executable, "-c", "import typer; from llmctl.cli.serve import serve; typer.run(serve)",
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
               "--tensor-parallel-size", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "LLMCTL_LOG_FORMAT": "text"})
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the server did not come up in 120 s"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def test_serve_over_two_ranks_answers_then_exits_as_it_should():
    """The offline engine's greedy answer over HTTP; exit 0 on SIGTERM (the workers stopped, not mourned);
    a second server whose rank 1 is killed exits non-zero within seconds."""
    httpx = pytest.importorskip("httpx")
    from llmctl.runtime.parallel import free_port

    prompt = "def read_config(path):"
    want = LLM(dtype="float32").generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text
    port = free_port()
    proc = start_server(port)
    try:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["text"] == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.communicate()[1]
    finally:
        proc.kill()
    proc = start_server(port)
    try:
        (rank_1,) = worker_pids(proc.pid)
        os.kill(rank_1, signal.SIGKILL)
        start = time.monotonic()
        assert proc.wait(timeout=30) != 0
        assert time.monotonic() - start < 10
    finally:
        proc.kill()

