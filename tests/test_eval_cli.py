"""`streamd eval` end to end on a tiny Llama: a trained SAE's reconstruction, spliced into the model, keeps more
of its next-token loss than an untrained one (same architecture, k and seed; its lr is ~0), and the numbers printed
are sane: scores within [-1, 1.01], KL >= 0, 0 < L0 <= k. The site comes from the checkpoint, not the config (whose
default, layer 15, the 4-layer model does not have). Also: a trainer's URL and an SAE directory as the argument."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from pydoc_data.topics import topics

from streamd.run.checkpoints import CheckpointStore
from streamd.config import KafkaConfig, MetricsConfig, ProducerConfig, SAEConfig, SiteSpec, SourceConfig, StreamdConfig
from streamd.client.evaluate import eval_checkpoint, held_out_texts
from streamd.produce.capture import ActivationCapture
from streamd.produce.model import load_frozen_model
from streamd.produce.packing import pack_documents
from streamd.run.server import StatusServer
from streamd.produce.text import files
from streamd.train.trainer import Trainer
from tests.streamd_testing import trainer_config

torch.set_num_threads(2)

SITE = SiteSpec(site="resid_post", layer=2)
CONTEXT = 64
EVAL_DOCS = 24
K = 8
TRAIN_TOKENS = 200 * 256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """Twenty pydoc topics in one .txt file (318 paragraph documents, fewer than eval's default skip of 500)."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(topics[key] for key in sorted(topics)[:20]))
    return path, list(files([str(path)]))


@pytest.fixture(scope="module")
def lm_dir(tiny_llama_dir, corpus, tmp_path_factory) -> Path:
    """The tiny Llama after 200 Adam steps on the corpus (loss 6.2 -> ~4.5). A random model predicts nearly
    uniformly, so ablating a site barely moves its loss and the CE score would be noise; a trained one relies on
    its residual stream."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.stack([w.input_ids for w in pack_documents(tok, corpus[1], CONTEXT)])
    opt, gen = torch.optim.Adam(model.parameters(), lr=3e-3), torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = ids[torch.randint(len(ids), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 5.0  # from ln(512) = 6.2
    out = tmp_path_factory.mktemp("lm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _capture(model_dir: Path, docs: list[str]) -> np.ndarray:
    loaded = load_frozen_model(model_dir)
    windows = list(pack_documents(loaded.tokenizer, docs, CONTEXT))
    with ActivationCapture(loaded.model, [SITE]) as capture:
        acts = capture(torch.stack([w.input_ids for w in windows]))[(SITE.site, SITE.layer)]
    return acts[torch.stack([w.keep_mask for w in windows])].numpy()


@pytest.fixture(scope="module")
def run_dir(lm_dir, corpus, tmp_path_factory) -> Path:
    """A run with two SAEs trained on the same batches: ``trained`` (lr 3e-3) and ``untrained`` (lr 1e-12)."""
    tmp_path = tmp_path_factory.mktemp("run")
    np.save(tmp_path / "acts.npy", _capture(lm_dir, corpus[1][:-EVAL_DOCS]))  # eval reads the last docs
    saes = [SAEConfig(name=name, architecture="topk", expansion_factor=4, k=K, lr=lr, seed=1)
            for name, lr in (("trained", 3e-3), ("untrained", 1e-12))]
    cfg = trainer_config(KafkaConfig(), tmp_path / "run", d_in=64, saes=saes, site=SITE, buffer_tokens=4096,
                         batch_size=256, norm_estimate_tokens=4096, every_tokens=None, max_tokens=TRAIN_TOKENS)
    assert Trainer(cfg, activation_file=tmp_path / "acts.npy", loop_file=True).run() == TRAIN_TOKENS
    return tmp_path / "run"


def _eval_cli(run: Path, model: Path, text: Path, tmp_path: Path) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        [sys.executable, "-m", "streamd", "eval", str(run), "--model", str(model), "--docs", str(EVAL_DOCS),
         "--set", "producer.source.kind=files", "--set", f"producer.source.paths=[{text}]",
         "--set", f"producer.context_length={CONTEXT}", "--set", "producer.torch_threads=2"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "STREAMD_CACHE": str(tmp_path / "cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = {}
    for line in out.stdout.splitlines():
        name, *pairs = line.split()
        results[name] = {k: float(v) for k, v in (p.split("=") for p in pairs)}
    return results


def test_eval_cli_scores_trained_above_untrained(run_dir, lm_dir, corpus, tmp_path):
    text, docs = corpus
    cfg = StreamdConfig(producer=ProducerConfig(source=SourceConfig(kind="files", paths=[str(text)])))
    assert held_out_texts(cfg, EVAL_DOCS) == docs[-EVAL_DOCS:]  # the source is shorter than the default skip

    results = _eval_cli(run_dir, lm_dir, text, tmp_path)
    print("\n" + "\n".join(f"{n}: {r}" for n, r in results.items()))
    assert set(results) == {"trained", "untrained"}
    for r in results.values():
        assert {"ce_loss_score", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "fvu", "l0", "n_tokens"} <= r.keys()
        assert math.isfinite(r["ce_loss_score"]) and -1 <= r["ce_loss_score"] <= 1.01
        assert r["kl_sae"] >= 0 and r["ce_zero"] > r["ce_clean"] and 0 < r["l0"] <= K
    trained, untrained = results["trained"], results["untrained"]
    assert trained["ce_clean"] == untrained["ce_clean"] and trained["n_tokens"] == untrained["n_tokens"] > 1000
    # measured: scores 0.99 vs 0.87, KL 0.003 vs 0.135, FVU 0.013 vs 0.78
    assert trained["ce_loss_score"] > 0.9 and 1 - trained["ce_loss_score"] < (1 - untrained["ce_loss_score"]) / 4
    assert trained["kl_sae"] < untrained["kl_sae"] / 4 and trained["fvu"] < untrained["fvu"] / 4


def test_eval_from_a_trainer_url_matches_the_sae_directory(run_dir, lm_dir, corpus, tmp_path, monkeypatch):
    """A URL pulls the whole latest checkpoint (with metrics.checkpoint_token) and evaluates every SAE in it; an
    SAE directory evaluates that SAE alone, with the same numbers."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("STREAMD_CACHE", str(tmp_path / "cache"))
    cfg = StreamdConfig(
        producer=ProducerConfig(model_path=str(lm_dir), context_length=CONTEXT,
                                source=SourceConfig(kind="files", paths=[str(corpus[0])])),
        metrics=MetricsConfig(checkpoint_token="s3cret"),
    )
    store = CheckpointStore(run_dir, writer=False)
    server = StatusServer("127.0.0.1", 0, CollectorRegistry(), store, token="s3cret").start()
    try:
        by_url = eval_checkpoint(cfg, server.url, n_docs=8)
    finally:
        server.stop()
    assert (tmp_path / "cache" / "pulls").is_dir()  # STREAMD_CACHE wins over XDG_CACHE_HOME (streamd.files)
    by_dir = eval_checkpoint(cfg, str(store.latest() / "trained"), n_docs=8)
    assert set(by_url) == {"trained", "untrained"} and set(by_dir) == {"trained"}
    assert by_url["trained"] == by_dir["trained"]


def test_features_cli_scores_trained_above_untrained(run_dir, lm_dir, corpus, tmp_path):
    """`streamd features` on the same run: static pages and JSON for both SAEs, the inspector's metrics (one shared
    baseline) rank the trained SAE above the untrained one on text neither SAE trained on."""
    import json

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(corpus[1][-EVAL_DOCS:]))  # the SAEs trained on the other documents
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "streamd", "features", str(run_dir), "--out", str(site), "--model", str(lm_dir),
         "--set", f"inspect.source={{kind: files, paths: [{held_out}]}}", "--set", "inspect.tokens=4096",
         "--set", "inspect.device=cpu", "--set", f"producer.context_length={CONTEXT}",
         "--set", "producer.torch_threads=2"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "STREAMD_CACHE": str(tmp_path / "cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str(site / "index.html")
    m = {name: json.loads((site / name / "dashboard.json").read_text())["metrics"] for name in ("trained", "untrained")}
    print("\n" + "\n".join(f"{n}: {r}" for n, r in m.items()))
    trained, untrained = m["trained"], m["untrained"]
    assert trained["ce_clean"] == untrained["ce_clean"] and trained["ce_zero"] == untrained["ce_zero"]
    assert trained["fvu"] < untrained["fvu"] / 4 and trained["kl"] < untrained["kl"] / 4
    assert trained["ce_zero"] - trained["ce_clean"] > 0.5  # a gap this wide makes the score meaningful here
    assert trained["ce_loss_score"] > untrained["ce_loss_score"]
    for name in ("trained", "untrained"):
        assert (site / name / "index-density.html").is_file() and any((site / name / "latent").glob("*.html"))
