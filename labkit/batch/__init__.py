"""Batched decoding: many requests over one static cache (engine.py), continuous batching (scheduler.py)."""
