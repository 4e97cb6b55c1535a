"""Images in chat messages (OpenAI / vLLM content parts) for the chat template.

A message's content may be a list of parts: `{"type": "text", "text": ...}`,
`{"type": "image_url", "image_url": {"url": ...}}` (a data URL or a local path; the server
decides which paths it accepts) or `{"type": "image", "image": <PIL image, array, path>}`
(`{"type": "image_pil", "image_pil": <PIL image>}` too, as vLLM's LLM.chat takes it).
Each image part becomes a sentinel in the message's text; after the template renders, the
text between sentinels is tokenized piece by piece and every sentinel becomes the model's
vision start, image and vision end tokens. So no tokenizer needs to know the image tokens'
spellings, and a chat template written for text messages renders image messages too.
"""
from __future__ import annotations

from typing import Any

IMAGE_SENTINEL = "\x00<fullgraph-image>\x00"


def split_images(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """(messages whose content is text, with a sentinel per image part; the images in
    order). ValueError naming a malformed part."""
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        texts, prev_text = [], False
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":          # consecutive text parts: joined by a newline
                texts.append(("\n" if prev_text else "") + (part.get("text") or ""))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ValueError(f"messages[{i}].content[{j}]: image_url needs a url")
                images.append(url)
                texts.append(IMAGE_SENTINEL)
            elif kind in ("image", "image_pil"):      # vLLM's offline part types
                images.append(part.get(kind))
                texts.append(IMAGE_SENTINEL)
            else:
                raise ValueError(f"messages[{i}].content[{j}]: unsupported content part "
                                 f"type {kind!r} (text, image_url, image, image_pil)")
            prev_text = kind == "text"
        out.append(dict(m, content="".join(texts)))
    return out, images


def encode_with_images(text: str, encode, image_ids: list[int]) -> list[int]:
    """Token ids of rendered text, each sentinel replaced by `image_ids`."""
    pieces = text.split(IMAGE_SENTINEL)
    ids = encode(pieces[0]) if pieces[0] else []
    for piece in pieces[1:]:
        ids += image_ids + (encode(piece) if piece else [])
    return ids
