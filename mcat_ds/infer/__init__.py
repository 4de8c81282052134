"""Inference in one place: ``requests`` (which (utterance, direction) pairs to decode), ``decoding``
(the fast greedy loop over the KV cache), ``translate`` (``mcat translate``: batching, resume,
ranks, outputs) and ``export`` (``mcat export``: merged Hugging Face checkpoints for serving)."""
