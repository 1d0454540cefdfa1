"""streamd: train sparse autoencoders online from a Kafka stream of language-model activations."""

__version__ = "0.1.0"


def load_sae(path_or_url: str, sae: str | None = None, **kwargs):
    """A trained SAE (``encode`` / ``decode`` in raw activation units) from an SAE, checkpoint or run directory,
    a ``checkpoints/latest`` file, or a trainer's URL (see :func:`streamd.client.load.load_sae` for ``token``,
    ``token_file``, ``cafile``, ``cache_dir``)."""
    from streamd.client.load import load_sae as _load

    return _load(path_or_url, sae, **kwargs)


__all__ = ["__version__", "load_sae"]
