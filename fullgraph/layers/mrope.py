"""Multimodal rotary positions (MRoPE) of Qwen3-VL and Qwen3.5 (transformers'
`Qwen3VLModel.get_rope_index` and `Qwen3VLTextRotaryEmbedding`; Qwen3.5's are the same with a
partial rotary dimension).

Every token has three positions (temporal, height, width). Text tokens have all three equal;
an image's tokens lie on its merged grid, all starting from the position the image starts at,
and the text after it resumes `max(h, w)` positions later, so a prompt with images ends
below its token count: `rope_delta` (zero or negative) continues its positions for the
generated tokens, a token at sequence position p having all three at p + rope_delta.

Each rotary frequency follows one of the three rows: `mrope_section` (t, h, w) counts them,
interleaved (frequency j: height if j % 3 == 1 and j < 3 * h, width if j % 3 == 2 and
j < 3 * w, temporal otherwise), which is what transformers does whatever
`mrope_interleaved` says. So a token's cos/sin row depends on its three positions, not on
one index into a shared table: `MRotaryEmbedding` computes the step's rows, one per token,
from the step's positions on the device, and the layers index them by row number (the
`QKNormRope` interface, whose tables any 1-D index selects). Shapes only depend on the
step's token count, so a captured graph replays it for any positions.

The positions are host work, once per prompt (`mrope_positions`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fullgraph.layers.activation import elementwise


def mrope_section_of(text_config, default: Sequence[int]) -> tuple[int, int, int]:
    """The config's (t, h, w) frequency counts, or the model's default as transformers has
    it (Qwen3-VL [24, 20, 20], Qwen3.5 [11, 11, 10]) when the config names none."""
    for field in ("rope_parameters", "rope_scaling"):
        section = (getattr(text_config, field, None) or {}).get("mrope_section")
        if section is not None:
            break
    else:
        section = default
    if len(section) != 3:
        raise ValueError(f"mrope_section {list(section)} must have 3 entries (t, h, w)")
    return tuple(int(s) for s in section)


def frequency_rows(num_freqs: int, section: Sequence[int]) -> torch.Tensor:
    """Which position row (0 t, 1 h, 2 w) each rotary frequency follows, [num_freqs] int64:
    transformers' `recomposition_frequencies` slices (a section longer than the frequencies
    is clipped, as there)."""
    rows = torch.zeros(num_freqs, dtype=torch.int64)
    for axis in (1, 2):
        rows[axis:3 * section[axis]:3] = axis
    return rows


def mrope_positions(token_ids: Sequence[int] | np.ndarray, image_token_id: int,
                    grids: Sequence[Sequence[int]], merge_size: int) -> tuple[np.ndarray, int]:
    """MRoPE positions [3, len(token_ids)] int64 and the prompt's rope_delta.

    Image i is the next `t * h * w / merge_size**2` image tokens after image i - 1 (a run of
    them, as the chat template's `<|vision_start|>` + placeholders emits); anything else is
    text. transformers finds the same runs from the processor's `mm_token_type_ids`."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n = len(ids)
    out = np.empty((3, n), dtype=np.int64)
    image_rows = np.flatnonzero(ids == image_token_id)
    pos = done = used = 0       # next free position; tokens placed; image tokens placed
    for t, h, w in grids:
        gh, gw = h // merge_size, w // merge_size
        size = t * gh * gw
        if used + size > len(image_rows):
            raise ValueError(f"the prompt has {len(image_rows)} image tokens, fewer than its "
                             f"images' grids need")
        start = int(image_rows[used])
        if image_rows[used + size - 1] != start + size - 1:
            raise ValueError(f"the image at token {start} needs {size} consecutive image "
                             f"tokens (grid {t}x{h}x{w}, merge {merge_size})")
        out[:, done:start] = pos + np.arange(start - done)         # text before it
        pos += start - done
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij"))
        out[:, start:start + size] = pos + grid.reshape(3, -1)
        pos += max(gh, gw)
        done, used = start + size, used + size
    if used != len(image_rows):
        raise ValueError(f"the prompt has {len(image_rows)} image tokens, its images' grids "
                         f"need {used}")
    out[:, done:] = pos + np.arange(n - done)
    delta = int(out.max()) + 1 - n if n else 0
    return out, delta


class MRotaryEmbedding(nn.Module):
    """Per-token cos/sin rows from MRoPE positions, computed on the device each step."""

    def __init__(self, rotary_dim: int, theta: float, section: Sequence[int]) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float)
                                    / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("rows", frequency_rows(rotary_dim // 2, section), persistent=False)

    def forward(self, rope_positions: torch.Tensor, batch_invariant: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """rope_positions [3, T] int64 (any strides) -> (cos, sin), each [T, rotary_dim]
        float32: row i rotates token i. Same float32 products as transformers (position as
        float times inverse frequency), so the same angles. `batch_invariant` (the mode, CPU):
        cos and sin through their scalar formulas, so a row's bits do not depend on T."""
        positions = rope_positions.index_select(0, self.rows).t()     # [T, rotary_dim / 2]
        angles = positions.float() * self.inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return elementwise(torch.cos, emb, batch_invariant), elementwise(torch.sin, emb,
                                                                          batch_invariant)
