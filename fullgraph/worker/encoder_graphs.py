"""Encoder CUDA graphs: a multimodal model's encoder captured once per row budget, and the
images of a call packed into the smallest budget that holds them.

A vision tower's work depends on its images' sizes, so one graph per image shape would never
be reused. Instead each graph is captured for a *budget* of input rows (patches), say
1k-16k for real models: its inputs are persistent buffers of that many rows, the images'
layout (segment ids, positions) lives in persistent buffers too, and the rows no image fills
are padding the encoder keeps away from real rows. A call then packs its images into a few
budgets, rewrites the buffers, replays, and splits the outputs back per image.

Packing (`pack`): images larger than the largest budget run eagerly (counted in
`num_eager_fallbacks`; a warning the first time). The others go first-fit decreasing into
batches of at most the largest budget and `max_items_per_batch` images: largest first, each
into the first batch with room, else a new one. Each batch then replays the smallest budget
that holds it. That keeps replays few (one per largest-budget's worth of images) and the
padding of all but the last batches small. Outputs come back in the callers' order.

The manager knows no model: the encoder implements `models/interface.GraphEncoder`, and the
capture itself is `CUDAGraphManager`'s, so every budget warms up eagerly on buffers of its
own before it is captured on separate ones (the manager's warmup/capture split).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fullgraph.models.interface import GraphEncoder
from fullgraph.worker.cudagraph.manager import CaptureReport, CUDAGraphManager, GraphRuntime

logger = logging.getLogger(__name__)

# Default budgets: the largest holds the largest image, up to this many rows (bigger images
# run eagerly: a graph's dense attention mask grows with the square of its budget, and its
# memory is not yet part of the KV-cache profile); each smaller one halves it, this many in
# all. Raise it with --encoder-cudagraph-token-budgets once measured on the GPU.
DEFAULT_MAX_BUDGET = 4096
DEFAULT_NUM_BUDGETS = 5


@dataclass(frozen=True, slots=True)
class EncoderGraphKey:
    budget: int                 # input rows the graph was captured for


@dataclass(frozen=True, slots=True)
class PackedBatch:
    budget: int
    items: tuple[int, ...]      # indices into the call's items, in packing order
    rows: int                   # rows they fill; the rest of the budget is padding


@dataclass(frozen=True, slots=True)
class PackPlan:
    batches: tuple[PackedBatch, ...]
    eager: tuple[int, ...]      # items larger than every budget


def pack(rows: Sequence[int], budgets: Sequence[int], max_items_per_batch: int) -> PackPlan:
    """First-fit decreasing into batches of at most max(budgets) rows and max_items_per_batch
    items, each batch on the smallest budget that holds it (module docstring)."""
    budgets = sorted(budgets)
    cap = budgets[-1]
    eager = tuple(i for i, n in enumerate(rows) if n > cap)
    open_batches: list[list[int]] = []          # per batch: its items, then its rows in [0]
    for i in sorted((i for i, n in enumerate(rows) if n <= cap), key=lambda i: -rows[i]):
        for batch in open_batches:
            if batch[0] + rows[i] <= cap and len(batch) - 1 < max_items_per_batch:
                batch[0] += rows[i]
                batch.append(i)
                break
        else:
            open_batches.append([rows[i], i])
    batches = tuple(PackedBatch(next(b for b in budgets if b >= used), tuple(items), used)
                    for used, *items in open_batches)
    return PackPlan(batches, eager)


def default_budgets(max_item_rows: int, alignment: int, max_budget: int = DEFAULT_MAX_BUDGET,
                    num_budgets: int = DEFAULT_NUM_BUDGETS) -> tuple[int, ...]:
    """Budgets for items of up to max_item_rows rows: the largest holds one such item (at
    most max_budget rows), the others halve it; all multiples of `alignment`."""
    top = _round_up(min(max_item_rows, max_budget), alignment)
    return tuple(sorted({_round_up(-(-top // 2 ** i), alignment) for i in range(num_budgets)}))


def max_image_rows(model_dir: str, overrides: Iterable[tuple[str, int]] = ()) -> int | None:
    """Patches of the largest image the model directory's preprocessor_config.json lets
    through (its max_pixels, or `overrides`' (mm_processor_kwargs), over the patch area), or
    None without one."""
    from fullgraph.multimodal.processor import image_processor_config
    cfg = image_processor_config(model_dir, overrides)
    return None if cfg is None else cfg.max_pixels // cfg.patch_size ** 2


def graph_encoder_of(model: nn.Module) -> GraphEncoder | None:
    """The model itself if it implements GraphEncoder, else its only submodule that does."""
    if isinstance(model, GraphEncoder):
        return model
    found = [m for m in model.modules() if isinstance(m, GraphEncoder)]
    return found[0] if len(found) == 1 else None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _copy_out(output: Any) -> Any:
    """A replay's outputs live in graph memory that the next replay (of any graph sharing
    the pool) overwrites; callers keep them across steps, so they get copies."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, output)


@dataclass(slots=True)
class _BudgetInputs:
    inputs: torch.Tensor        # [budget, encoder_input_width]
    layout: Any


class EncoderGraphManager:
    def __init__(self, encoder: GraphEncoder, budgets: Sequence[int], max_items_per_batch: int,
                 runtime: GraphRuntime, device: torch.device, dtype: torch.dtype) -> None:
        align = encoder.encoder_row_alignment
        bad = [b for b in budgets if b <= 0 or b % align]
        if not budgets or bad:
            raise ValueError(f"encoder graph budgets must be positive multiples of {align} "
                             f"(the encoder's row alignment), got {list(budgets)}")
        if max_items_per_batch < 1:
            raise ValueError(f"max_items_per_batch must be >= 1, got {max_items_per_batch}")
        self.encoder = encoder
        self.budgets = tuple(sorted(set(budgets)))
        self.max_items_per_batch = max_items_per_batch
        self.device, self.dtype = device, dtype
        self.graphs = CUDAGraphManager(runtime)
        self._inputs: dict[int, _BudgetInputs] = {}     # the captured graphs' buffers
        self.capture_report: CaptureReport | None = None
        self.num_graph_replays = 0
        self.num_eager_fallbacks = 0        # items, not calls

    @torch.inference_mode()
    def capture(self, progress: bool = False) -> CaptureReport:
        """Warm up, then capture, every budget, largest first (smaller ones reuse the pool)."""
        keys = [EncoderGraphKey(b) for b in reversed(self.budgets)]
        logger.info("encoder CUDA graphs: budgets %s rows, up to %d items per replay",
                    list(self.budgets), self.max_items_per_batch)
        _, self.capture_report = self.graphs.capture(keys, self._create_forward_fn, progress)
        return self.capture_report

    def _create_forward_fn(self, key: EncoderGraphKey, warmup: bool):
        """Fresh buffers per call: the warmup's and the graph's are never the same."""
        buffers = _BudgetInputs(
            torch.zeros(key.budget, self.encoder.encoder_input_width, dtype=self.dtype,
                        device=self.device),
            self.encoder.allocate_encoder_layout(key.budget, self.device))
        if not warmup:
            self._inputs[key.budget] = buffers
        return (lambda: self.encoder.forward_packed(buffers.inputs, buffers.layout)), buffers

    @torch.inference_mode()
    def encode(self, inputs: torch.Tensor, items: Sequence[Any]) -> list[Any]:
        """inputs: the items' rows one after another (host or device, any float dtype) ->
        per item its output, in `items`' order."""
        if not self._inputs:
            raise RuntimeError("EncoderGraphManager.encode before capture()")
        rows = [self.encoder.encoder_input_rows(item) for item in items]
        starts = [0, *itertools.accumulate(rows)][:-1]
        if inputs.shape[0] != sum(rows):
            raise ValueError(f"inputs has {inputs.shape[0]} rows, the items need {sum(rows)}")
        plan = pack(rows, self.budgets, self.max_items_per_batch)
        outputs: list[Any] = [None] * len(items)
        for batch in plan.batches:
            buffers = self._inputs[batch.budget]
            buffers.inputs[:batch.rows].copy_(torch.cat(
                [inputs[starts[i]:starts[i] + rows[i]] for i in batch.items]))
            buffers.inputs[batch.rows:].zero_()     # finite padding, the same every time
            packed = [items[i] for i in batch.items]
            self.encoder.write_encoder_layout(buffers.layout, packed)
            output = self.graphs.replay(EncoderGraphKey(batch.budget))
            self.num_graph_replays += 1
            split = self.encoder.split_encoder_output(output, packed)
            for i, out in zip(batch.items, split, strict=True):
                outputs[i] = _copy_out(out)
        if plan.eager:
            if not self.num_eager_fallbacks:
                logger.warning("an encoder input of %d rows exceeds the largest encoder graph "
                               "(%d rows) and runs eagerly (further ones are only counted)",
                               max(rows[i] for i in plan.eager), self.budgets[-1])
            self.num_eager_fallbacks += len(plan.eager)
            eager_inputs = torch.cat([inputs[starts[i]:starts[i] + rows[i]]
                                      for i in plan.eager]).to(self.device, self.dtype)
            split = self.encoder.encode_eager(eager_inputs, [items[i] for i in plan.eager])
            for i, out in zip(plan.eager, split, strict=True):
                outputs[i] = out
        return outputs
