"""Hugging Face datasets as a text source (built on the fly, offline), direct sharding, and bad input."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers import AutoTokenizer

from streamd.config import ConfigError, SiteSpec, SourceConfig, StreamdConfig, load_config
from streamd.identity import model_content_hash, site_id
from streamd.produce.text import SourceError, iter_documents, iter_source

datasets = pytest.importorskip("datasets")

TEXTS = [f"document number {i} says " + "words " * (i % 9) for i in range(40)]


@pytest.fixture
def parquet_dir(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))}).to_parquet(str(d / "part-0.parquet"))
    return d


def test_parquet_dir_saved_dataset_streaming_and_shuffle(parquet_dir, tmp_path):
    assert list(iter_source(SourceConfig(kind="hf", dataset=str(parquet_dir)))) == TEXTS
    cfg = SourceConfig(kind="hf", dataset="parquet", data_files=[str(parquet_dir / "part-0.parquet")], streaming=True)
    assert list(iter_source(cfg)) == TEXTS
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS})}).save_to_disk(str(saved))
    assert list(iter_source(SourceConfig(kind="hf", dataset=str(saved), text_field="body"))) == TEXTS
    shuffled = list(iter_source(SourceConfig(kind="hf", dataset=str(parquet_dir), shuffle_buffer=8, seed=3,
                                             streaming=True)))
    assert sorted(shuffled) == sorted(TEXTS) and shuffled != TEXTS
    again = list(iter_source(SourceConfig(kind="hf", dataset=str(parquet_dir), shuffle_buffer=8, seed=3,
                                          streaming=True)))
    assert again == shuffled  # the seed fixes the order


def test_pretokenized_column_is_checked_against_the_vocabulary(tmp_path):
    d = tmp_path / "tok"
    rows = [[5, 6, 7], [1, 2, 999], [], [3] * 70]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(d))
    errors = []
    cfg = SourceConfig(kind="hf", dataset=str(d), input_ids_field="input_ids")
    docs = [doc for doc, _ in iter_documents(cfg, vocab_size=512, on_error=errors.append)]
    assert docs == [[5, 6, 7], [], [3] * 70]
    assert errors == ["out_of_vocabulary", "empty"]


def test_missing_column_dataset_and_extra_are_clear_errors(parquet_dir, tmp_path, monkeypatch):
    with pytest.raises(SourceError, match=r"source.text_field: column 'body' is not in dataset .*columns: text, n"):
        iter_source(SourceConfig(kind="hf", dataset=str(parquet_dir), text_field="body"))
    with pytest.raises(SourceError, match=r"source.input_ids_field: column 'ids'"):
        iter_source(SourceConfig(kind="hf", dataset=str(parquet_dir), input_ids_field="ids"))
    with pytest.raises(SourceError, match="cannot be loaded"):
        iter_source(SourceConfig(kind="hf", dataset="no-such-user/no-such-dataset"))
    with pytest.raises(ConfigError, match="source.kind=hf needs source.dataset"):
        load_config(sets=["producer.source.kind=hf"])
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "datasets" else real_import(name, *a, **k))
    with pytest.raises(SourceError, match=r"pip install 'streamd\[hf\]'"):
        iter_source(SourceConfig(kind="hf", dataset=str(parquet_dir)))


def test_direct_shards_are_disjoint_and_cover_the_source(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("\n\n".join(f"doc {i}" for i in range(10)))
    cfg = SourceConfig(kind="files", paths=[str(tmp_path / "a.txt")])
    shards = [[m.doc_id for _, m in iter_documents(cfg, shard=(i, 3))] for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and shards[1] == [1, 4, 7]
    monkeypatch.setenv("STREAMD_PRODUCER__SHARD__INDEX", "2")
    monkeypatch.setenv("STREAMD_PRODUCER__SHARD__COUNT", "4")
    assert load_config().producer.shard.model_dump() == {"index": 2, "count": 4}
    with pytest.raises(ConfigError, match=r"producer.shard.index \(4\) must be below"):
        load_config(sets=["producer.shard.index=4"])


@pytest.mark.parametrize("pretokenized", [False, True])
def test_hf_dataset_end_to_end_into_a_trained_sae(kafka_cfg, tiny_llama_dir, tmp_path, pretokenized):
    from streamd.config import SAEConfig
    from streamd.produce.producer import ActivationProducer
    from streamd.train.trainer import Trainer
    from tests.streamd_testing import trainer_config

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = [" ".join(TEXTS[i % len(TEXTS)] for i in range(j, j + 6)) for j in range(60)]
    d = tmp_path / "ds"
    if pretokenized:
        datasets.Dataset.from_dict({"input_ids": tok(texts, add_special_tokens=False).input_ids}).save_to_disk(str(d))
        source = dict(kind="hf", dataset=str(d), input_ids_field="input_ids")
    else:
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(d))
        source = dict(kind="hf", dataset=str(d))
    cfg = StreamdConfig(kafka=kafka_cfg, producer=dict(
        model_path=str(tiny_llama_dir), sites=[SiteSpec(site="resid_post", layer=1)], context_length=32,
        batch_size=8, source=source, producer_id="hf", torch_threads=1, metrics_port=0))
    published = ActivationProducer(cfg).run()
    assert published == sum(len(ids) for ids in tok(texts, add_special_tokens=False).input_ids)

    sid = site_id(model_content_hash(tiny_llama_dir), "resid_post", 1)
    tcfg = trainer_config(kafka_cfg, tmp_path / "run", d_in=64, site_id=f"{sid:016x}", max_tokens=2048,
                          saes=[SAEConfig(name="t", architecture="topk", expansion_factor=2, k=4)])
    trained = Trainer(tcfg).run()
    assert trained >= 2048
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
