"""The paged KV cache's bookkeeping: which fixed-size block holds which tokens of which sequence.

Blocks live in one pool. A block in use has a reference count (several sequences share a cached
prefix). A full block gets a hash chained from its predecessor's, so equal prefixes hash equally
and a later request can reuse the blocks. A block whose count drops to zero goes to the back of the
free queue *with its hash kept*: it is reused from the cache until the pool hands it out again, taking
blocks from the front, least recently freed first. The scheduler only asks and commits:
`can_allocate()` is paired with `allocate()`, and "no room" is an answer, not an exception.

A hit must be exact, not just hash-equal: hash() of ints is deterministic, so a client could engineer a
collision to read or poison another's KV. An indexed block records its tokens and what its KV was
computed after: for a first block the sequence's cache salt, else the block before it, by id and epoch
(the epoch changes whenever the pool hands a block out again, so a link to old content stops matching).
A lookup walks from the first block and accepts one only if both match, so every hit extends a prefix
already proven equal. A full block that duplicates an indexed one (two requests computed the same
prefix at once) links its successors to that one, which keeps them reachable.

The salt roots the hash chain too: requests with different salts (None: the chain all unsalted requests
share) never share blocks, so a cached-token count tells nobody whether another client sent a prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llmctl.runtime.sequence import Sequence


def block_hash(parent: int | str | None, tokens: tuple[int, ...]) -> int:
    """A full block's key in the cache index: chained from its parent's key, or from the salt for a first block."""
    return hash((parent, tokens))


Link = tuple[int, int]  # (block id, epoch): one block's content, which a later epoch no longer is


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # its key in the cache index, while it is indexed
    tokens: tuple[int, ...] = ()  # what a hit checks, with parent
    parent: Link | str | None = None  # what its KV follows: the block before, or the salt for a first block
    epoch: int = 0  # bumped whenever the pool hands the block out again
    copy_of: Link | None = None  # the indexed block it duplicates, which its successors link to


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_hits = 0  # tokens served from the cache, for metrics
        self.prefix_queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks that hold seq's leading full blocks; never all of its tokens,
        so that at least one token is computed and yields logits. A request for prompt logprobs reads
        none: every prompt token's logits must be computed."""
        if not self.enable_prefix_caching or seq.block_table or seq.sampling_params.prompt_logprobs is not None:
            return []
        hits: list[int] = []
        key, parent = seq.cache_salt, seq.cache_salt
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = block_hash(key, tokens)
            block_id = self.cached.get(key)
            if block_id is None or not self._holds(block_id, parent, tokens):
                break
            hits.append(block_id)
            parent = self._link(block_id)
        return hits

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Index each block of seq that is now full of computed tokens whose values are known (a pending
        token's block waits for a later call), unless an equal block is indexed already."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt, tokens)
            seq.block_hashes.append(h)
            parent = self._link(seq.block_table[i - 1]) if i else seq.cache_salt
            block, holder = self.blocks[seq.block_table[i]], self.cached.get(h)
            if holder is not None and self._holds(holder, parent, tokens):
                block.copy_of = self._link(holder)
                continue
            if holder is not None:  # a collision, or a block whose parent was handed out again: unreachable
                self.blocks[holder].hash = None
            block.hash, block.tokens, block.parent = h, tokens, parent
            self.cached[h] = block.block_id

    def _link(self, block_id: int) -> Link:
        block = self.blocks[block_id]
        return block.copy_of or (block_id, block.epoch)

    def _holds(self, block_id: int, parent: Link | str | None, tokens: tuple[int, ...]) -> bool:
        block = self.blocks[block_id]
        return block.tokens == tokens and block.parent == parent

    # -- allocation ---------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether seq can get blocks for num_new_tokens more computed tokens (after its cached prefix)."""
        if seq.block_table:  # the common case, every decode step: no prefix lookup
            need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
            return need <= self.num_free_blocks
        prefix = self.cached_prefix(seq)
        computed = len(prefix) * self.block_size if prefix else seq.num_computed_tokens
        have = len(prefix) if prefix else len(seq.block_table)
        need = self.blocks_needed(computed + num_new_tokens) - have
        # A cached block with no users sits in the free queue: reusing it takes it from there.
        idle_hits = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        return need + idle_hits <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        if not seq.block_table:
            prefix = self.cached_prefix(seq)
            for block_id in prefix:
                self._take(block_id)
            seq.block_table = list(prefix)
            seq.block_hashes = [self.blocks[b].hash for b in prefix]
            seq.num_computed_tokens = len(prefix) * self.block_size
            seq.num_cached_tokens = seq.num_computed_tokens
            if self.enable_prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += seq.num_cached_tokens
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"allocate() without can_allocate(): need {need} blocks, {self.num_free_blocks} free")
        for _ in range(need):
            block_id, _ = self.free_queue.popitem(last=False)
            self._evict(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, tail first, so that shared prefixes stay cached longest."""
        for block_id in reversed(seq.block_table[seq.num_released_blocks :]):
            self._release(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_released_blocks = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Hand back seq's trailing blocks past what num_tokens need (the rejected drafts of a speculative
        step). Those blocks hold no computed token, so none of them is indexed."""
        keep = max(self.blocks_needed(num_tokens), seq.num_released_blocks)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def release_before(self, seq: Sequence, position: int) -> None:
        """Hand back seq's leading blocks that hold only positions before `position`: a sliding-window model's
        queries never look that far back again. Their entries stay in the block table (nothing reads them);
        with prefix caching, a block stays until its successor is indexed, which links to it."""
        keep_from = min(max(position, 0) // self.block_size, len(seq.block_table))
        if self.enable_prefix_caching:
            keep_from = min(keep_from, len(seq.block_hashes) - 1)
        while seq.num_released_blocks < keep_from:
            self._release(seq.block_table[seq.num_released_blocks])
            seq.num_released_blocks += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free_queue.pop(block_id, None)
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None:
            del self.cached[block.hash]
        block.hash, block.tokens, block.parent, block.copy_of = None, (), None, None
        block.epoch += 1
