"""Tokenizers: the offline byte-level BPE (round trip, special tokens, cached by content) and tokenizer files."""

import pytest

from hyloom.data import EOS_TOKEN, MASK_TOKEN, DataError, HFTokenizer
from hyloom.plugins.data import bpe
from conftest import stdlib_texts


@pytest.fixture(scope="module")
def texts():
    return [t for _, t in stdlib_texts(150_000)]


def test_bpe_round_trips_real_text(texts, tmp_path):
    tok = bpe.BPETrainer(bpe.BPEConfig(vocab_size=500)).train(texts, cache_dir=tmp_path)
    assert tok.vocab_size == 500
    assert (tok.eos_id, tok.mask_id) == (0, 1)
    assert tok.hf.id_to_token(tok.eos_id) == EOS_TOKEN and tok.hf.id_to_token(tok.mask_id) == MASK_TOKEN
    for text in texts[:20] + ["unseen: naïve café ☃ 日本語\r\n\ttabs  and  spaces", f"a{EOS_TOKEN}b"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert len(tok.encode(texts[0])) < 0.7 * len(texts[0].encode())  # it learned merges: fewer tokens than bytes
    assert tok.encode_batch(texts[:3]) == [tok.encode(t) for t in texts[:3]]


def test_bpe_is_cached_by_content(texts, tmp_path, monkeypatch):
    trainer = bpe.BPETrainer(bpe.BPEConfig(vocab_size=400))
    first = trainer.train(texts, cache_dir=tmp_path)
    assert trainer.cache_path(texts, tmp_path).is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(bpe, "_train", no_training)
    again = bpe.BPETrainer(bpe.BPEConfig(vocab_size=400)).train(list(texts), cache_dir=tmp_path)
    assert again.hf.get_vocab() == first.hf.get_vocab()
    assert trainer.cache_path(texts[:-1], tmp_path) != trainer.cache_path(texts, tmp_path)
    other_config = bpe.BPETrainer(bpe.BPEConfig(vocab_size=401))
    assert other_config.cache_path(texts, tmp_path) != trainer.cache_path(texts, tmp_path)
    with pytest.raises(AssertionError, match="trained again"):
        trainer.train(texts[:-1], cache_dir=tmp_path)


def test_extra_special_tokens_come_after_the_reserved_ones(texts, tmp_path):
    trainer = bpe.BPETrainer(bpe.BPEConfig(vocab_size=300, extra_special_tokens=["<|pad|>"]))
    tok = trainer.train(texts[:5], cache_dir=tmp_path)
    assert tok.hf.token_to_id("<|pad|>") == 2
    assert tok.encode("x<|pad|>") == tok.encode("x") + [2]


def test_file_tokenizer_loads_a_saved_one(texts, tmp_path):
    tok = bpe.BPETrainer(bpe.BPEConfig(vocab_size=300)).train(texts[:5], cache_dir=tmp_path / "cache")
    path = tok.save(tmp_path / "out")
    assert path == tmp_path / "out" / "tokenizer.json"
    for where in (path, path.parent):
        loaded = bpe.FileTokenizer(bpe.FileTokenizerConfig(path=str(where)))
        assert loaded.encode(texts[0]) == tok.encode(texts[0]) and loaded.eos_id == tok.eos_id
    assert loaded.fingerprint()[0][0] == str(path.resolve())


def test_file_tokenizer_errors(texts, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.json'} does not exist"):
        bpe.FileTokenizer(bpe.FileTokenizerConfig(path=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
        HFTokenizer.load(tmp_path / "bad.json")
    tok = bpe.BPETrainer(bpe.BPEConfig(vocab_size=300)).train(texts[:5], cache_dir=tmp_path)
    path = tok.save(tmp_path / "t.json")
    with pytest.raises(DataError, match="no '</s>' token"):
        bpe.FileTokenizer(bpe.FileTokenizerConfig(path=str(path), eos_token="</s>"))
