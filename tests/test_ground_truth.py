"""Ground truth through the whole training path: synthetic activations -> wire messages -> local Kafka broker ->
trainer (ingestion thread, shuffle buffer, normalisation, schedules) -> exported checkpoint -> recovered dictionary.

Data-parallel (two ranks of half the batch each, the same total batch) must reach the same bar.

Difficulty (tests.synthetic defaults): d_in 64, 256 true features (4x overcomplete), 5 active per token on
average, Zipf exponent 0.5 (commonest feature on 16% of tokens, rarest on 1%), noise std 0.01; sent as fp16.
SAEs are 512 wide (2x the true count), seeded independently of the dictionary. Bars: TopK (k 8) recovers >= 90%
of the true directions at cosine > 0.9; ReLU (L1 3.0) >= 80%, looser because the L1 penalty shrinks activations
and converges slower. Recovery is about directions, so the trainer's input scaling (E||x|| = sqrt(d_in)), which
the export folds back into W_dec (rows divided by the scale), does not change it.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from streamd import load_sae
from streamd.config import SAEConfig
from streamd.train.learner import Learner
from tests.synthetic import SyntheticDictionary, recovery
from streamd.train.trainer import Trainer
from tests.streamd_testing import publish, trainer_config, write_config

torch.set_num_threads(2)

BATCH = 1024
BUFFER = 16 * BATCH
EVAL = 8192
TRAIN_TOKENS = 500 * BATCH
SAES = [
    SAEConfig(name="topk", architecture="topk", d_sae=512, k=8, lr=3e-3, seed=3),
    SAEConfig(name="relu", architecture="relu", d_sae=512, l1_coefficient=3.0, lr=3e-3, seed=3),
]
BARS = {"topk": 0.9, "relu": 0.8}


def test_saes_trained_from_kafka_recover_the_dictionary(kafka_cfg, tmp_path):
    truth = SyntheticDictionary(seed=1)
    # every trained token, the held-out eval set and one buffer-full that is still untrained at the end
    acts = truth.sample(TRAIN_TOKENS + EVAL + BUFFER + BATCH, torch.Generator().manual_seed(2))
    t0 = time.monotonic()
    publish(kafka_cfg, acts, tokens_per_msg=2048)
    published_s = time.monotonic() - t0

    run = tmp_path / "run"
    cfg = trainer_config(
        kafka_cfg, run, d_in=truth.d_in, saes=SAES, buffer_tokens=BUFFER, batch_size=BATCH, eval_tokens=EVAL,
        norm_estimate_tokens=BUFFER, warmup_tokens=50 * BATCH, dead_window_tokens=100_000,
        density_window_tokens=100_000, max_tokens=TRAIN_TOKENS, every_tokens=None,
    )
    before = {s.name: recovery(truth.directions, Learner(s, truth.d_in, cfg.trainer).sae.W_dec) for s in SAES}
    trainer = Trainer(cfg)
    t0 = time.monotonic()
    assert trainer.run() == TRAIN_TOKENS
    trained_s = time.monotonic() - t0

    held_out = trainer.evaluate()
    print(f"\npublished {len(acts):,} tokens in {published_s:.1f}s, trained {TRAIN_TOKENS:,} in {trained_s:.1f}s;"
          f" scale {trainer.scale:.4f}")
    for s in SAES:
        learner = trainer.learners[s.name]
        after = recovery(truth.directions, learner.sae.W_dec)
        exported = load_sae(run, sae=s.name)
        from_checkpoint = recovery(truth.directions, exported.W_dec)
        dead = float(learner.dead_mask().float().mean())
        print(f"{s.name}: recovery@0.9 before {before[s.name]:.3f} after {after:.3f}"
              f" (checkpoint {from_checkpoint:.3f}); held-out L0 {held_out[s.name]['l0']:.2f}"
              f" FVU {held_out[s.name]['fvu']:.4f}; dead {dead:.1%}")
        assert before[s.name] < 0.1
        assert after >= BARS[s.name]
        assert from_checkpoint == after
        # the export folds the scale in: the decoder rows keep their directions, their norms shrink by the scale
        cos = torch.nn.functional.cosine_similarity(exported.W_dec, learner.sae.W_dec, dim=-1)
        assert cos.min() > 0.9999
        assert torch.allclose(exported.W_dec * trainer.scale, learner.sae.W_dec, rtol=1e-4, atol=1e-6)
    assert 7 < held_out["topk"]["l0"] <= 8 and held_out["topk"]["fvu"] < 0.15
    assert held_out["relu"]["fvu"] < 0.35


def test_data_parallel_ranks_reach_the_same_recovery_bar(broker, tmp_path):
    """Two ranks of batch 512 (a total batch of 1024, as above) train the TopK SAE from a 4-partition topic to the
    single process's bar; the exported checkpoint is rank 0's, which every rank agrees with bit for bit."""
    kafka = broker.config(topic="truth", partitions=4, session_timeout_ms=6000)
    ranks = 2
    truth = SyntheticDictionary(seed=1)
    acts = truth.sample(TRAIN_TOKENS + EVAL + ranks * (BUFFER + BATCH), torch.Generator().manual_seed(2))
    publish(kafka, acts, tokens_per_msg=2048, partitions=4)
    run = tmp_path / "run"
    cfg = trainer_config(
        kafka, run, d_in=truth.d_in, saes=SAES[:1], buffer_tokens=BUFFER // ranks, batch_size=BATCH // ranks,
        eval_tokens=EVAL, norm_estimate_tokens=BUFFER // ranks, warmup_tokens=50 * BATCH, dead_window_tokens=100_000,
        density_window_tokens=100_000, max_tokens=TRAIN_TOKENS, every_tokens=None, collective_timeout_seconds=60,
    )
    t0 = time.monotonic()
    cfg_path = write_config(cfg, tmp_path / "c.yaml")
    done = subprocess.run([sys.executable, "-m", "streamd", "train", "--config", str(cfg_path), "--world-size",
                           str(ranks)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = recovery(truth.directions, load_sae(run, sae="topk").W_dec)
    print(f"\n{ranks} ranks x batch {BATCH // ranks}: recovery@0.9 {got:.3f} in {time.monotonic() - t0:.1f}s")
    assert got >= BARS["topk"]
