"""Conversion between mmscale models and Hugging Face `transformers` folders.

One adapter module per external format (`llama`, `llava`, `mllama`), each mapping configs
and state-dict keys in both directions, so import of released weights and export for
release share one key map.
"""
