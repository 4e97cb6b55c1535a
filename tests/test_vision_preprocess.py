"""Image preprocessing (fullgraph/multimodal/image_processor.py) against transformers'
Qwen2VLImageProcessor (torchvision backend, the one AutoImageProcessor picks when torchvision
is installed) and Qwen2VLImageProcessorPil (the one it picks without), plus the loader's
input forms and errors."""
from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest
import torch

from fullgraph.multimodal import ImageProcessor, ImageProcessorConfig, load_image

# Qwen3-VL's preprocessor_config.json, with pixel bounds shrunk to keep images small.
RAW = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
       "size": {"shortest_edge": 64 * 64, "longest_edge": 160 * 160},
       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
# (height, width): already a valid size, upscaled into min_pixels, downscaled into
# max_pixels, extreme aspect ratios, exactly max_pixels
SIZES = [(64, 64), (96, 128), (37, 53), (33, 33), (300, 200), (17, 500), (480, 640),
         (160, 160)]
UNRESIZED = {(64, 64), (96, 128), (160, 160)}


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _reference(backend: str):
    if backend == "torchvision":
        pytest.importorskip("torchvision")
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import \
            Qwen2VLImageProcessor as cls
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
            Qwen2VLImageProcessorPil as cls
    return cls(**RAW)


@pytest.fixture(scope="module")
def processor() -> ImageProcessor:
    return ImageProcessor(ImageProcessorConfig.from_dict(RAW))


def test_matches_transformers_torchvision_backend(processor):
    """Bit-exact: the same uint8 bicubic antialiased kernel and the same float32 arithmetic."""
    ref = _reference("torchvision")(images=_images(), return_tensors="pt")
    ours = processor(_images())
    assert torch.equal(ours.image_grid_thw, ref["image_grid_thw"])
    assert torch.equal(ours.pixel_values, ref["pixel_values"])


def test_matches_transformers_pil_backend(processor):
    """Grids and patch order exact. Unresized images differ only in how rescale and normalize
    round (fused or not: float32 ulps). PIL's bicubic rounds some resized pixels one or two
    levels (of 255) away from torch's kernel (measured on noise: at most 2, in ~1% of
    values), which is a difference between transformers' two backends, not ours."""
    ref_proc = _reference("pil")
    level = 1 / (255 * 0.5)                     # one uint8 step after normalizing by std 0.5
    for image in _images(seed=1):
        ref = ref_proc(images=[image], return_tensors="pt")
        ours = processor([image])
        assert torch.equal(ours.image_grid_thw, ref["image_grid_thw"])
        diff = (ours.pixel_values - ref["pixel_values"]).abs()
        if image.shape[:2] in UNRESIZED:
            assert diff.max() < 1e-6
        else:
            assert diff.max() < 2 * level + 1e-5
            assert (diff > 1e-5).float().mean() < 0.03


def test_grids_and_placeholder_counts(processor):
    c = processor.config
    out = processor(_images())
    assert out.pixel_values.shape == (int(out.image_grid_thw.prod(-1).sum()), 3 * 2 * 16 * 16)
    assert out.pixel_values.dtype == torch.float32
    for (h, w), (t, gh, gw), n in zip(SIZES, out.image_grid_thw.tolist(), out.num_tokens):
        assert t == 1 and gh % c.merge_size == 0 and gw % c.merge_size == 0
        assert c.min_pixels <= gh * gw * c.patch_size ** 2 <= c.max_pixels
        assert n == gh * gw // 4 == processor.num_tokens(h, w)
    ref = _reference("pil")
    assert [ref.get_number_of_image_patches(h, w) // 4 for h, w in SIZES] == out.num_tokens


def test_config_from_dict():
    cfg = ImageProcessorConfig.from_dict({**RAW, "min_pixels": 1000, "max_pixels": 9000})
    assert (cfg.min_pixels, cfg.max_pixels, cfg.factor) == (1000, 9000, 32)
    legacy = ImageProcessorConfig.from_dict({"min_pixels": 3136, "max_pixels": 12845056})
    assert (legacy.patch_size, legacy.min_pixels, legacy.max_pixels) == (14, 3136, 12845056)
    with pytest.raises(ValueError, match="image_mean"):
        ImageProcessorConfig.from_dict({**RAW, "image_mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="do_resize"):
        ImageProcessorConfig.from_dict({**RAW, "do_resize": False})


def test_input_forms_agree(processor, tmp_path):
    array = _images()[2]
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    forms = [PIL.Image.fromarray(array), str(path), path, f"file://{path}", url, buf.getvalue()]
    expected = processor([array]).pixel_values
    for form in forms:
        assert torch.equal(processor([form]).pixel_values, expected), type(form)
    gray = array[:, :, 0]
    assert np.array_equal(load_image(gray), np.repeat(gray[:, :, None], 3, axis=2))
    clear = np.zeros((8, 8, 4), np.uint8)                   # fully transparent -> white
    assert (load_image(clear) == 255).all()
    assert (load_image(PIL.Image.fromarray(clear, "RGBA")) == 255).all()


def test_exif_orientation_applied_to_files(tmp_path):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6                                        # rotate 90 degrees to display
    path = tmp_path / "rotated.png"
    PIL.Image.new("RGB", (20, 10)).save(path, exif=exif)
    assert load_image(str(path)).shape == (20, 10, 3)


@pytest.mark.parametrize("source, match", [
    ("https://example.com/cat.png", "network"),
    ("/nonexistent/cat.png", "not found"),
    ("data:text/plain;base64,aGVsbG8=", "data URL"),
    ("data:image/png;base64,@@@", "base64"),
    ("data:image/png;base64,aGVsbG8=", "cannot read"),
    (b"not an image", "cannot read"),
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((4, 5, 3), np.float32), "uint8"),
    (np.zeros((3, 4, 5), np.uint8), "channels"),
    (PIL.Image.new("RGB", (0, 4)), "empty"),
    (42, "unsupported"),
])
def test_bad_inputs(source, match):
    with pytest.raises(ValueError, match=match):
        load_image(source)


def test_bad_batches(processor, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("not a png")
    with pytest.raises(ValueError, match="cannot read"):
        processor([str(junk)])
    with pytest.raises(ValueError, match="no images"):
        processor([])
    with pytest.raises(ValueError, match="aspect ratio"):
        processor([np.zeros((2, 500, 3), np.uint8)])
