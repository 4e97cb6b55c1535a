"""Multimodal inputs: turning images into what a vision tower and the engine read.

`image_processor` loads and preprocesses images on the host (the Qwen2-VL family's
patchified layout); `processor` expands a prompt's image placeholders and hashes the images
(`inputs.MultiModalInputs`, which a request carries); `chat` takes images out of chat
messages; `inputs` also holds what a step hands the model (`MultiModalStepInputs`). The
towers live with the models (models/qwen3_vl_vision.py). docs/vision.md says how the
pieces fit.
"""
from fullgraph.multimodal.image_processor import (ImageProcessor, ImageProcessorConfig,
                                                  ProcessedImages, load_image, smart_resize)

__all__ = ["ImageProcessor", "ImageProcessorConfig", "ProcessedImages", "load_image",
           "smart_resize"]
