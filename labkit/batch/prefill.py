"""Admission in one batched pass: the prompts of requests that join together, prefilled as rows of
one step per chunk, with batch-1 prefill's bits.

Why it keeps the bits. The engine prefills a prompt of up to the kernels' PROMPT_MAX_T tokens through
the fused layer kernels, in one pass (Engine.prefills_fused), and those kernels give a token the same
arithmetic whatever other rows and tokens share its step (fixed 16-row tiles, absolute split
boundaries in the attention, causal keys only). So the joining prompts run as rows of one step per
chunk of GRAPH_MAX_T positions, and every request starts from exactly the keys, values and logits
that batch-1 prefill gives it. A longer prompt is admitted on its own, by the engine's prefill (one
captured fused pass: 0.86 ms for a 100-token prompt on an H200; its seven 16-token steps 4.2 ms, staging
them with others' not measured), and so is one past PROMPT_MAX_T, which the engine prefills through
the PyTorch layers (GEMMs whose reduction order follows the number of rows).

Where. The rows run on a staging cache of a few positions per row (STAGE_ROWS rows: more prompts
join in groups), replayed as CUDA graphs per rows bucket when the batch uses graphs
(graphs.BatchGraph), eagerly otherwise; their keys and values are then copied into the batch's
slots. Rows are ordered longest prompt first, so a chunk runs only the rows whose prompts reach it.
An engine has one staging (`staged_prefill`, kept in its graph store, so every batch built on it
shares the captures, and a new cache drops it).
"""

from __future__ import annotations

import torch

from labkit.batch.graphs import BatchGraph, bucket
from labkit.batch.transfer import to_device
from labkit.engine import PREFILL_GRAPH_CHUNKS_MAX_T, Engine
from labkit.graphs import GRAPH_HEADROOM, GRAPH_MAX_T
from labkit.models.kvcache import KVCache

STAGE_ROWS = 64  # prompts prefilled together at most


def staged_prefill(engine: Engine, graphs: bool) -> StagedPrefill:
    """The engine's staging for batched admission (with CUDA graphs or eager)."""
    return engine.graphs.get(("staged-prefill", graphs), lambda: StagedPrefill(engine, STAGE_ROWS, graphs))


class StagedPrefill:
    def __init__(self, engine: Engine, rows: int, graphs: bool, longest: int | None = None) -> None:
        """rows: staging rows (joining requests at most); longest: the longest prompt staged (default:
        the longest the engine prefills through the fused kernels)."""
        self.engine, self.use_graphs = engine, graphs
        self.longest = longest or (max(GRAPH_MAX_T, PREFILL_GRAPH_CHUNKS_MAX_T) if graphs else engine.model.fused_max_t)
        L, _, H, _, D = engine.cache.k.shape
        chunks = -(-self.longest // GRAPH_MAX_T)
        self.cache = KVCache(L, rows, H, chunks * GRAPH_MAX_T + GRAPH_HEADROOM, D, dtype=engine.dtype, device=engine.device)  # (L, rows, H, S, D)
        self.graphs: dict[int, BatchGraph] = {}  # rows bucket -> the captured chunk step
        self.hidden: torch.Tensor | None = None  # (rows, S, D) the last run's final hidden states by row and position (`hidden_of`)

    def takes(self, prompt_len: int) -> bool:
        """Whether a prompt of this length joins a batched prefill (with batch-1 prefill's bits)."""
        return prompt_len <= self.longest and self.engine.prefills_fused(prompt_len)

    def capture(self) -> None:
        """Capture the chunk step of every rows bucket now (so that no timed admission pays for it)."""
        rows = 1
        while self.use_graphs and rows <= self.cache.batch_size:
            self._graph(rows)
            rows *= 2

    def _graph(self, rows: int) -> BatchGraph:
        """The captured chunk step of this rows bucket (captured now if it was not)."""
        if rows not in self.graphs:
            self.graphs[rows] = BatchGraph(self.engine, self.cache, rows, GRAPH_MAX_T)
        return self.graphs[rows]

    def _chunk(self, tokens: torch.Tensor, input_pos: torch.Tensor, c0: int) -> torch.Tensor:
        """tokens, input_pos (n, GRAPH_MAX_T) from position c0 into staging rows [0, n) -> logits
        (n, GRAPH_MAX_T, V); where the model keeps hidden states, theirs into `hidden` there."""
        n = tokens.shape[0]
        if self.use_graphs:
            graph = self._graph(bucket(n))
            logits, hidden = graph.run(tokens, input_pos), graph.hidden
        else:
            with self.engine.autocast():  # the fused kernels read each row's positions; they take no mask
                logits = self.engine.model(tokens, input_pos, self.cache.rows(0, n), self.cache.max_len, None, False, None)
            hidden = self.engine.model.last_hidden if self.engine.model.keep_hidden else None
        if hidden is not None:
            if self.hidden is None:
                self.hidden = hidden.new_zeros(self.cache.batch_size, self.cache.max_len, hidden.shape[-1])  # (rows, S, D)
            self.hidden[:n, c0 : c0 + tokens.shape[1]] = hidden[:n]
        return logits

    def hidden_of(self, row: int, length: int) -> torch.Tensor | None:
        """The last run's final hidden states of a staging row's prompt (length, D), where the model kept them."""
        return None if self.hidden is None or not self.engine.model.keep_hidden else self.hidden[row, :length]

    @torch.inference_mode()
    def run(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Prefill the prompts (each `takes`) as staging rows -> (logits of each prompt's last
        position (m, V), in the prompts' order; each prompt's staging row)."""
        dev = self.engine.device
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # staging row r holds prompts[order[r]]
        row_of = [0] * len(prompts)
        for r, i in enumerate(order):
            row_of[i] = r
        out: torch.Tensor | None = None  # (m, V), in the logits' own dtype
        for c0 in range(0, len(prompts[order[0]]), GRAPH_MAX_T):
            rows = [prompts[i] for i in order if len(prompts[i]) > c0]  # longest first: rows [0, n) reach this chunk
            feed = [p[c0 : c0 + GRAPH_MAX_T] for p in rows]
            tokens = to_device([f + [f[-1]] * (GRAPH_MAX_T - len(f)) for f in feed], dev)  # (n, GRAPH_MAX_T)
            pos = torch.arange(c0, c0 + GRAPH_MAX_T, device=dev).repeat(len(rows), 1)  # (n, GRAPH_MAX_T)
            logits = self._chunk(tokens, pos, c0)
            ends = [(r, len(p) - 1 - c0) for r, p in enumerate(rows) if len(p) <= c0 + GRAPH_MAX_T]  # prompts ending here
            if out is None:
                out = logits.new_empty(len(prompts), logits.shape[-1])
            if ends:
                r_idx = to_device([r for r, _ in ends], dev)
                t_idx = to_device([t for _, t in ends], dev)
                out[to_device([order[r] for r, _ in ends], dev)] = logits[r_idx, t_idx]
        assert out is not None
        return out, row_of

    def copy_into(self, cache: KVCache, slots: list[int], rows: list[int], length: int) -> None:
        """Staging rows' first `length` positions into the cache's slots (slots[i] <- rows[i])."""
        cache.copy_rows(to_device(slots, cache.k.device), self.cache, to_device(rows, cache.k.device), length)
