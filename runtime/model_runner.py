"""The device side: weights, the KV cache, batch tensors, the forward pass, CUDA graphs, sampling."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Container

import numpy as np
import torch

from llmctl.checkpoint.formats import quantization_config
from llmctl.checkpoint.loader import checkpoint_dtype, iter_weights, tensor_names
from llmctl.runtime import batch_inputs, parallel
from llmctl.runtime.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from llmctl.runtime.cuda_graphs import DecodeGraphs
from llmctl.runtime.kernels import compiling, dense_gemv, fp8_gemv_tune, fused_moe_tune, kv_store
from llmctl.runtime.kernels.w4a16 import pretune
from llmctl.runtime.layers import fp8_linear
from llmctl.runtime.layers.attention import Attention, AttentionMetadata
from llmctl.runtime.layers.dense_linear import DenseLinear
from llmctl.runtime.layers.linear import Int4Linear
from llmctl.runtime.layers.moe import SparseMoe
from llmctl.runtime.layers.rotary import RotaryEmbedding
from llmctl.runtime.layers.sampler import PendingSample, Sampler, SamplingBatch, make_generator
from llmctl.runtime.models.decoder import CausalLM, ModelArgs
from llmctl.runtime.parallel_shard import shard_weights
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.scheduler import ScheduledBatch
from llmctl.runtime.sequence import Sequence
from llmctl.runtime.token_masks import TokenMasks
from llmctl.runtime.verify_graphs import VerifyGraphs

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
log = logging.getLogger("llmctl.engine")
PROMPT_LOGPROB_ROWS = 256  # prompt positions scored at once: their fp32 logits are rows x vocab
# 1: build the CUDA graphs' buffers and staging without capturing, and run them eagerly (CPU tests of the
# staging, tensor parallelism's broadcast of it included); every process of an engine reads it.
EMULATE_GRAPHS_ENV = "LLMCTL_EMULATE_CUDA_GRAPHS"
GRAPH_MEMORY_RESERVE = 1 << 30  # bytes kept out of the KV budget for CUDA graphs and the allocator's slack


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: parallel.TPGroup | None = None,
                 after_timing: Callable[[], None] | None = None) -> None:
        """tp: a tensor-parallel worker's group (parallel.worker_main); rank 0 (the engine's) starts the
        workers itself when config.tensor_parallel_size > 1. after_timing: called once the weights are loaded
        and the kernels timed, before the KV cache and the graphs, on a GPU (the engine starts loading the
        tokenizer there: beside the weights' load it held the GIL enough to take 8.7 s where 3 sufficed,
        H100); on a CPU, where nothing is timed or captured, first."""
        self.config = config
        self.device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if config.device == "auto" else config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but CUDA is not available")
        self.workers: parallel.Workers | None = None
        if tp is None and config.tensor_parallel_size > 1:
            self.workers = parallel.Workers(config, self.device)
            tp = self.workers.group
        self.tp = tp
        if tp is not None and self.device.type == "cuda":
            self.device = torch.device("cuda", tp.rank)
        try:
            self._start(config, after_timing)
        except BaseException:
            if self.workers is not None:  # they would wait for rank 0 forever
                self.workers.abort()
            raise

    def _start(self, config: EngineConfig, after_timing: Callable[[], None] | None) -> None:
        tp = self.tp
        if after_timing is not None and self.device.type != "cuda":
            after_timing()
            after_timing = None
        self.dtype = self._pick_dtype()
        self.use_triton = config.kernel_backend == "triton" or (
            config.kernel_backend == "auto" and self.device.type == "cuda")
        self.cache_dtype = self._pick_cache_dtype()
        self.full_args = ModelArgs.from_hf(config.hf_config, config.family, tensor_names(config.model),
                                           quantization_config(config.model))
        self.args = parallel.shard_args(self.full_args, tp) if tp is not None else self.full_args  # what runs here
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        start = time.perf_counter()
        self.model = self._load_model()
        log.info("loaded the weights in %.1f s: %.2f GiB, %s on %s (%s kernels)", time.perf_counter() - start,
                 weight_bytes(self.model) / 2**30, str(self.dtype).removeprefix("torch."), self.device,
                 "Triton" if self.use_triton else "torch")
        self._settle_kv_scales()
        self._tune_kernels()
        if after_timing is not None:
            after_timing()
        self.sampler = Sampler()
        self.num_blocks = self._num_kv_blocks()
        if tp is not None:
            self.num_blocks = parallel.share_num_blocks(self.num_blocks, self.device)
        self.scratch_block = self.num_blocks  # one extra block: where padded batch rows read and write
        self.kv_caches = self._allocate_kv_cache(self.num_blocks + 1)
        log.info("KV cache: %d tokens (%d blocks of %d), %.2f GiB in %s; up to %d sequences of %d tokens",
                 self.num_blocks * self.block_size, self.num_blocks, self.block_size,
                 self.num_blocks * self._block_bytes() / 2**30, str(self.cache_dtype).removeprefix("torch."),
                 config.max_num_seqs, config.max_model_len)
        self.graphs: DecodeGraphs | None = None
        self.verify_graphs: VerifyGraphs | None = None
        self.masks = TokenMasks(self.device, config.max_num_seqs)  # structured outputs' (engine sets its grammars)
        # The torch twins (kernel_backend="torch") read sequence lengths on the host: not capturable.
        capture = self.device.type == "cuda" and self.use_triton and not config.enforce_eager and (
            tp is None or parallel.graphs_wanted())
        if capture or os.environ.get(EMULATE_GRAPHS_ENV) == "1":
            self._capture_graphs(config, capture)

    def _capture_graphs(self, config: EngineConfig, capture: bool = True) -> None:
        """Decode steps' graphs, and with speculation its verification steps' (in the same memory pool).
        capture=False builds their buffers and staging only, replayed eagerly (CPU tests of the staging)."""
        start = time.perf_counter()
        self.graphs = DecodeGraphs(self.model, self.kv_caches, config.max_num_seqs, self.max_blocks_per_seq,
                                   config.max_model_len, self.block_size, self.scratch_block, self.device)
        pool = self.graphs.capture() if capture else None
        spec = config.speculative
        if spec is not None:
            self.verify_graphs = VerifyGraphs(self.model, self.kv_caches, min(spec.max_batch, config.max_num_seqs),
                                              spec.num_tokens, self.max_blocks_per_seq, config.max_model_len,
                                              self.block_size, self.scratch_block, self.device)
            if capture:
                self.verify_graphs.capture(pool)
        if capture:
            log.info("captured CUDA graphs for %d decode batch sizes%s in %.1f s", len(self.graphs.graphs),
                     f" and {len(self.verify_graphs.graphs)} verification ones" if self.verify_graphs else "",
                     time.perf_counter() - start)

    # -- start-up -------------------------------------------------------------------------------

    def _pick_dtype(self) -> torch.dtype:
        if self.config.dtype != "auto":
            return DTYPES[self.config.dtype]
        # CPUs are slow in half precision; the checkpoint's own dtype is meant for accelerators.
        return checkpoint_dtype(self.config.hf_config) if self.device.type == "cuda" else torch.float32

    def _pick_cache_dtype(self) -> torch.dtype:
        if not self.config.fp8_kv_cache:
            return self.dtype
        if self.use_triton and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(self.device)
            raise ValueError(f"an fp8 KV cache needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"this one is {major}.{minor}: use kv_cache_dtype auto")
        return kv_store.FP8

    def _load_model(self) -> CausalLM:
        with torch.device("meta"), _uninitialized():
            model = CausalLM(self.args, self.use_triton, fp8_linear.supported(self.device), self.tp)
        model = model.to(self.dtype)  # cast on meta: no full-size fp32 copy
        self._check_weights_fit(sum(p.numel() for p in model.parameters()) * self.dtype.itemsize)
        # = model.to_empty(device): torch.empty_like on a meta tensor runs a Python reference op importing sympy
        model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=self.device))
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset(self.device)
        weights = iter_weights(self.config.model, self.dtype, self.device)
        if self.tp is not None:
            weights = shard_weights(weights, self.full_args, self.tp)
        model.load_weights(weights)
        return model.eval().requires_grad_(False)

    def _settle_kv_scales(self) -> None:
        """A checkpoint's KV scales serve an fp8 cache only; without them an fp8 cache's scale is 1.0 (vLLM's
        default; on the reference model perplexity moves by under 0.1%, BENCHMARKS.md)."""
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        given = any((m.k_scale, m.v_scale) != (1.0, 1.0) for m in layers)
        if self.cache_dtype == kv_store.FP8:
            log.info("fp8 KV cache, %s", "the checkpoint's per-layer scales" if given else "scale 1.0 (none in the checkpoint)")
        elif given:
            log.info("the checkpoint's KV cache scales are unused: the cache keeps the model's dtype (kv_cache_dtype auto)")
            for m in layers:
                m.k_scale = m.v_scale = 1.0

    def _tune_kernels(self) -> None:
        """Time the W4A16 and fused-MoE kernels for every batch size (M bucket) a step can bring, before
        serving: decode batches up to max_num_seqs, prefill chunks up to max_num_batched_tokens. W4A16
        choices are cached per GPU on disk, fused-MoE ones in memory. 16-bit linears' one-row GEMV is
        timed against cuBLAS per weight shape (batch-1 decode, `dense_gemv`); FP8 linears' GEMV configuration
        per weight shape and tier of rows (`fp8_gemv_tune`)."""
        if self.device.type != "cuda":
            return
        weights = [w for module in self.model.modules() if isinstance(module, Int4Linear) for w in module.packed]
        experts = [m for m in self.model.modules() if isinstance(m, SparseMoe) and self.use_triton]
        c = self.config
        max_m = max(c.max_num_batched_tokens, c.max_num_seqs)
        if c.speculative is not None:  # a verification step: 1 + K rows for each speculating sequence
            max_m = max(max_m, min(c.speculative.max_batch, c.max_num_seqs) * (1 + c.speculative.num_tokens))
        shapes = {dense_gemv.key(m.weight): m.weight for m in self.model.modules() if isinstance(m, DenseLinear)}
        start = time.perf_counter()
        if dense_gemv.pretune(shapes.values(), self.dtype):
            log.info("timed the one-row GEMV against cuBLAS for %d weight shapes in %.1f s; Triton's is faster for %d",
                     len(shapes), time.perf_counter() - start,
                     sum(dense_gemv.chosen(w) is not None for w in shapes.values()))
        fp8 = [(m.weight, m.gemm_scale) for m in self.model.modules() if isinstance(m, fp8_linear.Fp8Linear)
               and m.gemv_rows]
        start = time.perf_counter()
        if fp8 and (timed := fp8_gemv_tune.pretune(fp8, self.dtype, fp8_linear.GEMV_MAX_ROWS)):
            log.info("timed the FP8 GEMV's configurations for %d (shape, rows) pairs in %.1f s", timed,
                     time.perf_counter() - start)
        for kind, tune, layers in (("int4", pretune, weights), ("fused-MoE", fused_moe_tune.pretune, experts)):
            start = time.perf_counter()
            tuned = tune(layers, self.dtype, max_m) if layers else 0
            if tuned:
                log.info("tuned the %s kernels for %d (shape, batch) buckets in %.1f s", kind, tuned,
                         time.perf_counter() - start)

    def _check_weights_fit(self, weight_bytes: int) -> None:
        if self.device.type != "cuda":
            return
        free, total = torch.cuda.mem_get_info(self.device)
        budget = min(free, total * self.config.gpu_memory_utilization)
        if weight_bytes > budget:
            raise ValueError(f"the model's weights need {weight_bytes / 2**30:.1f} GiB but only {budget / 2**30:.1f} GiB "
                             "of GPU memory is available: use a smaller dtype, a quantized checkpoint or a larger GPU")

    def _block_bytes(self) -> int:
        a = self.args
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.cache_dtype.itemsize

    def _num_kv_blocks(self) -> int:
        c = self.config
        if c.kv_cache_memory is not None:
            budget = c.kv_cache_memory
        elif self.device.type == "cpu":
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        else:
            budget = self._profile_free_memory()
        # More blocks than max_num_seqs full-length sequences could ever use would be wasted memory.
        num_blocks = min(budget // self._block_bytes(), c.max_num_seqs * self.max_blocks_per_seq + 1)
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {max(num_blocks, 0) * self.block_size} tokens but one sequence of "
                f"max_model_len={c.max_model_len} needs {self.max_blocks_per_seq * self.block_size}: lower "
                "max_model_len or give the cache more memory (gpu_memory_utilization / kv_cache_memory)")
        return int(num_blocks)

    @torch.inference_mode()
    def _profile_free_memory(self) -> int:
        """Run the largest batch once and give the KV cache what the memory budget leaves over."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        c = self.config
        num_tokens = min(c.max_num_batched_tokens, c.max_num_seqs * c.max_model_len)
        blocks = -(-num_tokens // self.block_size) + 1
        caches = self._allocate_kv_cache(blocks)
        lens = [min(c.max_model_len, num_tokens - i) for i in range(0, num_tokens, c.max_model_len)]
        meta = self._dummy_metadata(lens)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        if self.tp is None:  # its kernels compiled on all cores first (not under TP: a rank stopped early would hang)
            compiling.ahead([functools.partial(self.model, ids, positions, caches, meta)])
        hidden = self.model(ids, positions, caches, meta)  # (every rank profiles the same batch: no broadcast)
        self.model.compute_logits(hidden[:1].expand(c.max_num_seqs, -1))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del caches, hidden
        free, total = torch.cuda.mem_get_info()
        outside_torch = total - free - torch.cuda.memory_reserved()
        return int(total * c.gpu_memory_utilization - outside_torch - peak - GRAPH_MEMORY_RESERVE)

    def _dummy_metadata(self, lens: list[int]) -> AttentionMetadata:
        """Sequences of the given lengths packed into consecutive blocks from block 0, all tokens new."""
        bs = self.block_size
        tables, first = [], 0
        for n in lens:
            tables.append(list(range(first, first + -(-n // bs))))
            first += -(-n // bs)
        width = max(len(t) for t in tables)
        slots = [t[p // bs] * bs + p % bs for t, n in zip(tables, lens) for p in range(n)]
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            query_start_loc=torch.tensor(np.cumsum([0, *lens]), dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                      device=self.device),
            max_query_len=max(lens), max_seq_len=max(lens))

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        a = self.args
        shape = (num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        # Zeroed, not empty: masked-out lanes of a tile must never meet NaN garbage.
        return [(torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
                 torch.zeros(shape, dtype=self.cache_dtype, device=self.device)) for _ in range(a.num_layers)]

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, pending_tokens: torch.Tensor | None = None,
            pending_rows: dict[Sequence, int] | None = None,
            before_sampling: Callable[[Callable[[], None]], None] | None = None
            ) -> tuple[PendingSample | None, dict[Sequence, Exception]]:
        """Queue the batch's forward pass and the sampling of the sequences whose last token it computes;
        returns without waiting for the GPU, with the sequences whose sampling set-up failed (see
        `_sampling_batch`). A sequence whose newest token is still pending (sampled by the previous step,
        see Sequence.num_pending) reads it on the device: pending_tokens[pending_rows[seq]]. When a sampled
        sequence has a structured output, `before_sampling(start_masks)` runs once the forward pass is queued:
        the engine advances the grammars by the previous step's tokens, calls start_masks, and applies that
        step's outputs while the masks are filled; then they are applied to the logits."""
        sampled = [s for s, n, d in zip(batch.seqs, batch.num_new_tokens, batch.drafts)
                   if s.num_computed_tokens + n - len(d) == s.num_tokens]
        all_decode = len(sampled) == len(batch) and all(n == 1 + len(d) for n, d in zip(batch.num_new_tokens,
                                                                                          batch.drafts))
        graphs = (self.verify_graphs if batch.speculative else self.graphs) if all_decode else None
        graph_size = graphs.size_for(len(batch)) if graphs is not None else None
        if graph_size is not None and batch.speculative and not pending_rows:  # (the engine waits before these)
            rows = graphs.stage(batch.seqs, batch.drafts, graph_size)
            self._send_graph_step(1, graph_size)
            logits = graphs.replay(rows, graph_size)
        elif graph_size is not None and not batch.speculative:
            staged = graphs.stage(batch.seqs, graph_size, pending_rows)
            if staged is not None:
                batch_inputs.fill_pending(*staged, pending_tokens)
            self._send_graph_step(0, graph_size)
            logits = graphs.replay(len(batch), graph_size)
        else:
            ids, src, positions, meta, sample_rows = batch_inputs.prepare(batch, pending_rows, self.block_size,
                                                                          self.scratch_block, self.device)
            if src is not None:
                batch_inputs.fill_pending(ids, src, pending_tokens)
            hidden = self._forward(ids, positions, meta)
            if any(seq.sampling_params.prompt_logprobs is not None for seq in batch.seqs):
                self._prompt_logprobs(batch, hidden)
            if not sampled:
                return None, {}
            logits = self._logits(hidden, sample_rows)
        fill = None
        if any(seq.grammar is not None for seq in sampled):
            masks: list = []  # the StartedMasks, once started
            start = lambda: masks.append(self.masks.start(sampled))  # noqa: E731
            before_sampling(start) if before_sampling is not None else start()
            if not masks:  # the engine did not start them
                start()
            started = masks[0]
            if batch.speculative:  # logits rows: a speculating sequence (never a constrained one) has several
                rows_of = {s: 1 + len(d) for s, d in zip(batch.seqs, batch.drafts)}
                first_rows = np.cumsum([0] + [rows_of[s] for s in sampled])
                started = dataclasses.replace(started, rows=[int(first_rows[i]) for i in started.rows])
            fill = self.masks.apply(logits, started)
        drafts = {seq: d for seq, d in zip(batch.seqs, batch.drafts) if d} if batch.speculative else None
        sampling, failed = self._sampling_batch(sampled, drafts)
        pending = self.sampler.launch(logits, sampling)
        pending.host_work = fill
        return pending, failed

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's forward pass; with tensor parallelism, the workers are sent the same inputs first."""
        if self.workers is not None:
            parallel.StepInputs(ids, positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens,
                                meta.block_tables, meta.max_query_len, meta.max_seq_len, meta.num_decodes).send()
        return self.model(ids, positions, self.kv_caches, meta)

    def _send_graph_step(self, which: int, size: int) -> None:
        """With tensor parallelism: the workers replay the same graph on the inputs staged here."""
        if self.workers is not None:
            graphs = self.verify_graphs if which else self.graphs
            parallel.send_graph_step(which, size, graphs.device_buffers(size))

    def _logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits of hidden's rows; with tensor parallelism a collective (the LM head is split by vocabulary):
        the workers are sent the rows first, and compute their slice of the same rows' logits."""
        if self.workers is not None:
            parallel.send_logits_rows(rows)
        return self.model.compute_logits(hidden[rows])

    def serve_steps(self) -> None:
        """A tensor-parallel worker's life after start-up: run each forward pass rank 0 sends, and its part of
        each logits rank 0 computes from that pass, until a stop."""
        hidden = None
        while True:
            header = parallel.receive_header(self.device)
            kind = int(header[0])
            if kind == parallel.STOP:
                return
            with torch.inference_mode():
                if kind == parallel.LOGITS:
                    self.model.compute_logits(hidden[parallel.receive_logits_rows(header, self.device)])
                    continue
                if kind == parallel.GRAPH:
                    size, graphs = int(header[1]), (self.verify_graphs if int(header[2]) else self.graphs)
                    parallel.receive_graph_step(graphs.device_buffers(size))
                    graphs.replay(0, size)
                    continue
                s = parallel.StepInputs.receive(header, self.device)
                meta = AttentionMetadata(s.slot_mapping, s.query_start_loc, s.seq_lens, s.block_tables,
                                         s.max_query_len, s.max_seq_len, s.num_decodes)
                hidden = self.model(s.ids, s.positions, self.kv_caches, meta)

    def close(self) -> None:
        """Stop the tensor-parallel workers (rank 0); nothing to do without them."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> None:
        """Score the prompt tokens this step computes for sequences that asked (`prompt_logprobs`): the
        logits at position p give prompt token p + 1's logprob. Synchronous, in slices of rows, since a
        prompt's logits over a large vocabulary would not fit at once; positions already scored before a
        preemption are not scored again."""
        row = 0
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            k, first, row = seq.sampling_params.prompt_logprobs, seq.num_computed_tokens, row + num_new
            done, last = len(seq.prompt_logprobs), min(first + num_new, seq.num_prompt_tokens - 1)
            if k is None or not first <= done < last:
                continue
            for lo in range(done, last, PROMPT_LOGPROB_ROWS):
                hi = min(lo + PROMPT_LOGPROB_ROWS, last)
                start = row - num_new + lo - first
                rows = torch.arange(start, start + hi - lo, device=self.device)
                logprobs = torch.log_softmax(self._logits(hidden, rows), dim=-1)
                targets = torch.tensor(seq.prompt_token_ids[lo + 1: hi + 1], device=self.device)
                chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
                tops = [[]] * len(chosen)
                if k:
                    top = logprobs.topk(k, dim=-1)
                    tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
                seq.prompt_logprobs.extend(zip(chosen, tops))

    def _sampling_batch(self, seqs: list[Sequence], drafts: dict[Sequence, list[int]] | None = None
                        ) -> tuple[SamplingBatch, dict[Sequence, Exception]]:
        """The sampler's rows for seqs, and the sequences whose own set-up raised. A speculating sequence (in
        drafts) has a row for each draft it verifies and one for the token after them, all with its
        settings. This is the place for
        per-request work before sampling (a generator from the seed, penalty token arrays, the parameters
        as batch rows; logit bias or grammar masks when they come): a fault in it ends only its request.

        The batch is built in one go; only when that raises is each row built alone to find the culprits,
        and a fault that no row reproduces alone is the batch's and is raised. A culprit keeps its row, as
        a greedy placeholder (rows are independent, so the others sample exactly as they would have)."""
        draft_rows = None  # per row, the draft it verifies, -1 for none
        if drafts is not None:
            draft_rows = [t for seq in seqs for t in [*drafts.get(seq, ()), -1]]
            seqs = [seq for seq in seqs for _ in range(1 + len(drafts.get(seq, ())))]
        try:
            return self._build_sampling(seqs, draft_rows=draft_rows), {}
        except Exception:
            failed = {}
            for seq in dict.fromkeys(seqs):
                try:
                    self._build_sampling([seq])
                except Exception as exc:
                    failed[seq] = exc
            if not failed:
                raise
            return self._build_sampling(seqs, failed, draft_rows), failed

    def _build_sampling(self, seqs: list[Sequence], failed: Container[Sequence] = (),
                        draft_rows: list[int] | None = None) -> SamplingBatch:
        rows = [_PLACEHOLDER_ROW if seq in failed else self._sampling_row(seq) for seq in seqs]
        params, prompts, outputs, generators = (list(column) for column in zip(*rows))
        # min_tokens: until a sequence has that many, its eos and stop tokens cannot be sampled.
        banned = [seq.stop_token_set if seq not in failed and seq.num_output_tokens + seq.num_pending
                  < seq.sampling_params.min_tokens else frozenset() for seq in seqs]
        return SamplingBatch.build(params, prompts, outputs, generators, self.args.vocab_size, self.device,
                                   banned if any(banned) else None, draft_rows)

    def _sampling_row(self, seq: Sequence) -> tuple:
        """seq's params, prompt and output token ids (arrays where penalties read them), and generator."""
        params = seq.sampling_params
        if params.seed is not None and seq.generator is None:
            seq.generator = make_generator(params.seed, self.device)
        if not params.has_penalties:
            return params, seq.prompt_token_ids, seq.output_token_ids, seq.generator
        tokens = seq.token_array()
        return params, tokens[: seq.num_prompt_tokens], tokens[seq.num_prompt_tokens:], seq.generator


# Samples a failed sequence's row without reading anything of it: greedy, no penalties, no logprobs.
_PLACEHOLDER_ROW = (SamplingParams(temperature=0.0), [], [], None)


_building = threading.local()


@contextlib.contextmanager
def _uninitialized():
    """In this thread, torch.nn.init's in-place initializers do nothing inside: a model built on the meta device
    has its weights loaded over whatever they would draw, and on meta they run torch's Python reference ops,
    whose first call imports torch._dynamo (1-3 s of start-up). Other threads (the tokenizer's) keep them."""
    names = ("uniform_", "normal_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {name: getattr(torch.nn.init, name) for name in names}

    def skipped(fn):
        return lambda tensor, *args, **kwargs: tensor if getattr(_building, "on", False) else fn(tensor, *args,
                                                                                                  **kwargs)

    for name, fn in saved.items():
        setattr(torch.nn.init, name, skipped(fn))
    _building.on = True
    try:
        yield
    finally:
        _building.on = False
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds, each storage once: parameters and buffers, and what quantized
    layers keep outside them (FP8 weights and scales, int4 packed runs), which `state_dict` leaves out."""
    seen: set[int] = set()

    def visit(value) -> int:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage() if value.device.type != "meta" else None
            if storage is None or storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if isinstance(value, (list, tuple)):
            return sum(map(visit, value))
        if isinstance(value, dict):
            return sum(map(visit, value.values()))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return sum(visit(getattr(value, f.name)) for f in dataclasses.fields(value))
        return 0

    return sum(visit(v) for module in model.modules() for k, v in vars(module).items() if k != "_modules")
