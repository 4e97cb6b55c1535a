"""What a multimodal model receives from the engine: per request, its images (preprocessed on
the host when the request arrives) and its rotary positions; per step, the image rows of the
step's tokens.

A request's prompt holds `num_tokens` copies of the model's image token per image, in order
(`ImagePlaceholder` says where each image's run starts). The model's encoder turns each
image into that many embeddings (plus deepstack features for Qwen3-VL), which replace the
token embeddings of those rows when the step that computes them runs. The rotary positions
of multimodal Qwen models (MRoPE) are three rows (temporal, height, width): text tokens have
all three equal, an image's tokens follow its grid; `rope_delta` continues them past the
prompt (a generated token at sequence position p has all three rows p + rope_delta).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class ImagePlaceholder:
    offset: int               # the image's first token in the prompt
    length: int               # its number of tokens (the encoder's output rows)


@dataclass(slots=True)
class MultiModalInputs:
    """A request's images, as the input processor prepared them (host tensors)."""
    pixel_values: torch.Tensor                 # [patches, C * T * P * P] float32, all images
    grid_thw: list[tuple[int, int, int]]       # per image
    placeholders: list[ImagePlaceholder]       # per image, in prompt order
    image_hashes: list[int]                    # per image: content hash (prefix-cache keys)
    # the model's rotary positions, computed by the runner when the request first runs
    rope_positions: np.ndarray | None = None   # [3, num_prompt_tokens] int64
    rope_delta: int = 0                        # generated tokens: position + rope_delta

    def hashes_between(self, start: int, end: int) -> tuple[int, ...]:
        """Content hashes of the images with tokens in [start, end): what a KV block over
        those tokens depends on besides their (identical placeholder) ids."""
        return tuple(h for p, h in zip(self.placeholders, self.image_hashes)
                     if p.offset < end and p.offset + p.length > start)

    @property
    def end(self) -> int:
        """One past the last image token."""
        last = self.placeholders[-1]
        return last.offset + last.length


@dataclass(slots=True)
class MultiModalStepInputs:
    """One step's multimodal inputs for the model's forward (`ForwardContext.multimodal`).

    rope_positions is a view of a persistent buffer, filled for every step of a multimodal
    model (graph or eager). The image rows are present only in steps that compute image
    tokens, which run eagerly: `embed_rows` [M] (rows of the step's packed tokens, int64),
    `embeds` [M, hidden] and `deepstack` [num_deepstack, M, hidden] (None for models
    without deepstack features)."""
    rope_positions: torch.Tensor               # [3, num_tokens_padded] int64
    embed_rows: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None
