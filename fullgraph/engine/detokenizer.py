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
    from `visible_text`, since they may turn out to be the start of a stop string. As in
    vLLM, stop strings are looked for from the token after the first `min_tokens` on (one
    that ends in the text of those tokens does not stop the request).

    With `incremental=False` (a request nobody reads before it ends and that has no stop
    strings) `add` does nothing and `finalize` decodes the output once, the same way the
    stream would have (after the same prompt context): per-token decoding is a large part of
    a big batch's host time. With `detokenize=False` (vLLM's option) nothing is decoded and
    the text stays empty.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool,
                 stop: tuple[str, ...], include_stop: bool, incremental: bool = True,
                 min_tokens: int = 0, detokenize: bool = True) -> None:
        if stop and not incremental:
            raise ValueError("stop strings need incremental detokenization")
        self.detokenize = detokenize
        self.backend = tokenizer.backend_tokenizer
        self.incremental = incremental
        self.context = prompt_ids[-_PROMPT_CONTEXT:]
        self.stream = DecodeStream(ids=self.context, skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.min_tokens = min_tokens
        self.num_tokens = 0

    def add(self, token_id: int) -> str | None:
        """Append a token; return the stop string it completed, if any."""
        if not self.incremental:
            return None
        self.num_tokens += 1
        try:
            piece = self.stream.step(self.backend, token_id)
        except Exception:   # ids outside the tokenizer's vocabulary (models may pad it)
            piece = None
        if not piece:
            return None
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        if self.num_tokens <= self.min_tokens:
            return None
        found = [(idx, s) for s in self.stop if (idx := self.text.find(s, start)) >= 0]
        if not found:
            return None
        idx, s = min(found)
        self.text = self.text[:idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def finalize(self, output_ids: list[int], skip_special_tokens: bool) -> None:
        """At the end, emit what the stream still holds back (e.g. an incomplete UTF-8
        sequence), so the final text equals a plain decode of the output."""
        if not self.detokenize:
            return
        if not self.incremental:
            ctx = self.backend.decode(self.context, skip_special_tokens=skip_special_tokens)
            text = self.backend.decode(self.context + list(output_ids),
                                       skip_special_tokens=skip_special_tokens)
            if text.startswith(ctx):
                self.text = text[len(ctx):]
                return
        full = self.backend.decode(output_ids, skip_special_tokens=skip_special_tokens)
        if full.startswith(self.text):
            self.text = full

    def visible_text(self, finished: bool) -> str:
        if finished or not self.hold:
            return self.text
        return self.text[:max(0, len(self.text) - self.hold)]
