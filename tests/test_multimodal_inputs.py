"""Images through the engine's request side: placeholder expansion, content hashes, the
prefix-cache keys of image blocks, and the errors (CPU)."""
from __future__ import annotations

import numpy as np
import pytest

from fullgraph.engine.kv_cache import KVCacheManager
from fullgraph.engine.request import Request
from fullgraph.multimodal.image_processor import ImageProcessor, ImageProcessorConfig
from fullgraph.multimodal.processor import MultiModalProcessor
from fullgraph.sampling_params import SamplingParams

IMG = 99                      # the image token id of these tests


def processor():
    # 16-pixel patches merged 2x2: a 64x64 image is a 4x4 patch grid, 4 tokens
    cfg = ImageProcessorConfig(patch_size=16, temporal_patch_size=2, merge_size=2,
                               min_pixels=32 * 32, max_pixels=256 * 256)
    return MultiModalProcessor(ImageProcessor(cfg), IMG)


def image(seed, h=64, w=64):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_placeholders_expand_to_each_images_tokens():
    ids, mm = processor().process([1, 2, IMG, 3, IMG, 4], [image(0), image(1, 64, 128)])
    assert ids == [1, 2] + [IMG] * 4 + [3] + [IMG] * 8 + [4]
    assert [(p.offset, p.length) for p in mm.placeholders] == [(2, 4), (7, 8)]
    assert mm.grid_thw == [(1, 4, 4), (1, 4, 8)]
    assert mm.pixel_values.shape[0] == 16 + 32 and mm.end == 15
    # already expanded (transformers' processor output): taken as it is
    again, mm2 = processor().process(ids, [image(0), image(1, 64, 128)])
    assert again == ids and mm2.image_hashes == mm.image_hashes


def test_hashes_follow_content_not_source():
    a = image(0)
    _, mm = processor().process([IMG, 1, IMG], [a, a.copy()])
    _, other = processor().process([IMG], [image(1)])
    assert mm.image_hashes[0] == mm.image_hashes[1] != other.image_hashes[0]


@pytest.mark.parametrize("ids, n, msg", [([1, IMG, 2], 2, "1 image placeholders for 2"),
                                         ([1, 2], 1, "0 image placeholders for 1"),
                                         ([IMG, IMG, 1], 1, "1 image placeholders for 1")])
def test_placeholder_count_mismatch_is_a_clear_error(ids, n, msg):
    with pytest.raises(ValueError, match=msg):
        processor().process(ids, [image(i) for i in range(n)])


def test_unreadable_image_is_a_clear_error():
    with pytest.raises(ValueError):
        processor().process([IMG], ["/no/such/file.png"])
    with pytest.raises(ValueError):
        processor().process([IMG], [np.zeros((0, 4, 3), np.uint8)])


def _request(rid, images):
    ids, mm = processor().process([5, 6, 7, IMG, 8], images)
    return Request(rid, ids, SamplingParams(), seed=0, max_tokens=4, mm_inputs=mm)


def test_prefix_cache_keys_include_the_images():
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=True)
    first = _request("a", [image(0)])                     # tokens 5 6 7 IMG | IMG IMG IMG 8
    assert kv.allocate_slots(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    kv.cache_full_blocks(first)
    same = _request("b", [image(0)])
    different = _request("c", [image(1)])
    assert same.prompt_token_ids == different.prompt_token_ids
    assert len(kv.get_computed_blocks(same)) == 1         # all blocks but the last token's
    assert kv.get_computed_blocks(different) == []        # its first block has image tokens
    # a text-only block is keyed as a text request's: a shared system prompt hits
    text = Request("d", [5, 6, 7, IMG - 1, 2], SamplingParams(), seed=0, max_tokens=4)
    assert kv.get_computed_blocks(text) == []
    ids, mm = processor().process([5, 6, 7, 8, 9, 10, 11, 12, IMG], [image(0)])
    with_image = Request("e", ids, SamplingParams(), seed=0, max_tokens=4, mm_inputs=mm)
    assert kv.allocate_slots(with_image, with_image.num_tokens)
    with_image.num_computed_tokens = with_image.num_tokens
    kv.cache_full_blocks(with_image)
    plain = Request("f", [5, 6, 7, 8, 9, 10, 11, 12, 1], SamplingParams(), seed=0,
                    max_tokens=4)
    assert len(kv.get_computed_blocks(plain)) == 2
