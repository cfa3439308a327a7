"""The SentencePiece tokenizer: a given model file (local or gs://), or one trained on the
training split on first use and cached under the data cache dir.

Trained models follow the LLaMA recipe at small scale: BPE with byte fallback (any text
encodes, nothing maps to <unk>), identity normalisation (decode(encode(s)) == s), digits
split, an EOS id and no BOS. Layout: 0 = <unk>, 1 = </s> (EOS), 2..257 = bytes, then merges.
"""
import io
import os
import time
import uuid
from typing import Iterable, Iterator

import ml_collections
import sentencepiece as spm
from absl import logging
from etils import epath

from mla_rmt import data
from mla_rmt.model_config import ConfigError

RECIPE = "bpe_bytes_v2"         # part of the cache key: change it when the training recipe changes
TRAIN_THREADS = 1               # the trained model depends on the trainer's thread count: fixed,
                                # every machine trains the same model from the same corpus
TRAIN_MAX_CHARS = 20_000_000    # text read for training (the whole KJV is ~4M)
MAX_LINE_CHARS = 8_192          # longer lines are cut into pieces for the trainer


def get_tokenizer(data_config: ml_collections.ConfigDict, vocab_size: int) -> spm.SentencePieceProcessor:
    """config.data.tokenizer_path if set, else the cached (or newly trained) corpus model."""
    if data_config.tokenizer_path:
        sp = load(data_config.tokenizer_path)
        where = f"config.data.tokenizer_path={data_config.tokenizer_path!r}"
    else:
        sp = _cached_or_trained(data_config, vocab_size)
        where = f"the trained model {model_path(data_config, vocab_size)}"
    if sp.get_piece_size() > vocab_size:
        raise ConfigError(f"config.data.tokenizer_path: {where} has {sp.get_piece_size()} pieces, "
                          f"more than config.model.vocab_size={vocab_size}")
    if sp.eos_id() < 0:
        raise ConfigError(f"config.data.tokenizer_path: {where} has no EOS id")
    return sp


def load(path: str) -> spm.SentencePieceProcessor:
    """Loads a model from a local or gs:// path (read as bytes through etils.epath)."""
    p = epath.Path(os.path.expanduser(path))
    try:
        if not p.exists():
            raise FileNotFoundError(f"config.data.tokenizer_path: no SentencePiece model at {path!r}")
        if p.is_dir():
            raise ConfigError(f"config.data.tokenizer_path: {path!r} is a directory, not a "
                              "SentencePiece model file")
        return spm.SentencePieceProcessor(model_proto=p.read_bytes())
    except ImportError as e:   # gs:// through etils.epath needs gcsfs
        raise ConfigError(f"config.data.tokenizer_path: cannot read {path!r} ({e}); gs:// paths "
                          "need the gcsfs package (pip install gcsfs)") from e
    except RuntimeError as e:
        raise ConfigError(f"config.data.tokenizer_path: {path!r} is not a SentencePiece model: {e}") from e


def model_path(data_config: ml_collections.ConfigDict, vocab_size: int) -> epath.Path:
    """Cache file of the model trained on this corpus with this vocab size."""
    name = f"{data.corpus_id(data_config)}-{RECIPE}-{vocab_size}.model"
    return data.cache_dir(data_config) / "tokenizers" / name


def _cached_or_trained(data_config, vocab_size) -> spm.SentencePieceProcessor:
    path = model_path(data_config, vocab_size)
    if path.exists():
        logging.info("Loading the cached tokenizer %s", path)
        return spm.SentencePieceProcessor(model_proto=path.read_bytes())
    start = time.perf_counter()
    texts = data.iter_texts(data_config, data_config.train_split, max_chars=TRAIN_MAX_CHARS)
    proto = train(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then replace: readers never see half a model, and of processes training at once
    # (trials started together on a fresh cache) the last replace wins with the same bytes.
    tmp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(proto)
    tmp.replace(path)
    logging.info("Trained a %d-piece tokenizer on %s/%s in %.1f s -> %s", vocab_size,
                 data_config.source, data_config.train_split, time.perf_counter() - start, path)
    return spm.SentencePieceProcessor(model_proto=proto)


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Trainer sentences: the non-empty lines of each document, cut to MAX_LINE_CHARS."""
    for text in texts:
        for line in text.splitlines():
            for i in range(0, len(line), MAX_LINE_CHARS):
                if line[i:i + MAX_LINE_CHARS].strip():
                    yield line[i:i + MAX_LINE_CHARS]


def train(texts: Iterable[str], vocab_size: int) -> bytes:
    """A serialized BPE model trained on the texts; deterministic (all lines, in order)."""
    spm.set_random_generator_seed(0)
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts), model_writer=out, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995,
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            input_sentence_size=0, shuffle_input_sentence=False,  # every line, in order
            max_sentence_length=4 * MAX_LINE_CHARS, num_threads=TRAIN_THREADS,
            minloglevel=2)
    except RuntimeError as e:
        raise ConfigError(f"config.model.vocab_size: cannot train a {vocab_size}-piece tokenizer "
                          f"on this corpus (byte fallback alone needs 258 + the corpus' "
                          f"characters): {e}") from e
    return out.getvalue()
