"""The vision tower of Qwen3-VL and Qwen3.5 (transformers' `Qwen3VLVisionModel`,
`Qwen3_5VisionModel`; the MoE variants use the same towers).

Read it as a reference, like models/qwen3_next.py. The input is the image processor's packed
patches (multimodal/image_processor.py): every image's patches one after another, each
merge_size x merge_size block of neighbouring patches contiguous. The tower
- embeds each patch (a Conv3d whose kernel is its stride covers exactly one patch, so it is a
  matmul over the flattened patch: one Linear here);
- adds a learned position table (a square grid) resampled bilinearly, corners aligned, to each
  image's own patch grid;
- runs ViT blocks (pre-LayerNorm, full bidirectional attention with 2D rotary: half of each
  head's rotary frequencies follow the patch row, half its column) whose attention stays
  within one image frame;
- merges each block of merge_size**2 patches into one token of the text model's width.
Qwen3-VL also returns "deepstack" features: after the blocks named by the config's
`deepstack_visual_indexes`, a merger of their own turns the hidden states into text-width
tokens, which the text model adds to its first layers' hidden states at the image tokens.
Qwen3.5's tower has no deepstack (the config has no such field) and returns an empty list.

Everything the tower needs to know about the images' layout comes from grid_thw alone and is
computed on the host (`vision_positions`): segment bounds, rotary positions, interpolation taps.
No device value is read back, so one forward launches without a host sync.

Two forwards share every layer. `forward(pixel_values, grid_thw)` attends per frame in a
Python loop over host-known bounds: fine eagerly, but a CUDA graph would replay the loop of
the images it was captured with. `forward_packed(pixel_values, layout)` is the graph form
(worker/encoder_graphs.py captures it per patch budget): its ops depend only on the budget
and on the *contents* of a `PackedLayout`, persistent buffers the host rewrites before each
replay; attention is one call over all rows with a block-diagonal mask built from segment
ids, and padding rows form a segment of their own, so they never reach a real row.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fullgraph.layers.linear import Linear
from fullgraph.models.loader import load_weights_by_name

# Where checkpoints keep the tower: `model.visual.` for Qwen3-VL and Qwen3.5 (transformers'
# layout since 4.52), `visual.` in older Qwen2-VL-era checkpoints. Stripped in one place.
VISUAL_PREFIXES = ("model.visual.", "visual.")

GridTHW = Sequence[Sequence[int]] | torch.Tensor
# What attention keeps apart: host segment bounds (one SDPA call per frame, eager only), or a
# boolean [N, N] mask on the device (one call, the graph form).
Segments = tuple[int, ...] | torch.Tensor


def visual_weight_name(name: str) -> str | None:
    """A checkpoint name within the tower, or None for the rest of the model's tensors."""
    for prefix in VISUAL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


@dataclass(frozen=True)
class VisionPositions:
    """The images' layout as the tower reads it, one row per patch in packed order."""
    cu_seqlens: tuple[int, ...]     # attention segment bounds, one segment per frame
    rotary_ids: torch.Tensor        # [N, 2] int64: the patch's row and column in its frame
    interp_index: torch.Tensor      # [N, 4] int64: bilinear taps into the position table
    interp_weight: torch.Tensor     # [N, 4] float32: their weights

    def to(self, device: torch.device) -> VisionPositions:
        return VisionPositions(self.cu_seqlens, self.rotary_ids.to(device, non_blocking=True),
                               self.interp_index.to(device, non_blocking=True),
                               self.interp_weight.to(device, non_blocking=True))


# Padding rows' segment: no frame has this id (frames count up from 0), so padding attends
# only to padding and every real row's softmax ignores it.
PADDING_SEGMENT = -1


@dataclass(frozen=True)
class PackedLayout:
    """`VisionPositions` as persistent device buffers of a fixed number of rows (a graph's
    patch budget): the tensors never change, only their contents (`write_packed_layout`).
    Rows past the packed images are padding: segment `PADDING_SEGMENT`, position 0, zero
    interpolation weights."""
    segment_ids: torch.Tensor       # [B] int64: the frame a row belongs to
    rotary_ids: torch.Tensor        # [B, 2] int64
    interp_index: torch.Tensor      # [B, 4] int64
    interp_weight: torch.Tensor     # [B, 4] float32

    @staticmethod
    def allocate(rows: int, device: torch.device) -> PackedLayout:
        """All rows padding, so a warmup or capture on a fresh layout is a valid forward."""
        return PackedLayout(
            torch.full((rows,), PADDING_SEGMENT, dtype=torch.int64, device=device),
            torch.zeros(rows, 2, dtype=torch.int64, device=device),
            torch.zeros(rows, 4, dtype=torch.int64, device=device),
            torch.zeros(rows, 4, dtype=torch.float32, device=device))

    @property
    def rows(self) -> int:
        return self.segment_ids.shape[0]


def write_packed_layout(layout: PackedLayout, pos: VisionPositions) -> None:
    """Host layout -> the persistent buffers (host->device copies, no device reads); the rows
    after the images become padding."""
    n = pos.cu_seqlens[-1]
    if n > layout.rows:
        raise ValueError(f"{n} patches do not fit a packed layout of {layout.rows} rows")
    bounds = torch.tensor(pos.cu_seqlens)
    segments = torch.full((layout.rows,), PADDING_SEGMENT, dtype=torch.int64)
    segments[:n] = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff())
    layout.segment_ids.copy_(segments)
    for buf, src in ((layout.rotary_ids, pos.rotary_ids), (layout.interp_index, pos.interp_index),
                     (layout.interp_weight, pos.interp_weight)):
        padded = torch.zeros(buf.shape, dtype=buf.dtype)
        padded[:n] = src
        buf.copy_(padded)


def host_grids(grid_thw: GridTHW, merge_size: int) -> list[tuple[int, int, int]]:
    """grid_thw as host integers. A device tensor is refused: reading it would sync."""
    if isinstance(grid_thw, torch.Tensor):
        if grid_thw.device.type != "cpu":
            raise ValueError("grid_thw must be host data (a CPU tensor or a list), not a "
                             f"{grid_thw.device.type} tensor: reading it would sync the device")
        grid_thw = grid_thw.tolist()
    grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw]
    for t, h, w in grids:
        if min(t, h, w) <= 0 or h % merge_size or w % merge_size:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not a positive grid of whole "
                             f"{merge_size}x{merge_size} merge blocks")
    return grids


def _merge_block_order(a: torch.Tensor, m: int) -> torch.Tensor:
    """[h, w] -> [h*w] in the patches' packed order: merge blocks row-major, then within."""
    h, w = a.shape
    return a.reshape(h // m, m, w // m, m).transpose(1, 2).reshape(-1)


def _bilinear_taps(coord: torch.Tensor, size: int, side: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps and weights along one axis: `size` patches spread over `side` table rows with
    the corners aligned (transformers' closed form of F.interpolate(align_corners=True))."""
    src = coord.float() * (side - 1) / max(size - 1, 1)
    lo = src.floor()
    w_lo = 1 - (src - lo)
    taps = torch.stack((lo.long(), (lo.long() + 1).clamp(max=side - 1)), dim=-1)
    return taps, torch.stack((w_lo, 1 - w_lo), dim=-1)


def vision_positions(grids: list[tuple[int, int, int]], merge_size: int,
                     num_grid_per_side: int) -> VisionPositions:
    """Host work from the grids alone; frames of one clip share positions."""
    side, m = num_grid_per_side, merge_size
    # empty first entries: no grids (a layout of padding only) concatenates too
    rotary = [torch.zeros(0, 2, dtype=torch.int64)]
    index = [torch.zeros(0, 4, dtype=torch.int64)]
    weight, bounds = [torch.zeros(0, 4)], [0]
    for t, h, w in grids:
        rows = _merge_block_order(torch.arange(h)[:, None].expand(h, w), m)
        cols = _merge_block_order(torch.arange(w)[None, :].expand(h, w), m)
        row_taps, row_w = _bilinear_taps(rows, h, side)
        col_taps, col_w = _bilinear_taps(cols, w, side)
        rotary.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
        # separable 2D taps: (top, left), (top, right), (bottom, left), (bottom, right)
        taps = row_taps[:, :, None] * side + col_taps[:, None, :]
        index.append(taps.reshape(-1, 4).repeat(t, 1))
        weight.append((row_w[:, :, None] * col_w[:, None, :]).reshape(-1, 4).repeat(t, 1))
        start = bounds[-1]
        bounds.extend(start + h * w * (i + 1) for i in range(t))    # a segment per frame
    return VisionPositions(tuple(bounds), torch.cat(rotary), torch.cat(index), torch.cat(weight))


def _activation(name: str):
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"vision_config's hidden_act {name!r} is not supported "
                     f"(gelu_pytorch_tanh, gelu, silu)")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary in float32, cast back (as transformers' apply_rotary_pos_emb_vision)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: Segments) -> torch.Tensor:
        """Attention within each frame. Host bounds: one SDPA call per frame, a loop a graph
        would freeze. A device mask [N, N] (True where both rows are in the same segment):
        one call over every row, whose launches depend on N alone; the 4D layout lets CUDA
        pick a fused kernel that takes a mask (3D inputs go to the math kernel)."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (a.transpose(0, 1) for a in (q, k, v))           # [heads, N, head_dim]
        scale = self.head_dim ** -0.5
        if isinstance(segments, torch.Tensor):
            out = F.scaled_dot_product_attention(q[None], k[None], v[None],
                                                 attn_mask=segments[None, None], scale=scale)[0]
        else:
            out = torch.cat([F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e],
                                                            scale=scale)
                             for s, e in zip(segments[:-1], segments[1:])], dim=1)
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.linear_fc1 = Linear(dim, hidden, bias=True)
        self.linear_fc2 = Linear(hidden, dim, bias=True)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """merge_size**2 neighbouring patches (contiguous rows) -> one text-width token. The main
    merger normalizes each patch before concatenating; deepstack mergers ("postshuffle")
    normalize the concatenation."""

    def __init__(self, cfg, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged_size = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_size if postshuffle_norm else cfg.hidden_size,
                                 eps=1e-6)
        self.linear_fc1 = Linear(self.merged_size, self.merged_size, bias=True)
        self.linear_fc2 = Linear(self.merged_size, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.proj = Linear(self.patch_dim, cfg.hidden_size, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


def check_vision_config(cfg) -> None:
    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "axial")
    if rope_type != "axial":
        raise ValueError(f"vision_config's rope_type {rope_type!r} is not supported (axial)")
    side = int(cfg.num_position_embeddings ** 0.5)
    if side * side != cfg.num_position_embeddings:
        raise ValueError(f"vision_config's num_position_embeddings {cfg.num_position_embeddings} "
                         f"is not a square grid")
    if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
        raise ValueError("vision_config's head size (hidden_size / num_heads) must be a "
                         "multiple of 4 (2D rotary)")
    deepstack = getattr(cfg, "deepstack_visual_indexes", None) or ()
    bad = [i for i in deepstack if not 0 <= i < cfg.depth]
    if bad:
        raise ValueError(f"vision_config's deepstack_visual_indexes {bad} are outside its "
                         f"{cfg.depth} blocks")
    _activation(cfg.hidden_act)


class Qwen3VLVisionTower(nn.Module):
    """Takes a transformers vision config (or the whole model config, whose vision_config it
    reads). Parameter names are the checkpoint's, minus VISUAL_PREFIXES."""

    def __init__(self, cfg) -> None:
        super().__init__()
        cfg = getattr(cfg, "vision_config", cfg)
        check_vision_config(cfg)
        self.config = cfg
        self.merge_size = cfg.spatial_merge_size
        self.num_grid_per_side = int(cfg.num_position_embeddings ** 0.5)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_layers = tuple(getattr(cfg, "deepstack_visual_indexes", None) or ())
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, postshuffle_norm=True) for _ in self.deepstack_layers)
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        quarter = cfg.hidden_size // cfg.num_heads // 4       # frequencies per axis
        inv_freq = 1.0 / (theta ** (torch.arange(quarter, dtype=torch.float) / quarter))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def positions(self, grid_thw: GridTHW) -> VisionPositions:
        return vision_positions(host_grids(grid_thw, self.merge_size), self.merge_size,
                                self.num_grid_per_side)

    def forward(self, pixel_values: torch.Tensor, grid_thw: GridTHW
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [sum t*h*w, C*T*P*P], grid_thw [num_images, 3] on the host ->
        (image_embeds [sum t*h*w / merge_size**2, out_hidden_size], one tensor of the same
        shape per deepstack layer)."""
        positions = self.positions(grid_thw)
        expected = (positions.cu_seqlens[-1], self.patch_embed.patch_dim)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, grid_thw "
                             f"needs {expected}")
        return self.encode(pixel_values, positions.to(pixel_values.device))

    def encode(self, pixel_values: torch.Tensor, pos: VisionPositions
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, cos, sin = self._embed(pixel_values, pos.rotary_ids, pos.interp_index,
                                  pos.interp_weight)
        return self._blocks(x, cos, sin, pos.cu_seqlens)

    def forward_packed(self, pixel_values: torch.Tensor, layout: PackedLayout
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The graph form: pixel_values [B, C*T*P*P] and a `PackedLayout` of B rows ->
        (embeds [B / merge_size**2, out_hidden_size], deepstack [num_deepstack, same] or
        None). Shapes depend on B alone, values on the buffers' contents alone; the rows of
        the packed images equal `forward`'s, the padding rows' outputs are garbage."""
        x, cos, sin = self._embed(pixel_values, layout.rotary_ids, layout.interp_index,
                                  layout.interp_weight)
        seg = layout.segment_ids
        embeds, deepstack = self._blocks(x, cos, sin, seg[:, None] == seg[None, :])
        return embeds, (torch.stack(deepstack) if deepstack else None)

    def _embed(self, pixel_values: torch.Tensor, rotary_ids: torch.Tensor,
               interp_index: torch.Tensor, interp_weight: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch embeddings plus the resampled position table, and the rotary cos/sin."""
        x = self.patch_embed(pixel_values)
        table = self.pos_embed(interp_index) * interp_weight[:, :, None]
        x = x + table.sum(1).to(x.dtype)
        # angles [N, head_dim]: row frequencies, column frequencies, and the same again
        # for the rotate-half pairs
        freqs = (rotary_ids[:, :, None].float() * self.inv_freq).flatten(1)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return x, angles.cos(), angles.sin()

    def _blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: Segments) -> tuple[torch.Tensor, list[torch.Tensor]]:
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            if i in self.deepstack_layers:
                merger = self.deepstack_merger_list[self.deepstack_layers.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack

    # ------------------------------------------- encoder graphs (models/interface.GraphEncoder)
    # An item is an image's (t, h, w) grid; its rows are its t*h*w patches.
    @property
    def encoder_input_width(self) -> int:
        return self.patch_embed.patch_dim

    @property
    def encoder_row_alignment(self) -> int:
        """Images are whole merge blocks, and so must padding be: the merger folds every
        merge_size**2 consecutive rows into one token."""
        return self.merge_size ** 2

    def encoder_input_rows(self, item: Sequence[int]) -> int:
        t, h, w = item
        return t * h * w

    def allocate_encoder_layout(self, budget: int, device: torch.device) -> PackedLayout:
        return PackedLayout.allocate(budget, device)

    def write_encoder_layout(self, layout: PackedLayout, items: Sequence[Sequence[int]]
                             ) -> None:
        write_packed_layout(layout, self.positions(items))

    def split_encoder_output(self, output: tuple[torch.Tensor, torch.Tensor | None],
                             items: Sequence[Sequence[int]]
                             ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per image (embeds [n_i, hidden], deepstack [num_deepstack, n_i, hidden] or None),
        views of the packed output (the manager copies them out of graph memory)."""
        embeds, deepstack = output
        sizes = [self.encoder_input_rows(g) // self.merge_size ** 2 for g in items]
        rest = embeds.shape[0] - sum(sizes)          # the padding tokens
        per_image = embeds.split(sizes + [rest])[:len(items)]
        if deepstack is None:
            return [(e, None) for e in per_image]
        return list(zip(per_image, deepstack.split(sizes + [rest], dim=1)[:len(items)]))

    def encode_eager(self, pixel_values: torch.Tensor, items: Sequence[Sequence[int]]
                     ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per-frame attention over exactly these images, no padding: for images larger than
        every captured budget."""
        embeds, deepstack = self(pixel_values, items)
        return self.split_encoder_output(
            (embeds, torch.stack(deepstack) if deepstack else None), items)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes the whole checkpoint's tensors; only the tower's are read."""
        load_weights_by_name(self, self._route(weights), stacked_params={})

    @staticmethod
    def _route(weights: Iterable[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            local = visual_weight_name(name)
            if local is None:
                continue
            if local == "patch_embed.proj.weight" and tensor.dim() == 5:
                tensor = tensor.reshape(tensor.shape[0], -1)    # Conv3d [out, C, T, P, P]
            yield local, tensor
