"""Multimodal inputs: turning images into what a vision tower reads.

`image_processor` loads and preprocesses images on the host (the Qwen2-VL family's
patchified layout); the towers that consume it live with the models
(models/qwen3_vl_vision.py). docs/vision.md says how the pieces fit and what comes next.
"""
from fullgraph.multimodal.image_processor import (ImageProcessor, ImageProcessorConfig,
                                                  ProcessedImages, load_image, smart_resize)

__all__ = ["ImageProcessor", "ImageProcessorConfig", "ProcessedImages", "load_image",
           "smart_resize"]
