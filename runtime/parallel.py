"""Tensor parallelism: one model's layers split over N processes (one per GPU; gloo on CPU), Megatron-style.

Rank r holds, of every decoder layer, the query heads [r H/N, (r+1) H/N) and their KV heads (a KV head is
replicated over the ranks of its group when there are fewer KV heads than ranks), and the MLP columns
[r I/N, (r+1) I/N): q/k/v and gate/up are split by output rows (column-parallel), o_proj and down_proj by
input columns (row-parallel), and the partial sums of each row-parallel output are all-reduced, once after
attention and once after the MLP; a mixture of experts splits every expert so (the router is replicated, so
every rank routes each token alike), and its weighted sum is all-reduced once. The KV cache is split with the heads. A row-parallel bias is added by
rank 0 alone. The embedding and the LM head are split by vocabulary (layers/vocab_parallel.py: rank 0 sends
the rows whose logits it needs, and every rank computes its slice of them); norms are replicated. Each rank reads
only its slices from the checkpoint, quantized weights with their scales (parallel_shard.py).

The engine (scheduler, block manager, sampling) lives in rank 0's process. Each step rank 0 broadcasts the
batch's inputs (`StepInputs.send`) and every rank runs the same forward pass; the workers (`worker_main`)
loop receiving steps until a stop. With CUDA graphs (`graphs_wanted`, off until measured on several GPUs)
every rank captures the same graphs, and rank 0 broadcasts the buffers it staged before all replay. A worker that dies takes rank 0 down (`Watchdog`): a collective with a
dead peer would otherwise hang.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("llmctl.engine")
STOP, FORWARD, LOGITS, GRAPH = 0, 1, 2, 3
# kind, then FORWARD: num_tokens, num_seqs, table width, max_query_len, max_seq_len, num_decodes, 0;
# LOGITS: rows; GRAPH: batch size, which graphs (0 decode, 1 verification)
HEADER = 8
TP_GRAPHS_ENV = "LLMCTL_TP_CUDA_GRAPHS"  # 1: capture CUDA graphs under tensor parallelism (see graphs_wanted)


@dataclasses.dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count) this rank holds."""
        if num_kv_heads >= self.size:
            per = num_kv_heads // self.size
            return self.rank * per, per
        return self.rank // (self.size // num_kv_heads), 1


def check_divisible(num_heads: int, num_kv_heads: int, intermediate: int, size: int,
                    expert_intermediate: int | None = None) -> None:
    """The shapes a tensor-parallel size must divide; ValueError naming the one that does not."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    sizes = [("attention heads", num_heads), ("intermediate size", intermediate)]
    if expert_intermediate is not None:
        sizes.append(("experts' intermediate size", expert_intermediate))
    for name, value in sizes:
        if value % size:
            raise ValueError(f"tensor_parallel_size {size} must divide the model's {name} ({value})")
    if num_kv_heads % size and size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} and the model's {num_kv_heads} KV heads must divide one "
                         "another (KV heads are split, or replicated when fewer)")


def shard_args(args, tp: TPGroup):
    """One rank's ModelArgs: its heads, KV heads and MLP columns (each expert's too)."""
    moe = bool(args.sparse_layers)
    check_divisible(args.num_heads, args.num_kv_heads, args.intermediate_size, tp.size,
                    args.moe_intermediate_size if moe else None)
    return dataclasses.replace(args, num_heads=args.num_heads // tp.size,
                               num_kv_heads=tp.kv_heads(args.num_kv_heads)[1],
                               intermediate_size=args.intermediate_size // tp.size,
                               moe_intermediate_size=args.moe_intermediate_size // tp.size if moe
                               else args.moe_intermediate_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, port: int, device: torch.device) -> TPGroup:
    """Join the ranks' process group: NCCL between GPUs (NVLink multicast off), gloo on CPUs."""
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(rank)
    else:  # the ranks share the CPU's cores: each taking all of them would oversubscribe it N times
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=size)
    return TPGroup(rank, size)


@dataclasses.dataclass
class StepInputs:
    """One forward pass's inputs, as every rank needs them."""

    ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_decodes: int

    def send(self) -> None:
        """Rank 0: the header, then each tensor (the workers allocate from the header)."""
        header = torch.tensor([FORWARD, len(self.ids), len(self.seq_lens), self.block_tables.shape[1],
                               self.max_query_len, self.max_seq_len, self.num_decodes, 0], dtype=torch.int64)
        dist.broadcast(header.to(self.ids.device), 0)
        for t in self._tensors():
            dist.broadcast(t, 0)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.ids, self.positions, self.slot_mapping, self.query_start_loc, self.seq_lens, self.block_tables]

    @classmethod
    def receive(cls, header: torch.Tensor, device: torch.device) -> StepInputs:
        _, tokens, seqs, width, max_q, max_s, decodes, _ = header.tolist()
        shapes = [((tokens,), torch.int64), ((tokens,), torch.int64), ((tokens,), torch.int64),
                  ((seqs + 1,), torch.int32), ((seqs,), torch.int32), ((seqs, width), torch.int32)]
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
        for t in tensors:
            dist.broadcast(t, 0)
        return cls(*tensors, max_query_len=max_q, max_seq_len=max_s, num_decodes=decodes)


def receive_header(device: torch.device) -> torch.Tensor:
    header = torch.zeros(HEADER, dtype=torch.int64, device=device)
    dist.broadcast(header, 0)
    return header


def send_logits_rows(rows: torch.Tensor) -> None:
    """Rank 0: the workers are to compute their slice of these rows' logits (of the last forward pass)."""
    header = torch.zeros(HEADER, dtype=torch.int64, device=rows.device)
    header[0], header[1] = LOGITS, rows.numel()
    dist.broadcast(header, 0)
    dist.broadcast(rows.to(torch.int64).contiguous(), 0)


def receive_logits_rows(header: torch.Tensor, device: torch.device) -> torch.Tensor:
    rows = torch.empty(int(header[1]), dtype=torch.int64, device=device)
    dist.broadcast(rows, 0)
    return rows


def graphs_wanted() -> bool:
    """Whether ranks capture CUDA graphs (their all-reduces and the head's gather captured inside): off until
    a multi-GPU run has measured them (gpu.sh tp runs both ways); every rank reads the same environment."""
    return os.environ.get(TP_GRAPHS_ENV, "0") == "1"


def send_graph_step(which: int, size: int, buffers: list[torch.Tensor]) -> None:
    """Rank 0: replay graph `size` of `which` (0 decode, 1 verification) on these inputs, as staged here."""
    header = torch.zeros(HEADER, dtype=torch.int64, device=buffers[0].device)
    header[0], header[1], header[2] = GRAPH, size, which
    dist.broadcast(header, 0)
    for t in buffers:
        dist.broadcast(t, 0)


def receive_graph_step(buffers: list[torch.Tensor]) -> None:
    """A worker: rank 0's staged inputs, into this rank's own graph buffers."""
    for t in buffers:
        dist.broadcast(t, 0)


def send_stop(device: torch.device) -> None:
    dist.broadcast(torch.zeros(HEADER, dtype=torch.int64, device=device), 0)


def share_num_blocks(num_blocks: int, device: torch.device) -> int:
    """The KV blocks every rank can hold (each rank offers what its memory allows; all take the least)."""
    t = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class Watchdog(threading.Thread):
    """Rank 0's guard: when a worker process ends before the engine stops it, log it and exit non-zero at
    once, from any thread (the engine may be blocked in a collective that will never complete)."""

    def __init__(self, processes) -> None:
        super().__init__(name="tp-watchdog", daemon=True)
        self.processes = processes
        self.stopping = threading.Event()

    def run(self) -> None:
        from multiprocessing.connection import wait

        sentinels = {p.sentinel: p for p in self.processes}
        while sentinels and not self.stopping.is_set():
            for ready in wait(list(sentinels), timeout=0.5):
                p = sentinels.pop(ready)
                if not self.stopping.is_set():
                    log.critical("tensor-parallel worker %s exited with code %s; stopping", p.name, p.exitcode)
                    os._exit(1)


class Workers:
    """Rank 0's handle on ranks 1 .. N-1: spawns them, joins their group, and stops them."""

    def __init__(self, config, device: torch.device) -> None:
        import atexit

        import torch.multiprocessing as mp

        size = config.tensor_parallel_size
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs, {torch.cuda.device_count()} visible")
        port = free_port()
        context = mp.get_context("spawn")
        self.processes = [context.Process(target=worker_main, args=(config, rank, port), name=f"tp-rank-{rank}",
                                          daemon=True) for rank in range(1, size)]
        for p in self.processes:
            p.start()
        self.watchdog = Watchdog(self.processes)
        self.watchdog.start()
        self.group = init_group(0, size, port, device)
        self.device = torch.device("cuda", 0) if device.type == "cuda" else device
        atexit.register(self.close)

    def close(self) -> None:
        """Tell the workers to stop, and wait for them (end them, if one has died: the group is broken)."""
        if self.watchdog.stopping.is_set():
            return
        self.watchdog.stopping.set()
        if any(p.exitcode is not None for p in self.processes):
            return self.abort()
        send_stop(self.device)
        for p in self.processes:
            p.join(timeout=30)
        dist.destroy_process_group()

    def abort(self) -> None:
        """Rank 0 failed to start: end the workers, whatever they are waiting for."""
        self.watchdog.stopping.set()
        for p in self.processes:
            p.kill()
            p.join(timeout=30)
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_main(config, rank: int, port: int) -> None:
    """A spawned rank: its slice of the model and KV cache, then every forward pass rank 0 sends."""
    from llmctl.runtime.model_runner import ModelRunner

    device = torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
    group = init_group(rank, config.tensor_parallel_size, port, device)
    runner = ModelRunner(config, group)
    runner.serve_steps()
    dist.destroy_process_group()
