"""Captioning images into text: ``captioners`` (the registry, packaged and Hugging Face captioners), ``decoder`` (the
greedy GPT-2 decoding kernel) and ``pipeline`` (``mmfuse caption`` into a CSV, ``fill_missing_captions``)."""
