"""Where a model name points: a local directory, a built-in preset, or a Hugging Face model id
already in the local Hugging Face cache. Nothing is downloaded at run time."""
from __future__ import annotations

import os

from fullgraph.models.presets import PRESETS, resolve_model_path


def hf_cache_dir() -> str:
    """The hub cache huggingface_hub uses, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return os.path.join(home, "hub")


def resolve_model_dir(name: str, what: str = "model", revision: str | None = None) -> str:
    """A directory holding `name`'s files; ValueError naming where it looked otherwise."""
    if os.path.isdir(name) or name in PRESETS:
        return resolve_model_path(name)
    looks_like_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
        cache = hf_cache_dir()
        try:
            return snapshot_download(name, revision=revision, cache_dir=cache,
                                     local_files_only=True)
        except LocalEntryNotFoundError:
            raise ValueError(
                f"{what} {name!r} is not in the local Hugging Face cache ({cache}) and fullgraph "
                f"does not download at run time: fetch it first (`hf download {name}`), or "
                f"pass a local directory") from None
        except HFValidationError:
            pass
    raise ValueError(f"{what} {name!r} is not a local directory, a built-in preset "
                     f"({', '.join(PRESETS)}) or a Hugging Face model id")
