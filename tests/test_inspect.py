"""The inspector's engine on a real tiny model: the streaming top-N equals a brute-force dense computation and its
memory is the stated formula; a planted feature with a known answer tops its latent (and its logit effects) in the
JSON and the HTML; a checkpoint that does not fit the model is refused naming both values; the default held-out text
is not what the producers read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from streamd.client import locate
from streamd.client.evaluate import site_baseline
from streamd.config import InspectConfig, SiteSpec
from streamd.inspect.inspection import Inspector
from streamd.inspect.sample import sample_windows
from streamd.inspect.static import write_static
from streamd.inspect.stats import SampleLayout, latent_stats
from streamd.inspect.topn import PAD_ID, state_bytes
from streamd.produce.capture import blocks
from streamd.produce.model import load_frozen_model
from streamd.run.checkpoints import CheckpointStore, SAEExport
from streamd.sae import load_exported

torch.set_num_threads(2)
CONTEXT = 32
DOCS = [topics[k] for k in sorted(topics)[20:40]]  # distinct documents: no repeated window, so no tied activations


def random_sae(d_in: int, d_sae: int, threshold: float, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random JumpReLU weights whose pre-activations are ~N(0, 1) on inputs of per-feature std ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_sae, generator=gen) / (d_in**0.5 * scale)
    return {"W_enc": w, "b_enc": torch.zeros(d_sae), "W_dec": w.T.contiguous(), "b_dec": torch.zeros(d_in),
            "threshold": torch.full((d_sae,), threshold)}


JUMPRELU = {"architecture": "jumprelu", "apply_b_dec_to_input": True}


def write_checkpoint(run_dir: Path, hook: str, weights: dict[str, torch.Tensor], name: str = "planted") -> Path:
    store = CheckpointStore(run_dir)
    export = SAEExport(name, dict(JUMPRELU), weights, torch.zeros(weights["b_enc"].shape[0]))
    return store.write(1000, [export], {}, {}, {}, hook)


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_frozen_model(str(tiny_llama_dir))


def test_top_n_equals_brute_force_and_memory_is_the_formula(loaded):
    n, w, width = 6, 3, 48
    windows = sample_windows(loaded.tokenizer, iter(DOCS), CONTEXT, 2048)
    base = site_baseline(loaded, SiteSpec(layer=1), windows, batch_size=5)
    sae = load_exported(JUMPRELU, random_sae(loaded.d_model, width, 1.0, scale=float(base.acts.std())))
    sae.requires_grad_(False)
    stats = latent_stats(sae, base, SampleLayout.of(base, w), top_n=n, intervals=3, per_interval=2, bins=8)

    ids = torch.cat([b.ids for b in base.batches])
    keep = torch.zeros(ids.numel(), dtype=torch.bool)
    offsets = torch.tensor([0] + [b.ids.numel() for b in base.batches]).cumsum(0)
    keep[torch.cat([b.keep_idx + o for b, o in zip(base.batches, offsets)])] = True
    assert torch.equal(keep, torch.cat([w.keep_mask for w in windows]))
    dense = torch.zeros(ids.numel(), width)
    dense[keep] = sae.encode(base.acts)  # every published token's activations at once
    padded = torch.nn.functional.pad(ids, (w, w), value=PAD_ID)
    acts_padded = torch.nn.functional.pad(dense.reshape(*ids.shape, width), (0, 0, w, w))
    fires = (dense > 0).sum(0)
    latents = fires.argsort(descending=True)[::4][:10].tolist()
    assert len(latents) == 10 and all(fires[i] > n for i in latents)
    for i in latents:
        vals, pos = dense[:, i].topk(n)
        got = stats.top.token[i]
        assert torch.equal(stats.top.scores[i], vals) and torch.equal(dense[got, i], vals)
        # the same tokens, but for ties at the last place (the token after a BOS repeats its context exactly)
        assert set(got[vals > vals[-1]].tolist()) == set(pos[vals > vals[-1]].tolist())
        b, t = got // CONTEXT, got % CONTEXT
        span = t[:, None] + torch.arange(2 * w + 1)
        assert torch.equal(stats.top.ctx_ids[i].long(), padded[b[:, None], span])
        assert torch.equal(stats.top.ctx_acts[i], acts_padded[b[:, None], span, i])
    assert torch.equal(stats.fires, fires) and stats.n_tokens == int(keep.sum())
    assert torch.equal(stats.hist.sum(1).long(), fires)  # every firing lands in one bin of (0, max]
    for q, s in enumerate(stats.intervals):
        got = s.ctx_acts[:, :, w][s.scores > 0]
        peak = stats.max_act[:, None].expand_as(s.scores)[s.scores > 0]
        assert len(got) > 0 and bool(((got > peak * q / 3 - 1e-6) & (got <= peak * (q + 1) / 3 + 1e-6)).all())

    # memory: the formula, whatever the number of tokens
    assert stats.top.nbytes == state_bytes(width, n, w) == width * n * (12 + (2 * w + 1) * 8)
    longer = sample_windows(loaded.tokenizer, iter(DOCS * 2), CONTEXT, 4096)
    base2 = site_baseline(loaded, SiteSpec(layer=1), longer, batch_size=5)
    stats2 = latent_stats(sae, base2, SampleLayout.of(base2, w), top_n=n, intervals=1, per_interval=1, bins=2)
    assert stats2.n_tokens > 1.5 * stats.n_tokens and stats2.top.nbytes == stats.top.nbytes


@pytest.fixture(scope="module")
def planted_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with block 0's attention output and MLP down projections zeroed: resid_post of layer 0 is the
    token embedding itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    block = blocks(model)[0]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    out = tmp_path_factory.mktemp("planted")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def test_planted_feature_tops_its_latent_in_json_and_html(planted_dir, tmp_path):
    loaded = load_frozen_model(str(planted_dir))
    (t,) = loaded.tokenizer(" the", add_special_tokens=False).input_ids
    emb = loaded.model.get_input_embeddings().weight.detach()
    e_t = emb[t]
    direction = e_t / e_t.norm()
    others = torch.cat([emb[:t], emb[t + 1 :]]) @ direction
    threshold = float((others.max() + e_t.norm()) / 2)
    assert others.max() < threshold < e_t.norm()  # latent 0 fires on t's embedding and on no other token's

    weights = random_sae(loaded.d_model, 16, 1.0, seed=3, scale=float(emb.std()))
    weights["W_enc"][:, 0] = direction
    weights["W_dec"][0] = direction  # writes t's embedding back: through the tied unembedding it raises t most
    weights["threshold"][0] = threshold
    ckpt = write_checkpoint(tmp_path / "run", "blocks.0.hook_resid_post", weights)

    windows = sample_windows(loaded.tokenizer, iter(DOCS), CONTEXT, 2048)
    published = torch.cat([w.input_ids[w.keep_mask] for w in windows])
    cfg = InspectConfig(top_n=5, context_window=4)
    dash = Inspector(loaded, windows, cfg).inspect(locate.resolve(ckpt))["planted"]
    assert dash["checkpoint"] == ckpt.name and dash["hook"] == "blocks.0.hook_resid_post"
    lat = dash["latents"]["0"]
    assert len(lat["top"]) == 5 and all(e["tokens"][e["center"]] == " the" for e in lat["top"])
    assert lat["top"][0]["act"] == pytest.approx(float(e_t.norm()), rel=1e-3)
    assert lat["density"] == pytest.approx(float((published == t).sum()) / len(published))
    assert dash["index"][0]["top_tokens"] == [" the"]
    assert lat["logits"]["up"][0][0] == " the" and lat["logits"]["up"][0][1] > 0 > lat["logits"]["down"][0][1]
    assert "approximation" in dash["logit_note"]

    out = tmp_path / "site"
    write_static(dash_by_name := {"planted": dash}, out)
    assert json.loads((out / "planted" / "dashboard.json").read_text())["latents"]["0"]["top"] == lat["top"]
    page = (out / "planted" / "latent" / "0.html").read_text()
    top_row = page.split("<h2>top activations</h2>")[1].split("</tr>")[1]
    assert f"<mark class=hl title='{lat['top'][0]['act']:.4g}'> the</mark>" in top_row
    assert f"{lat['top'][0]['act']:.4g}" in top_row
    assert "http" not in page and "<script" not in page  # self-contained
    by_density = (out / "planted" / "index-density.html").read_text()
    order = [int(r.split(">")[0]) for r in by_density.split("data-latent=")[1:]]
    expect = sorted(range(16), key=lambda i: (-dash["index"][i]["density"], i))
    assert order == expect and set(dash_by_name) == {"planted"}


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(loaded, tmp_path):
    windows = sample_windows(loaded.tokenizer, iter(DOCS), CONTEXT, 256)
    inspector = Inspector(loaded, windows, InspectConfig())
    narrow = write_checkpoint(tmp_path / "a", "blocks.1.hook_resid_post", random_sae(32, 8, 0.1), "narrow")
    with pytest.raises(ValueError, match=r"narrow .*d_in 32, the model's d_model is 64"):
        inspector.inspect(locate.resolve(narrow))
    deep = write_checkpoint(tmp_path / "b", "blocks.9.hook_resid_post", random_sae(64, 8, 0.1), "deep")
    with pytest.raises(ValueError, match=r"blocks\.9\.hook_resid_post, the model has layers 0\.\.3"):
        inspector.inspect(locate.resolve(deep))


def test_the_default_held_out_text_is_not_what_the_producers_read(tmp_path):
    from streamd.config import FeedConfig, ProducerConfig, SourceConfig, StreamdConfig
    from streamd.inspect.sample import held_out_source, held_out_texts
    from streamd.produce.feed import held_out

    assert held_out_source(StreamdConfig())[0].corpus == "pydoc"  # the producers read kjv by default
    pydoc = StreamdConfig(producer=ProducerConfig(source=SourceConfig(corpus="pydoc")))
    assert held_out_source(pydoc)[0].corpus == "kjv"
    fed_pydoc = StreamdConfig(producer=ProducerConfig(source=SourceConfig(kind="kafka", topic="t")),
                              feed=FeedConfig(source=SourceConfig(corpus="pydoc")))
    assert held_out_source(fed_pydoc)[0].corpus == "kjv"

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(DOCS))
    feeder = StreamdConfig(producer=ProducerConfig(source=SourceConfig(kind="kafka", topic="t")),
                           feed=FeedConfig(source=SourceConfig(kind="files", paths=[str(text)]), holdout_fraction=0.3))
    docs = list(held_out_texts(feeder))
    assert docs and all(held_out(d, 0.3) for d in docs)  # the feeder's held-out slice: never published
    assert len(docs) < len(list(held_out_texts(StreamdConfig(inspect=InspectConfig(source=feeder.feed.source)))))
    with pytest.raises(ValueError, match="kafka text topic"):
        list(held_out_texts(StreamdConfig(inspect=InspectConfig(source=SourceConfig(kind="kafka", topic="t")))))


@pytest.mark.parametrize("skip", [0, 1])
def test_the_inspector_keeps_only_what_the_producer_publishes(tiny_llama_dir, skip):
    """A window that continues a document keeps its first ``producer.skip_positions`` after BOS out of the sample
    (the attention sink's massive activations there are never trained on), as the producer does: not scored, not
    spliced, not shown; with the policy off they are kept."""
    from streamd.config import StreamdConfig
    from streamd.inspect.inspection import build_inspector

    cfg = StreamdConfig.model_validate({"producer": {"model_path": str(tiny_llama_dir), "context_length": CONTEXT,
                                                     "skip_positions": skip, "torch_threads": 1},
                                        "inspect": {"tokens": 2048, "source": {"kind": "corpus", "corpus": "pydoc"}}})
    windows = build_inspector(cfg).windows
    continuing = [w for w in windows if w.carried > 0 or (w.doc_pos[1] > 0)]
    assert len(continuing) > 10
    assert all(bool(w.keep_mask[1]) == (skip == 0) for w in continuing)
