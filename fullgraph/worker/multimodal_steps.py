"""The model runner's multimodal side (docs/vision.md): every step's rotary positions (MRoPE
rows, in a persistent buffer graphs read), the images' encoder outputs per request until all
of its image tokens are computed, the encoder's CUDA graphs, and a step's image rows (eager
steps only: their embeddings replace the token ones).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from fullgraph.buffers import CpuGpuBuffer
from fullgraph.config import EngineConfig
from fullgraph.multimodal.inputs import MultiModalStepInputs
from fullgraph.worker.cudagraph.manager import GraphRuntime
from fullgraph.worker.encoder_graphs import (EncoderGraphManager, default_budgets,
                                             graph_encoder_of, max_image_rows)
from fullgraph.worker.inputs import ScheduledChunk


class MultimodalSteps:
    def __init__(self, model: torch.nn.Module, config: EngineConfig, device: torch.device,
                 max_num_tokens: int) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.rope_positions = CpuGpuBuffer((max_num_tokens, 3), torch.int64, device,
                                           device.type == "cuda")
        self._encoder_cache: dict[int, tuple[Any, list]] = {}
        self.step_images: tuple | None = None              # this step's (eager) image rows
        self.encoder_graphs: EncoderGraphManager | None = None

    def capture_encoder_graphs(self, runtime: GraphRuntime) -> None:
        """The model's encoder per patch budget, in the text graphs' runtime (and memory
        pool); none if the model exposes no GraphEncoder or no budget is known, or in the
        batch-invariant mode."""
        if self.config.kernel_policy.batch_invariant:
            # a request's images always through the eager tower, alone: their encoding then
            # depends on them only, graphs or not (the packed budgets round otherwise)
            return
        encoder = graph_encoder_of(self.model)
        comp = self.config.compilation
        budgets = comp.encoder_cudagraph_token_budgets or None
        max_images = comp.encoder_cudagraph_max_images_per_batch
        if encoder is not None and budgets is None:
            model = self.config.model
            largest = max_image_rows(model.path, model.mm_processor_kwargs)
            budgets = (default_budgets(largest, encoder.encoder_row_alignment)
                       if largest else None)
        if encoder is None or not budgets:
            return
        manager = EncoderGraphManager(encoder, budgets, max_images, runtime, self.device,
                                      self.config.model.dtype)
        manager.capture()
        self.encoder_graphs = manager

    def context_inputs(self, num_tokens: int) -> MultiModalStepInputs:
        """The step's multimodal inputs for its forward context."""
        rope = self.rope_positions.gpu[:num_tokens].t()
        return MultiModalStepInputs(rope, *(self.step_images or ()))

    def write_rope_positions(self, chunks: Sequence[ScheduledChunk], num_tokens: int) -> None:
        """The step's rotary positions into the persistent buffer: a request's own (MRoPE)
        over its prompt, position + rope_delta after it, the position itself for text-only
        requests; padding rows 0."""
        buf = self.rope_positions.np
        starts = [c.request.num_computed_tokens for c in chunks]
        mms = [getattr(c.request, "mm_inputs", None) for c in chunks]
        for c, mm in zip(chunks, mms):
            if mm is not None and mm.rope_positions is None:
                mm.rope_positions, mm.rope_delta = self.model.rope_positions(
                    c.request.prompt_token_ids, mm.grid_thw)
        if all(c.num_new_tokens == 1 for c in chunks) and all(
                mm is None or s >= mm.rope_positions.shape[1] for s, mm in zip(starts, mms)):
            n = len(chunks)                  # decode: one position per row, no loop over rows
            buf[:n] = (np.array(starts) + np.array([mm.rope_delta if mm is not None else 0
                                                    for mm in mms]))[:, None]
        else:
            row = 0
            for c, start, mm in zip(chunks, starts, mms):
                p = np.arange(start, start + c.num_new_tokens)
                rows = buf[row:row + c.num_new_tokens]
                if mm is None:
                    rows[:] = p[:, None]
                else:
                    prompt = p < mm.rope_positions.shape[1]
                    rows[prompt] = mm.rope_positions[:, p[prompt]].T
                    rows[~prompt] = (p[~prompt] + mm.rope_delta)[:, None]
                row += c.num_new_tokens
            n = row
        buf[n:num_tokens] = 0
        self.rope_positions.copy_to_gpu(num_tokens)

    def step_image_rows(self, chunks: Sequence[ScheduledChunk]) -> tuple | None:
        """(rows, embeds, deepstack) of the step's image tokens, or None: each image's
        encoder output rows for the tokens the step computes (the encoder runs once per
        request, when its first image token is scheduled; samples of one prompt share it)."""
        rows, embeds, deep, done = [], [], [], []
        row = 0
        for c in chunks:
            req, mm = c.request, getattr(c.request, "mm_inputs", None)
            start, end = req.num_computed_tokens, req.num_computed_tokens + c.num_new_tokens
            if mm is not None and any(start < p.offset + p.length and p.offset < end
                                      for p in mm.placeholders):
                outputs = self._encoder_outputs(req, mm)
                for (e, d), ph in zip(outputs, mm.placeholders):
                    lo, hi = max(start, ph.offset), min(end, ph.offset + ph.length)
                    if lo < hi:
                        rows.append(torch.arange(row + lo - start, row + hi - start))
                        embeds.append(e[lo - ph.offset:hi - ph.offset])
                        if d is not None:
                            deep.append(d[:, lo - ph.offset:hi - ph.offset])
                if end >= mm.end:           # its last image token: the outputs are done
                    done.append(id(req))
            row += c.num_new_tokens
        for key in done:                    # after the loop: a sample later in it may share
            self._encoder_cache.pop(key, None)
        if not rows:
            return None
        return (torch.cat(rows).to(self.device), torch.cat(embeds),
                torch.cat(deep, dim=1) if deep else None)

    def _encoder_outputs(self, req: Any, mm) -> list:
        cached = self._encoder_cache.get(id(req))
        if cached is not None and cached[0] is req:
            return cached[1]
        for key, (owner, outputs) in list(self._encoder_cache.items()):
            if getattr(owner, "is_finished", False):      # finished or aborted: drop
                del self._encoder_cache[key]
            elif getattr(owner, "mm_inputs", None) is mm:  # another sample of the prompt
                self._encoder_cache[id(req)] = (req, outputs)
                return outputs
        if self.encoder_graphs is not None:     # packed into captured patch budgets
            outputs = self.encoder_graphs.encode(mm.pixel_values, mm.grid_thw)
        else:
            pixels = mm.pixel_values.to(self.device, self.config.model.dtype)
            outputs = self.model.encode_images(pixels, mm.grid_thw)
        self._encoder_cache[id(req)] = (req, outputs)
        return outputs
