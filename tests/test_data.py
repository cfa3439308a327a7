"""The data pipeline on real corpora: TFDS array_record sources -> grain -> packed batches.

The embedded corpus and a 512-piece tokenizer are built once per session in the session
cache (conftest's MLA_RMT_CACHE); other corpora live in tmp dirs.
"""
import json
import os
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from mla_rmt import data, presets, tokenizer
from mla_rmt.model_config import ConfigError

VOCAB = 512


def make_config(**data_fields):
    c = presets.base_config()
    c.model.vocab_size = VOCAB
    c.data.seq_len = 32
    c.data.global_batch_size = 4
    c.data.update(data_fields)
    return c


@pytest.fixture(scope="session")
def tok(data_cache):
    del data_cache  # ordering: the session cache env var is set first
    return tokenizer.get_tokenizer(make_config().data, VOCAB)


@pytest.fixture(scope="session")
def tok_path(tok):
    del tok
    return os.fspath(tokenizer.model_path(make_config().data, VOCAB))


@pytest.fixture(scope="session")
def kjv_verses():
    with data.kjv_path().open() as f:
        return [json.loads(line)["text"] for line in f]


def texts(data_config, split):
    return list(data.iter_texts(data_config, split))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])


def stream_documents(batches, tok):
    """The complete documents (as text) in the token stream the batches were cut from.

    Consecutive rows are consecutive seq_len + 1 chunks: row = inputs + last target."""
    stream = np.concatenate([np.append(row_in, row_tg[-1]) for b in batches
                             for row_in, row_tg in zip(b["inputs"], b["targets"])])
    ends = np.flatnonzero(stream == tok.eos_id())
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(stream[s:e].tolist()) for s, e in zip(starts, ends)]


# --- the embedded corpus -----------------------------------------------------------------


def test_embedded_is_a_tfds_array_record_source(kjv_verses):
    c = make_config()
    train, val = data.data_source(c.data, "train"), data.data_source(c.data, "validation")
    assert type(train).__name__ == "ArrayRecordDataSource"
    assert len(train) + len(val) == 1189       # chapters of the KJV
    assert len(val) == len(range(0, 1189, data.VALIDATION_EVERY))
    root = data.cache_dir(c.data) / "tfds" / "kjv_bible" / "1.0.0"
    assert sorted(p.name for p in root.glob("*.array_record-*")) == [
        "kjv_bible-train.array_record-00000-of-00001",
        "kjv_bible-validation.array_record-00000-of-00001"]
    text = train[7]["text"].decode("utf-8")
    heading, *verses = text.split("\n")
    assert re.fullmatch(r"[1-3 A-Za-z]+ \d+", heading)
    assert verses and set(verses) <= set(kjv_verses)


def test_train_and_validation_are_disjoint():
    c = make_config()
    train, val = texts(c.data, "train"), texts(c.data, "validation")
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)
    assert "Genesis 1" in {t.split("\n")[0] for t in val}    # chapter 0 is validation


# --- batches -------------------------------------------------------------------------------


def test_batches_shape_shift_and_vocab(tok):
    c = make_config()
    batches = take(data.make_train_iterator(c, tok), 60)
    for b in batches:
        assert set(b) == {"inputs", "targets"}
        for k in ("inputs", "targets"):
            assert b[k].shape == (4, 32) and b[k].dtype == np.int32
            assert b[k].min() >= 0 and b[k].max() < VOCAB
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    # Packing: the chunks are one stream of whole documents, each ended by EOS.
    docs = stream_documents(batches, tok)
    assert len(docs) >= 2
    assert set(docs) <= set(texts(c.data, "train"))


def test_same_seed_same_batches_other_seed_other_batches(tok):
    a = take(data.make_train_iterator(make_config(), tok), 3)
    b = take(data.make_train_iterator(make_config(), tok), 3)
    other = take(data.make_train_iterator(make_config(shuffle_seed=1), tok), 3)
    assert_same(a, b)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])


def test_get_state_set_state_resumes_exactly(tok):
    c = make_config()
    it = data.make_train_iterator(c, tok)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))   # as a checkpoint would store it
    expected = take(it, 5)
    it2 = data.make_train_iterator(c, tok)
    it2.set_state(state)
    assert_same(take(it2, 5), expected)


def test_orbax_checkpoint_round_trip(tok, tmp_path):
    c = make_config()
    it = data.make_train_iterator(c, tok)
    take(it, 4)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        manager.save(4, args=ocp.args.Composite(data=data.iterator_save_args(it)))
    expected = take(it, 5)
    it2 = data.make_train_iterator(c, tok)
    take(it2, 1)    # somewhere else, to be rewound
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        assert manager.latest_step() == 4
        manager.restore(4, args=ocp.args.Composite(data=data.iterator_restore_args(it2)))
    assert_same(take(it2, 5), expected)


def test_two_processes_read_disjoint_documents(tok):
    c = make_config(global_batch_size=8)
    shards = [data._shard(c, "train", i, 2) for i in range(2)]  # pylint: disable=protected-access
    shard_texts = [{r["text"] for r in s} for s in shards]
    assert not shard_texts[0] & shard_texts[1]
    assert len(shard_texts[0]) + len(shard_texts[1]) == len(data.data_source(c.data, "train"))
    seen = []
    for i in range(2):
        batches = take(data.make_train_iterator(c, tok, process_index=i, process_count=2), 12)
        assert batches[0]["inputs"].shape == (4, 32)
        seen.append(set(stream_documents(batches, tok)))
        assert seen[i] and seen[i] <= {t.decode() for t in shard_texts[i]}
    assert not seen[0] & seen[1]


def test_fixed_num_shards_gives_the_same_global_batches_on_one_and_two_processes(tok):
    c = make_config(global_batch_size=8)
    c.data.num_shards = 2
    one = take(data.make_train_iterator(c, tok), 6)
    two = [take(data.make_train_iterator(c, tok, process_index=i, process_count=2), 6) for i in range(2)]
    for step in range(6):
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(
                one[step][key], np.concatenate([two[0][step][key], two[1][step][key]]))
    # The state of the interleaved single-process iterator still round-trips.
    it = data.make_train_iterator(c, tok)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    it2 = data.make_train_iterator(c, tok)
    it2.set_state(state)
    assert_same(take(it2, 3), expected)
    eval_one = data.make_eval_batches(c, tok, 2)
    eval_two = [data.make_eval_batches(c, tok, 2, i, 2) for i in range(2)]
    np.testing.assert_array_equal(eval_one[1]["inputs"],
                                  np.concatenate([eval_two[0][1]["inputs"], eval_two[1][1]["inputs"]]))


def test_num_shards_must_split_over_processes(tok):
    c = make_config(global_batch_size=8)
    c.data.num_shards = 3
    with pytest.raises(ConfigError, match="config.data.num_shards"):
        data.make_train_iterator(c, tok, process_index=0, process_count=2)


def test_eval_batches_are_deterministic_and_unshuffled(tok):
    c = make_config()
    a = data.make_eval_batches(c, tok, 3)
    assert_same(a, data.make_eval_batches(c, tok, 3))
    first_doc = texts(c.data, "validation")[0]
    expected = (tok.encode(first_doc) + [tok.eos_id()])[:32]
    np.testing.assert_array_equal(a[0]["inputs"][0, :len(expected)], expected)
    halves = [data.make_eval_batches(make_config(global_batch_size=4), tok, 2, i, 2) for i in range(2)]
    assert halves[0][0]["inputs"].shape == (2, 32)
    assert not np.array_equal(halves[0][0]["inputs"], halves[1][0]["inputs"])


# --- text_files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_docs_glob(tmp_path_factory, kjv_verses):
    """41 one-verse files: documents 0, 20 and 40 are validation, 38 are train."""
    root = tmp_path_factory.mktemp("verses")
    for i, verse in enumerate(kjv_verses[:41]):
        (root / f"v{i:02d}.txt").write_text(verse)
    return str(root / "*.txt")


def test_text_files_source_builds_once_and_batches(tok, tmp_path):
    files = tmp_path / "corpus"
    files.mkdir()
    chapters = data.kjv_chapters()
    for i, chapter in enumerate(chapters[:24]):
        (files / f"c{i:02d}.txt").write_text(chapter)
    big = "\n\n".join(chapters[100:160])                  # > MAX_DOC_CHARS: split into blocks
    assert len(big) > data.MAX_DOC_CHARS
    (files / "z_big.txt").write_text(big)
    c = make_config(source="text_files", text_glob=str(files / "*.txt"),
                    data_dir=str(tmp_path / "cache"))
    train, val = data.data_source(c.data, "train"), data.data_source(c.data, "validation")
    assert type(train).__name__ == "ArrayRecordDataSource"
    all_text = texts(c.data, "train") + texts(c.data, "validation")
    assert len(val) == 2 and len(all_text) == len(train) + len(val)   # docs 0 and 20
    assert set(chapters[:24]) <= set(all_text)
    blocks = [t for t in all_text if t not in chapters[:24]]
    assert len(blocks) >= 2 and all(t in big for t in blocks)
    assert sum(map(len, blocks)) == len(big)
    records = list(data.cache_dir(c.data).glob("text_files/*/text_files/1.0.0/*.array_record-*"))
    assert len(records) == 2
    mtimes = [os.stat(r).st_mtime_ns for r in records]
    data._builder.cache_clear()   # pylint: disable=protected-access  # look on disk afresh
    batches = take(data.make_train_iterator(c, tok), 3)
    assert batches[0]["inputs"].shape == (4, 32)
    assert [os.stat(r).st_mtime_ns for r in records] == mtimes   # reused, not rebuilt
    assert set(stream_documents(batches, tok)) <= set(texts(c.data, "train"))
    (files / "c00.txt").write_text("A changed file makes a new corpus.")
    assert len(texts(c.data, "validation")) == 2
    assert "A changed file makes a new corpus." in texts(c.data, "validation")


def test_text_files_every_epoch_is_reshuffled(tok_path, short_docs_glob, tmp_path):
    c = make_config(source="text_files", text_glob=short_docs_glob, data_dir=str(tmp_path),
                    tokenizer_path=tok_path)
    tok = tokenizer.get_tokenizer(c.data, VOCAB)
    train = texts(c.data, "train")
    assert len(train) == 38 and len(texts(c.data, "validation")) == 3
    docs = stream_documents(take(data.make_train_iterator(c, tok), 40), tok)
    assert len(docs) >= 2 * 38
    epoch0, epoch1 = docs[:38], docs[38:76]
    assert sorted(epoch0) == sorted(train) and sorted(epoch1) == sorted(train)
    assert epoch0 != epoch1


def test_eval_batches_cycle_a_short_split(tok_path, short_docs_glob, tmp_path):
    c = make_config(source="text_files", text_glob=short_docs_glob, data_dir=str(tmp_path),
                    tokenizer_path=tok_path)
    tok = tokenizer.get_tokenizer(c.data, VOCAB)
    val = texts(c.data, "validation")
    val_tokens = sum(len(tok.encode(t)) + 1 for t in val)
    n = 2 * val_tokens // (4 * 33) + 2                     # more than two passes over the split
    batches = data.make_eval_batches(c, tok, n)
    assert len(batches) == n
    assert stream_documents(batches, tok)[:2 * len(val)] == val + val


def test_text_files_glob_without_match_names_the_field(tok, tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    c = make_config(source="text_files", text_glob=pattern)
    with pytest.raises(ConfigError, match=r"config\.data\.text_glob.*" + re.escape(pattern)):
        data.make_train_iterator(c, tok)


def test_a_single_document_corpus_gets_the_modules_message(tok, tmp_path):
    (tmp_path / "only.txt").write_text("In the beginning was one document.\n")
    (tmp_path / "blank.txt").write_text("  \n")
    c = make_config(source="text_files", text_glob=str(tmp_path / "*.txt"),
                    data_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"config\.data\.text_glob: 2 file\(s\) make fewer than 2"):
        data.make_train_iterator(c, tok)


# --- tfds ----------------------------------------------------------------------------------


class LocalCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A small prepared dataset with a `text` feature, as a C4 copy would have."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "url": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        chapters = data.kjv_chapters()[:40]
        return {"train": self._generate_examples(chapters[:36]),
                "validation": self._generate_examples(chapters[36:])}

    def _generate_examples(self, docs):
        for i, text in enumerate(docs):
            yield i, {"text": text, "url": f"https://example.org/{i}"}


def test_tfds_source_reads_a_prepared_dataset(tok, tmp_path):
    LocalCorpus(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    for name in ("local_corpus", "local_corpus:1.0.0"):
        c = make_config(source="tfds", tfds_name=name, data_dir=str(tmp_path))
        assert len(data.data_source(c.data, "train")) == 36
        assert set(texts(c.data, "validation")) == set(data.kjv_chapters()[36:40])
        batches = take(data.make_train_iterator(c, tok), 3)
        assert batches[0]["inputs"].shape == (4, 32)
        assert set(stream_documents(batches, tok)) <= set(data.kjv_chapters()[:36])
        assert len(data.make_eval_batches(c, tok, 2)) == 2
    c = make_config(source="tfds", tfds_name="local_corpus", data_dir=str(tmp_path), text_key="body")
    with pytest.raises(ConfigError, match=r"config\.data\.text_key"):
        next(data.make_train_iterator(c, tok))


def test_tfds_source_errors_name_the_field(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"config\.data\.data_dir"):
        data.make_train_iterator(make_config(source="tfds", tfds_name="local_corpus"), tok)
    with pytest.raises(ConfigError, match=r"config\.data\.data_dir"):
        data.make_train_iterator(make_config(source="tfds", tfds_name="local_corpus",
                                             data_dir=str(tmp_path / "missing")), tok)
    with pytest.raises(ConfigError, match=r"config\.data\.tfds_name"):
        data.make_train_iterator(make_config(source="tfds", data_dir=str(tmp_path)), tok)
    with pytest.raises(ConfigError, match=r"config\.data\.tfds_name.*no_such_corpus"):
        data.make_train_iterator(make_config(source="tfds", tfds_name="no_such_corpus",
                                             data_dir=str(tmp_path)), tok)


# --- config errors -------------------------------------------------------------------------


@pytest.mark.parametrize("fields, process_count, match", [
    (dict(source="wikipedia"), 1, r"config\.data\.source.*wikipedia"),
    (dict(seq_len=0), 1, r"config\.data\.seq_len"),
    (dict(global_batch_size=-4), 1, r"config\.data\.global_batch_size"),
    (dict(global_batch_size=6), 4, r"config\.data\.global_batch_size.*divisible"),
    (dict(worker_count=-1), 1, r"config\.data\.worker_count"),
])
def test_config_errors_name_the_field(tok, fields, process_count, match):
    c = make_config(**fields)
    with pytest.raises(ConfigError, match=match):
        data.make_train_iterator(c, tok, 0, process_count)
    with pytest.raises(ConfigError, match=match):
        data.make_eval_batches(c, tok, 1, 0, process_count)
    if process_count == 1:
        with pytest.raises(ConfigError, match=match):
            data.validate(c)


def test_worker_processes_give_the_same_batches_and_resume(tok):
    c = make_config(worker_count=1)
    it = data.make_train_iterator(c, tok)
    try:
        first = take(it, 3)
        assert_same(first, take(data.make_train_iterator(make_config(), tok), 3))
        state = it.get_state()
        expected = take(it, 3)
    finally:
        it.close()
    it2 = data.make_train_iterator(c, tok)
    try:
        it2.set_state(state)
        assert_same(take(it2, 3), expected)
    finally:
        it2.close()
