"""Detokenizing once at the end gives the text the incremental stream gives."""
from __future__ import annotations

import numpy as np
import pytest

from fullgraph.engine.detokenizer import IncrementalDetokenizer, load_tokenizer


@pytest.mark.parametrize("skip_special", [True, False])
def test_deferred_decode_equals_incremental(hf_dir, skip_special):
    tok = load_tokenizer(hf_dir)
    rng = np.random.default_rng(0)
    vocab = len(tok)
    specials = sorted(set(tok.all_special_ids))
    words = "the cat sat on a mat while 42 émigrés sang über loud ☃ songs".split()
    for trial in range(40):
        # prompts are real text (a random-id prompt can end inside a UTF-8 sequence, which
        # the stream then emits part of: not a case either path is meant for)
        prompt = tok.encode(" ".join(rng.choice(words, rng.integers(1, 8))))
        out = rng.integers(0, vocab, rng.integers(1, 30)).tolist()
        if trial % 4 == 0 and specials:
            out[rng.integers(len(out))] = specials[trial % len(specials)]
        inc = IncrementalDetokenizer(tok, prompt, skip_special, (), False)
        for t in out:
            inc.add(t)
        inc.finalize(out, skip_special)
        lazy = IncrementalDetokenizer(tok, prompt, skip_special, (), False, incremental=False)
        assert lazy.add(out[0]) is None
        lazy.finalize(out, skip_special)
        assert lazy.text == inc.text


def test_stop_strings_need_the_incremental_path(hf_dir):
    tok = load_tokenizer(hf_dir)
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(tok, [1, 2], True, ("x",), False, incremental=False)
