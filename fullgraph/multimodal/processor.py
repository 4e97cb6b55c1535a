"""A request's images into what the engine carries: the prompt's image placeholders expanded
to one token per encoder output row, the preprocessed pixels, and a content hash per image.

Prompts name each image with one image token (what the chat templates of Qwen3-VL and
Qwen3.5 emit inside `<|vision_start|>...<|vision_end|>`), expanded here to the image's
number of tokens; a prompt whose image-token runs already have exactly those lengths (from
transformers' processor, say) is taken as it is. The hash covers the preprocessed pixels
and grid, so the same picture re-encoded in another file format still hits the prefix
cache, while two images behind identical placeholder ids never share KV blocks.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

from fullgraph.multimodal.image_processor import (ImageInput, ImageProcessor,
                                                  ImageProcessorConfig, load_image)
from fullgraph.multimodal.inputs import ImagePlaceholder, MultiModalInputs


def _runs(ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token` in ids."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


class MultiModalProcessor:
    def __init__(self, image_processor: ImageProcessor, image_token_id: int,
                 vision_start_id: int | None = None, vision_end_id: int | None = None,
                 max_images: int | None = None) -> None:
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.max_images = max_images          # per prompt (limit_mm_per_prompt); None: any
        # what a chat message's image part becomes (multimodal/chat.py)
        self.placeholder_ids = [t for t in (vision_start_id, image_token_id, vision_end_id)
                                if t is not None]

    def process(self, token_ids: list[int], images: Sequence[ImageInput]
                ) -> tuple[list[int], MultiModalInputs]:
        """(the prompt with its placeholders expanded, the images' inputs); ValueError
        naming the problem for unreadable images or placeholders that do not match them."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("multi_modal_data has an empty image list")
        self._check_count(len(images))
        processed = self.image_processor(images)
        ids = self._expand(token_ids, processed.num_tokens)
        placeholders = [ImagePlaceholder(start, n)
                        for (start, n) in _runs(ids, self.image_token_id)]
        grids = [tuple(int(v) for v in g) for g in processed.image_grid_thw.tolist()]
        hashes, row = [], 0
        for grid in grids:
            patches = grid[0] * grid[1] * grid[2]
            h = hashlib.blake2b(repr(grid).encode(), digest_size=8)
            h.update(processed.pixel_values[row:row + patches].numpy().data)   # no copy
            hashes.append(int.from_bytes(h.digest(), "little"))
            row += patches
        return ids, MultiModalInputs(processed.pixel_values, grids, placeholders, hashes)

    def _check_count(self, num_images: int) -> None:
        """ValueError for a prompt with more images than limit_mm_per_prompt allows."""
        if self.max_images is not None and num_images > self.max_images:
            raise ValueError(f"the prompt has {num_images} images but limit_mm_per_prompt "
                             f"allows {self.max_images}")

    def expanded_ids(self, token_ids: list[int], images: Sequence[ImageInput]) -> list[int]:
        """The prompt `process` would run, from the images' sizes alone (no pixels)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        sizes = [load_image(image).shape[:2] for image in images]
        return self._expand(token_ids, [self.image_processor.num_tokens(h, w)
                                        for h, w in sizes])

    def _expand(self, token_ids: list[int], counts: list[int]) -> list[int]:
        runs = _runs(token_ids, self.image_token_id)
        if [n for _, n in runs] == counts:
            return list(token_ids)                    # already expanded
        if len(runs) != len(counts) or any(n != 1 for _, n in runs):
            raise ValueError(f"the prompt has {len(runs)} image placeholders for "
                             f"{len(counts)} images (each image needs one image token, "
                             f"id {self.image_token_id}, where it goes)")
        ids, prev = [], 0
        for (start, _), n in zip(runs, counts):
            ids += token_ids[prev:start] + [self.image_token_id] * n
            prev = start + 1
        return ids + token_ids[prev:]


def image_processor_config(model_dir: str, overrides: Iterable[tuple[str, int]] = ()
                           ) -> ImageProcessorConfig | None:
    """The model directory's preprocessor_config.json, `overrides` (mm_processor_kwargs)
    over its settings; None without the file."""
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return ImageProcessorConfig.from_dict({**json.load(f), **dict(overrides)})


def load_multimodal_processor(model_config) -> MultiModalProcessor | None:
    """The processor of a multimodal model (its class says `multimodal = True`), from the
    model directory's preprocessor_config.json; None for text-only models."""
    from fullgraph.models.registry import get_model_class
    if not getattr(get_model_class(model_config.architecture), "multimodal", False):
        return None
    image_config = image_processor_config(model_config.path, model_config.mm_processor_kwargs)
    if image_config is None:
        raise ValueError(f"{model_config.architecture} needs "
                         f"{os.path.join(model_config.path, 'preprocessor_config.json')} "
                         f"(its image preprocessing)")
    token = getattr(model_config.hf_config, "image_token_id", None)
    if token is None:
        raise ValueError("config.json lacks 'image_token_id', which images need")
    cfg = model_config.hf_config
    return MultiModalProcessor(ImageProcessor(image_config), int(token),
                               getattr(cfg, "vision_start_token_id", None),
                               getattr(cfg, "vision_end_token_id", None),
                               model_config.max_images_per_prompt)
