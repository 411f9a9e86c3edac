"""The Fisher data's generated answers, kept per base model: reused exactly, and regenerated when unusable."""

import json

import torch

import tiny
from agl_plugins.demo.pipeline import estimate_stats

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _diag(model, tok, cache, **kw):
    stats = estimate_stats(model, tok, ATTN, max_examples=6, max_new_tokens=8, progress=False, targets_cache=cache,
                           **kw)
    return stats.diagonal


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_answers_give_the_same_fisher_and_are_really_read(tmp_path):
    model, tok = tiny.tiny_llama(seed=5).eval(), tiny.tiny_tokenizer()
    fresh = _diag(model, tok, None)
    first = _diag(model, tok, tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and _same(fresh, first)
    kept = json.loads(files[0].read_text())
    assert len(kept) == 6 and all(isinstance(t, list) for t in kept)
    assert _same(_diag(model, tok, tmp_path), fresh)  # read back: identical statistics

    # the file is what the next run uses: an altered generated answer changes the statistics
    safe = next(i for i, t in enumerate(kept) if i % 2 and len(t) >= 2)  # rows alternate unsafe (written), safe
    doctored = [list(t) for t in kept]
    doctored[safe] = list(reversed(doctored[safe]))
    files[0].write_text(json.dumps(doctored))
    assert not _same(_diag(model, tok, tmp_path), fresh)

    # an unreadable or foreign file is regenerated and replaced
    for bad in ("{not json", json.dumps(kept[:3]), json.dumps([["a"]] * 6)):
        files[0].write_text(bad)
        assert _same(_diag(model, tok, tmp_path), fresh)
        assert json.loads(files[0].read_text()) == kept


def test_other_generation_settings_get_their_own_file(tmp_path):
    model, tok = tiny.tiny_llama(seed=5).eval(), tiny.tiny_tokenizer()
    _diag(model, tok, tmp_path)
    _diag(model, tok, tmp_path, batch_size=4)  # other batches: other padding of the generated rows
    estimate_stats(model, tok, ATTN, max_examples=6, max_new_tokens=4, progress=False, targets_cache=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3
