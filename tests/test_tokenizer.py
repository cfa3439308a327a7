"""The SentencePiece tokenizer: trained on the corpus and cached, or loaded from a path."""
import os

import pytest

from mla_rmt import presets, tokenizer
from mla_rmt.model_config import ConfigError

VOCAB = 512


def data_config(**fields):
    d = presets.base_config().data
    d.update(fields)
    return d


def test_trained_once_then_loaded_from_the_cache(tmp_path):
    d = data_config(data_dir=str(tmp_path))
    sp = tokenizer.get_tokenizer(d, VOCAB)
    path = tokenizer.model_path(d, VOCAB)
    assert path.exists() and str(path).startswith(str(tmp_path))
    mtime = os.stat(path).st_mtime_ns
    again = tokenizer.get_tokenizer(d, VOCAB)
    assert os.stat(path).st_mtime_ns == mtime                    # not retrained
    assert again.serialized_model_proto() == sp.serialized_model_proto()
    assert sp.get_piece_size() == VOCAB
    assert sp.eos_id() == 1 and sp.bos_id() == -1
    assert tokenizer.model_path(d, 2 * VOCAB) != path           # keyed by vocab size


def test_trained_model_encodes_any_text_and_round_trips(tmp_path):
    sp = tokenizer.get_tokenizer(data_config(data_dir=str(tmp_path)), VOCAB)
    for text in ["In the beginning God created the heaven and the earth.",
                 "  two  spaces,\nnew line\ttab 1234 日本語 ☃ émoji 🙂"]:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids and max(ids) < VOCAB
        assert sp.decode(ids) == text
    common = sp.encode("the Lord")
    assert len(common) <= 3                                     # learned merges, not bytes


def test_training_is_deterministic(tmp_path):
    a = tokenizer.get_tokenizer(data_config(data_dir=str(tmp_path / "a")), VOCAB)
    b = tokenizer.get_tokenizer(data_config(data_dir=str(tmp_path / "b")), VOCAB)
    assert a.serialized_model_proto() == b.serialized_model_proto()


def test_a_given_tokenizer_path_is_loaded(tmp_path):
    trained = tokenizer.get_tokenizer(data_config(data_dir=str(tmp_path / "train")), VOCAB)
    path = tmp_path / "given.model"
    path.write_bytes(trained.serialized_model_proto())
    d = data_config(data_dir=str(tmp_path / "elsewhere"), tokenizer_path=str(path))
    loaded = tokenizer.get_tokenizer(d, 1024)                   # smaller than the model dim: fine
    assert loaded.serialized_model_proto() == trained.serialized_model_proto()
    assert not (tmp_path / "elsewhere" / "tokenizers").exists()  # nothing trained
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer_path.*config\.model\.vocab_size"):
        tokenizer.get_tokenizer(d, VOCAB - 1)


def test_tokenizer_path_errors_name_the_field_and_path(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=r"config\.data\.tokenizer_path.*nope\.model"):
        tokenizer.get_tokenizer(data_config(tokenizer_path=missing), VOCAB)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer_path.*garbage\.model"):
        tokenizer.get_tokenizer(data_config(tokenizer_path=str(garbage)), VOCAB)


def test_too_small_vocab_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.model\.vocab_size"):
        tokenizer.get_tokenizer(data_config(data_dir=str(tmp_path)), 200)


def test_a_directory_as_tokenizer_path_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer_path: .* is a directory"):
        tokenizer.get_tokenizer(data_config(tokenizer_path=str(tmp_path)), VOCAB)
