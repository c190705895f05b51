"""Inference: the KV cache, the prefill / decode engine, chunked prefill, generation."""
