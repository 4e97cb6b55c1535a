"""The KV block pool and per-request block tables, with prefix caching.

Block 0 is the null block: never allocated, padding lanes write into it. A full block is
identified by a chained hash of (parent block's hash, its token ids, and the content hashes
of the images whose placeholder tokens it holds, if any); a cache hit is verified against
that stored key, so a hash collision is a miss, never wrong output. Free blocks sit in one
LRU queue; a cached block stays reusable until it is evicted by an allocation, or until the
weights change (`BlockPool.forget_cached`).
"""
from __future__ import annotations

from collections import OrderedDict

from fullgraph.engine.request import Request


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks   # (parent hash, ids[, images])
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached: dict[int, int] = {}                            # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free)} free")
        ids = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            self._evict(block)
            self.ref_cnt[block] = 1
            ids.append(block)
        return ids

    def touch(self, ids: list[int]) -> None:
        for block in ids:
            if self.ref_cnt[block] == 0:
                del self.free[block]
            self.ref_cnt[block] += 1

    def release(self, ids: list[int]) -> None:
        # Tail blocks first, so they are evicted before the (more shareable) prefix blocks.
        for block in reversed(ids):
            self.ref_cnt[block] -= 1
            if self.ref_cnt[block] == 0:
                self.free[block] = None

    def lookup(self, block_hash: int, key: tuple) -> int | None:
        block = self.cached.get(block_hash)
        if block is None or self.block_key[block] != key:
            return None
        return block

    def cache(self, block: int, block_hash: int, key: tuple) -> None:
        if self.block_hash[block] is not None or block_hash in self.cached:
            return
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        self.block_key[block] = key

    def forget_cached(self) -> None:
        """No block is a prefix-cache hit any more (their contents stay until reused)."""
        for block in list(self.cached.values()):
            self._evict(block)

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = self.block_key[block] = None


class SlotPool:
    """Slots `first` .. `first + num_slots - 1` of per-request state pools, handed out in
    groups of `group` consecutive slots (the first of a group stands for it). A running
    request holds at most one group of each pool; there are as many as `max_num_seqs`, so
    admission never waits for one."""

    def __init__(self, num_slots: int, first: int, group: int = 1) -> None:
        self.num_slots, self.first, self.group = num_slots, first, group
        self._free = list(range(first + num_slots - group, first - 1, -group))

    def group_of(self, slot: int) -> int:
        """The first slot of the group `slot` belongs to."""
        return slot - (slot - self.first) % self.group

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free state slot: more running requests than max_num_seqs")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(self.group_of(slot))


class KVCacheManager:
    """The block pool and prefix cache of the paged KV layers, and the state-slot pool of
    the linear-attention layers (none when `num_state_slots` is 0): what a running request
    holds."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 num_state_slots: int = 0, num_sampling_slots: int = 0,
                 state_slots_per_request: int = 1) -> None:
        self.pool = BlockPool(num_blocks)
        # linear-attention state: slot 0 is the null slot padding lanes use; under speculative
        # decoding a request holds one slot per verified position (layers/gdn/state.py)
        self.state_slots = (SlotPool(num_state_slots, first=1, group=state_slots_per_request)
                            if num_state_slots else None)
        # the sampler's state (penalties ...), for requests that use it (-1: none)
        self.sampling_slots = (SlotPool(num_sampling_slots, first=0) if num_sampling_slots
                               else None)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # (source, destination) blocks and state slots whose contents the device copies
        # before the next step (forks)
        self._block_copies: list[tuple[int, int]] = []
        self._slot_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0          # prompt tokens looked up
        self.prefix_hits = 0             # of which served from the cache

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_blocks - 1

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_key(self, req: Request, i: int) -> tuple:
        """(parent hash, token ids), and the content hashes of the images whose placeholder
        tokens the block holds: identical ids, different pictures, different KV."""
        parent = req.block_hashes[i - 1] if i else None
        start, end = i * self.block_size, (i + 1) * self.block_size
        key = parent, tuple(req.all_token_ids[start:end])
        images = req.mm_inputs.hashes_between(start, end) if req.mm_inputs is not None else ()
        return key + (images,) if images else key     # text blocks: as a text request's

    def _hash_full_blocks(self, req: Request, num_tokens: int) -> None:
        for i in range(len(req.block_hashes), num_tokens // self.block_size):
            req.block_hashes.append(hash(self._block_key(req, i)))

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks that hold a prefix of the request's tokens (at least one token is
        always left to compute, so the step produces logits)."""
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return []     # (prompt logprobs need every prompt position computed, as in vLLM)
        self._hash_full_blocks(req, req.num_tokens)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits = []
        for i in range(max_blocks):
            block = self.pool.lookup(req.block_hashes[i], self._block_key(req, i))
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[int] = ()) -> bool:
        """Give `req` blocks for its computed tokens plus `num_new_tokens`; False if the
        pool cannot (nothing is changed then)."""
        if not computed_blocks and (req.num_computed_tokens + num_new_tokens
                                    <= len(req.block_ids) * self.block_size):
            return True                  # fits the blocks it has (most decode steps)
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = (self.blocks_for(num_computed + num_new_tokens) - len(req.block_ids)
                  - len(computed_blocks))
        reviving = sum(1 for b in computed_blocks if self.pool.ref_cnt[b] == 0)
        if max(needed, 0) + reviving > self.pool.num_free:
            return False
        if self.state_slots is not None and req.state_slot == 0:
            req.state_slot = self.state_slots.take()   # a new (or recomputed) request
        if req.needs_sampling_state and req.sampling_slot < 0:
            req.sampling_slot = self.sampling_slots.take()
        self.pool.touch(list(computed_blocks))
        req.block_ids.extend(computed_blocks)
        if needed > 0:
            req.block_ids.extend(self.pool.allocate(needed))
        return True

    def fork(self, child: Request, parent: Request, num_tokens: int) -> bool:
        """Give `child` the parent's first `num_tokens` computed tokens: their full blocks
        shared, the partial one and the parent's state slot copied (on the device, before
        the next step: `take_copies`). False if the pool has no block for the copy (nothing
        changes then)."""
        full, partial = divmod(num_tokens, self.block_size)
        # the full blocks as a prefix hit's, a new block for the partial one, the slots
        if not self.allocate_slots(child, partial, parent.block_ids[:full]):
            return False
        if partial:
            self._block_copies.append((parent.block_ids[full], child.block_ids[full]))
        if self.state_slots is not None:
            self._slot_copies.append((parent.state_slot, child.state_slot))
        child.num_computed_tokens = num_tokens
        return True

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The block and state-slot copies forks asked for since the last call."""
        out = self._block_copies, self._slot_copies
        self._block_copies, self._slot_copies = [], []
        return out

    def keep_state(self, req: Request, kept: int) -> None:
        """After a step ran `kept` of the request's rows for good (its last token and the
        accepted drafts, or a whole prompt chunk): the slot of its group that holds the state
        after them (layers/gdn/state.py) is the one the next step reads."""
        if self.state_slots is not None and self.state_slots.group > 1 and req.state_slot:
            m = self.state_slots.group
            req.state_slot = self.state_slots.group_of(req.state_slot) + min(kept, m) - 1

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's blocks that are now full, computed and known (a token in
        flight is computed but not known yet)."""
        if not self.enable_prefix_caching:
            return
        num_done = min(req.num_computed_tokens, req.num_tokens)
        num_full = num_done // self.block_size
        if num_full <= req.num_registered_blocks:
            return                       # no block filled up since the last call
        self._hash_full_blocks(req, num_done)
        for i in range(req.num_registered_blocks, num_full):
            self.pool.cache(req.block_ids[i], req.block_hashes[i], self._block_key(req, i))
        req.num_registered_blocks = max(req.num_registered_blocks, num_full)

    def free(self, req: Request) -> None:
        if self._block_copies or self._slot_copies:   # a fork undone before its step ran
            self._block_copies = [c for c in self._block_copies if c[1] not in req.block_ids]
            self._slot_copies = [c for c in self._slot_copies if c[1] != req.state_slot]
        self.pool.release(req.block_ids)
        req.block_ids = []
        req.num_registered_blocks = 0
        if req.state_slot:
            self.state_slots.give_back(req.state_slot)
            req.state_slot = 0
        if req.sampling_slot >= 0:
            self.sampling_slots.give_back(req.sampling_slot)
            req.sampling_slot = -1
