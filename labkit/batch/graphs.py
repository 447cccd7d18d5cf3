"""Batched steps as CUDA graphs, one per (rows bucket, tokens per row).

A batch of n active slots replays the graph of the smallest bucket >= n (1, 2, 4, ... rows); the
rows past n are padding in free slots. Only the fused layer kernels are captured: they read each
row's positions and keys from the cache themselves, so no mask is built and nothing waits for the
host. The attention grid spans the slot's whole length, so one graph serves every position.
Warm-up and capture write the cache's last positions, which no request reaches.
"""

from __future__ import annotations

from typing import Any

import torch

from labkit.graphs import GRAPH_HEADROOM, capture


def bucket(n: int) -> int:
    """The rows a step of n active slots replays: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


class BatchGraph:
    def __init__(self, engine: Any, cache: Any, rows: int, T: int) -> None:  # engine: labkit.engine.Engine
        device = engine.device
        last = cache.max_len
        assert T <= GRAPH_HEADROOM
        self.tokens = torch.zeros(rows, T, dtype=torch.long, device=device)  # (rows, T)
        self.input_pos = torch.arange(last - T, last, device=device).repeat(rows, 1)  # (rows, T): past every request
        self.first_positions = torch.arange(T, device=device)  # (T,)
        view = cache.rows(0, rows)
        self.logits = torch.empty(0)
        self.hidden: torch.Tensor | None = None  # (rows, T, D) the final hidden states, where the model keeps them
        self.keeps_hidden = engine.model.keep_hidden  # whether it was captured keeping them (BatchEngine captures it again if not)

        def body() -> None:
            self.logits = engine.model(self.tokens, self.input_pos, view, last, None, False, None)  # (rows, T, V)
            self.hidden = engine.model.last_hidden if engine.model.keep_hidden else None

        self.graph = capture(engine, body, lambda: None)

    def run(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens, input_pos (n, T), n <= rows -> logits (n, T, V), valid until the next replay."""
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens, non_blocking=True)
        self.input_pos[:n].copy_(input_pos, non_blocking=True)
        if n < self.tokens.shape[0]:  # padding: free slots' first positions
            self.tokens[n:].zero_()
            self.input_pos[n:] = self.first_positions
        self.graph.replay()
        return self.logits[:n]
