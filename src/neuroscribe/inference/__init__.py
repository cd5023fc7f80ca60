"""ONNX Runtime inference: bundles, providers, KV-cache decode loop, the engine (never imports torch).

``bundle`` (layout, manifest, checksums), ``providers`` (device choice, silent CUDA fallback),
``decode`` (greedy, beam search, stop rules, repetition guards), ``engine`` (:class:`Engine`:
sessions, warm-up, batching, tokenizer, reports from series), ``command`` (``neuroscribe infer``).
This package imports nothing heavy on its own: import the module you need (docs/inference.md).
"""
