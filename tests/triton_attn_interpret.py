"""The triton attention backend's tiled path (attention/triton_attn.py: steps with prompt
chunks through attention/paged_invariant.py's kernel at prefill tiles) on steps of
tests/test_attention.py, against its dense reference: prefills beside decodes, a shared
prefix, padding tokens. The path is CUDA's; run as a script under Triton's CPU interpreter
(tests/triton_interpret.py, by test_triton_attn_interpret.py) it is switched on for CPU
tensors. Prints "FAILURES n"."""
from __future__ import annotations

import torch

import test_attention as ta
from fullgraph.attention.triton_attn import TiledMetadata, TritonAttentionBackend

ta.D = 16                  # tl.dot's smallest K

CASES = [([9, 17, 5, 30], [9, 4, 1, 13], 0, 0), ([20, 22, 7], [20, 2, 7], 4, 5),
         ([40, 3], [40, 3], 0, 2), ([9, 17, 3], [1, 1, 1], 0, 3)]


def case(seq_lens, q_lens, shared, pad) -> list[str]:
    s, inputs, persistent, bt, pos, req = ta.make_step(seq_lens, q_lens, shared, pad,
                                                       max_tokens=128)
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, ta.NB * ta.BS, ta.HKV, ta.D, generator=g)
    t = inputs.num_tokens_padded
    q, k, v = (torch.randn(t, h, ta.D, generator=g) for h in (ta.HQ, ta.HKV, ta.HKV))
    backend = TritonAttentionBackend(s, torch.device("cpu"), persistent)
    backend.tiled = True                  # the CUDA path, here under the interpreter
    backend.prepare(inputs)
    meta = backend.build(inputs)
    backend.update(meta, inputs)
    cache[0].index_copy_(0, inputs.slot_mapping, k)
    cache[1].index_copy_(0, inputs.slot_mapping, v)
    out = backend.forward(q, (cache[0], cache[1]), meta)[:inputs.num_tokens]
    name = f"{seq_lens} x {q_lens}"
    decode = all(n == 1 for n in q_lens)
    if isinstance(meta, TiledMetadata) == decode:
        return [f"{name}: {'tiled' if decode else 'not tiled'}"]
    ref = ta.dense_reference(q[:inputs.num_tokens], cache, bt, pos, req, s.scale)
    if not torch.allclose(out, ref, atol=1e-4, rtol=1e-4):
        return [f"{name}: far from the dense reference"]
    return []


if __name__ == "__main__":
    failures = [f for c in CASES for f in case(*c)]
    for f in failures:
        print("FAILED", f)
    print("FAILURES", len(failures))
