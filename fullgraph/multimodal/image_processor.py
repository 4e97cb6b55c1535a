"""Image loading and preprocessing for the Qwen2-VL family's towers (Qwen3-VL, Qwen3.5).

Output is transformers' `pixel_values` / `image_grid_thw` for the same images and
preprocessor_config.json: each image resized by `smart_resize` to a multiple of
patch_size * merge_size within [min_pixels, max_pixels], rescaled and normalized, repeated
`temporal_patch_size` times (a still image is one temporal patch), and cut into patches in
merge-block order (each merge_size x merge_size block of patches is contiguous, so the tower's
merger reads neighbouring rows).

Which of transformers' processors we follow: for qwen3_vl and qwen3_5 its AutoImageProcessor
picks `Qwen2VLImageProcessor` (the torchvision backend) whenever torchvision is installed,
and `Qwen2VLImageProcessorPil` only without it. The torchvision backend resizes a uint8
tensor with bicubic, antialiased interpolation, which on the CPU is torch's own uint8 kernel
(`F.interpolate`); PIL's BICUBIC rounds differently (a few levels apart on noisy pixels), so
the two backends disagree. We call the same torch kernel on the same uint8 CHW tensor and
need no torchvision. Rescale and normalize use its fused arithmetic: (x - mean*255) /
(std*255) in float32.

Transparency is composited onto white (transformers' convention for PIL images, and vLLM's);
files and data URLs are turned upright by their EXIF orientation, as transformers'
`load_image` does. Images are loaded only from local sources: no network fetches.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

# transformers' defaults (OPENAI_CLIP_MEAN / _STD), used where a config leaves them out
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[PIL.Image.Image, np.ndarray, str, bytes, os.PathLike]


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of preprocessor_config.json that decide the tower's input."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = _CLIP_MEAN
    image_std: tuple[float, float, float] = _CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, raw: dict) -> ImageProcessorConfig:
        """Read a preprocessor_config.json dict the way transformers does: top-level
        min_pixels/max_pixels win over size.shortest_edge/longest_edge (both are pixel counts,
        not edges). A switched-off step (do_resize false, ...) is refused rather than ignored."""
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if raw.get(flag, True) is False:
                raise ValueError(f"preprocessor_config.json sets {flag}=false, which this "
                                 f"preprocessing does not support")
        size = raw.get("size") or {}
        d = cls()
        min_pixels = raw.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_pixels = raw.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        cfg = cls(patch_size=int(raw.get("patch_size", d.patch_size)),
                  temporal_patch_size=int(raw.get("temporal_patch_size", d.temporal_patch_size)),
                  merge_size=int(raw.get("merge_size", d.merge_size)),
                  min_pixels=int(min_pixels or d.min_pixels),
                  max_pixels=int(max_pixels or d.max_pixels),
                  image_mean=_per_channel(raw.get("image_mean", d.image_mean), "image_mean"),
                  image_std=_per_channel(raw.get("image_std", d.image_std), "image_std"),
                  rescale_factor=float(raw.get("rescale_factor", d.rescale_factor)))
        if cfg.min_pixels > cfg.max_pixels:
            raise ValueError(f"preprocessor_config.json's min_pixels {cfg.min_pixels} exceeds "
                             f"max_pixels {cfg.max_pixels}")
        return cfg

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this: whole merge blocks."""
        return self.patch_size * self.merge_size


def _per_channel(value, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"preprocessor_config.json's {name} needs 3 values (RGB), got {value}")
    return tuple(values)


@dataclass
class ProcessedImages:
    pixel_values: torch.Tensor          # [sum of t*h*w patches, C*T*P*P] float32
    image_grid_thw: torch.Tensor        # [num_images, 3] int64: (t, h, w) in patches
    num_tokens: list[int]               # placeholder tokens per image: t*h*w // merge_size**2


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """transformers' rule: round each side to a multiple of `factor`, then scale both by one
    ratio (keeping the aspect) down into max_pixels or up into min_pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got "
                         f"{max(height, width) / min(height, width)} ({width}x{height})")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(source: ImageInput) -> np.ndarray:
    """An RGB uint8 [height, width, 3] array from a PIL image, an [H, W, C] uint8 array (C in
    1, 3, 4; or [H, W] grayscale), encoded image bytes, a local path (or file:// URL) or a
    `data:image/...;base64,` URL. ValueError naming the problem for anything else."""
    if isinstance(source, np.ndarray):
        return _rgb_from_array(source)
    if isinstance(source, PIL.Image.Image):
        return _rgb_from_pil(source, "the PIL image")
    if isinstance(source, (bytes, bytearray)):
        return _decode(io.BytesIO(source), "the image bytes")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise ValueError(f"unsupported image input of type {type(source).__name__}: pass a PIL "
                         f"image, a uint8 array, a local path or a data:image URL")
    if source.startswith("data:"):
        return _decode(io.BytesIO(_data_url_bytes(source)), "the data URL")
    if source.startswith(("http://", "https://")):
        raise ValueError(f"cannot fetch image {source[:80]!r}: network URLs are not supported; "
                         f"pass a local path or a data:image/...;base64 URL")
    path = source.removeprefix("file://")
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {path[:200]!r}")
    with open(path, "rb") as f:
        return _decode(f, f"image file {path!r}")


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"unsupported data URL {header[:60]!r}: expected "
                         f"'data:image/<format>;base64,<data>'")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as e:
        raise ValueError(f"the data URL's base64 payload is malformed: {e}") from e


def _decode(fp, what: str) -> np.ndarray:
    try:
        image = PIL.Image.open(fp)
        image.load()
        image = PIL.ImageOps.exif_transpose(image)
    except Exception as e:  # PIL's errors for unknown, truncated or oversized images
        raise ValueError(f"cannot read {what} as an image: {e}") from e
    return _rgb_from_pil(image, what)


def _rgb_from_pil(image: PIL.Image.Image, what: str) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{what} is empty ({image.width}x{image.height})")
    if "A" in image.getbands() or "transparency" in image.info:
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def _rgb_from_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image arrays must be [height, width, channels] with 1, 3 or 4 "
                         f"channels, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the image array is empty (shape {array.shape})")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        return _rgb_from_pil(PIL.Image.fromarray(array, "RGBA"), "the image array")
    return np.ascontiguousarray(array)


class ImageProcessor:
    """Preprocesses a batch of images for the tower; holds only its config."""

    def __init__(self, config: ImageProcessorConfig) -> None:
        self.config = config
        scale = 1.0 / config.rescale_factor
        # transformers folds the rescale into normalize: (x - mean/r) / (std/r), float32.
        self._mean = (torch.tensor(config.image_mean, dtype=torch.float32) * scale).view(3, 1, 1)
        self._std = (torch.tensor(config.image_std, dtype=torch.float32) * scale).view(3, 1, 1)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.config
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    def num_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens an image of this size needs, without its pixels."""
        c = self.config
        h, w = self.resized_size(height, width)
        return (h // c.patch_size) * (w // c.patch_size) // c.merge_size ** 2

    def __call__(self, images: Sequence[ImageInput]) -> ProcessedImages:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images to preprocess")
        patches, grids = zip(*(self.preprocess_one(load_image(image)) for image in images))
        grid_thw = torch.tensor(grids, dtype=torch.int64)
        num_tokens = (grid_thw.prod(-1) // self.config.merge_size ** 2).tolist()
        return ProcessedImages(torch.cat(patches), grid_thw, num_tokens)

    def preprocess_one(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[H, W, 3] uint8 -> (patches [h*w, C*T*P*P], (1, h, w))."""
        c = self.config
        height, width = rgb.shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))   # [3, H, W]
        new_h, new_w = self.resized_size(height, width)
        if (new_h, new_w) != (height, width):
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic",
                                  align_corners=False, antialias=True)[0]
        x = (image.float() - self._mean) / self._std
        p, m, t = c.patch_size, c.merge_size, c.temporal_patch_size
        gh, gw = new_h // p, new_w // p
        x = x.reshape(3, gh // m, m, p, gw // m, m, p)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)           # [gh/m, gw/m, m, m, C, P, P]
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)    # the frame, t times
        return x.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)
