"""ONNX Runtime inference: sessions and providers, tokenizer, decode loop (never imports torch).

Filled in by the inference issue; the service runs without it until then.
"""
