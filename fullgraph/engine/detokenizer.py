"""Tokenizer loading, incremental detokenization and stop-string matching."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

_PROMPT_CONTEXT = 8   # prompt tokens that prime the stream (leading spaces, merges)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types for missing or bad files
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"the tokenizer in {path} is not a fast (tokenizers) tokenizer")
    return tok


class IncrementalDetokenizer:
    """Turns generated ids into text as they arrive and finds stop strings in it.

    While a request runs, up to len(longest stop string) - 1 trailing characters are held back
    from `visible_text`, since they may turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool,
                 stop: tuple[str, ...], include_stop: bool) -> None:
        self.backend = tokenizer.backend_tokenizer
        self.stream = DecodeStream(ids=prompt_ids[-_PROMPT_CONTEXT:],
                                   skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""

    def add(self, token_id: int) -> str | None:
        """Append a token; return the stop string it completed, if any."""
        try:
            piece = self.stream.step(self.backend, token_id)
        except Exception:   # ids outside the tokenizer's vocabulary (models may pad it)
            piece = None
        if not piece:
            return None
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        found = [(idx, s) for s in self.stop if (idx := self.text.find(s, start)) >= 0]
        if not found:
            return None
        idx, s = min(found)
        self.text = self.text[:idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def finalize(self, output_ids: list[int], skip_special_tokens: bool) -> None:
        """At the end, emit what the stream still holds back (e.g. an incomplete UTF-8
        sequence), so the final text equals a plain decode of the output."""
        full = self.backend.decode(output_ids, skip_special_tokens=skip_special_tokens)
        if full.startswith(self.text):
            self.text = full

    def visible_text(self, finished: bool) -> str:
        if finished or not self.hold:
            return self.text
        return self.text[:max(0, len(self.text) - self.hold)]
