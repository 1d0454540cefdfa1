"""The inspector: feature dashboards and downstream metrics of a checkpoint's SAEs on held-out text.

text (:mod:`.sample`) -> the clean and zero-ablated passes once per site (:func:`streamd.client.evaluate.site_baseline`)
-> per SAE: streaming statistics of every latent (:mod:`.topn`, :mod:`.stats`), logit effects (:mod:`.logits`),
downstream metrics -> a JSON-able dashboard (:mod:`.dashboard`) -> HTML (:mod:`.html`), written once
(``streamd features``, :mod:`.static`) or served while following a trainer (``streamd inspect``, :mod:`.follow`).
"""
