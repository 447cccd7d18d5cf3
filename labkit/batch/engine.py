"""A batched engine: B slots over one static cache, each slot a request at its own length.

Terms. A *slot* is a row of the cache, (L, B, H, S, D)[:, slot], holding one request's keys and
values; its length lives on the host (`lengths[slot]`). Active requests always occupy slots
0..n-1: a request that leaves hands its slot the last active row (`release`), so a decode step
runs over one contiguous view of the cache, rows [0, n). A step feeds each row one token at its own
position (input_pos (n, 1)); rollback is per row (`rollback(slot, length)`).

Batch invariance. With `invariant=False` a step is one forward over the n rows: GEMMs of n rows,
and one masked attention over the longest row's keys. Both can give a row different bits from a
batch-1 step, because BLAS picks its kernel (and so its reduction order) by the number of rows, and
the attention's reduction runs over more (masked) keys. With `invariant=True` every step runs in
tiles of exactly TILE rows (padding rows sit in free slots at position 0) and each row attends over
exactly its own keys; a row's result then depends only on the row, whatever shares its batch and
whichever slot it lands in (tests/test_batch.py holds it to the bit). It costs TILE rows of
compute at any batch below TILE.

Where the engine runs the fused layer kernels (Triton on CUDA), a batched step runs them too:
they take each row's positions themselves, and a row's arithmetic never depends on its
neighbours, so every row gets a batch-1 step's bits in either mode; with `cuda_graph` the steps
replay as CUDA graphs per rows bucket (graphs.py). Elsewhere the PyTorch layers serve every
batched step. New requests' prompts run with batch-1 prefill's bits: short ones together, as rows
of one batched step per chunk (prefill.py), others through the engine's own batch-1 prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from labkit.batch.graphs import BatchGraph, bucket
from labkit.batch.prefill import STAGE_ROWS, StagedPrefill, staged_prefill
from labkit.batch.transfer import to_device
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.graphs import GRAPH_HEADROOM
from labkit.models.families import family_of_model
from labkit.models.kvcache import KVCache, RowSpans

TILE = 16  # rows per step in invariant mode


@dataclass
class BatchConfig:
    slots: int = 8  # requests decoded together at most
    max_seq_len: int = 1024  # positions per slot (prompt + new tokens), allocated once
    invariant: bool = False  # a row's bits independent of its batch (fixed tiles, exact attention)
    cuda_graph: bool = False  # replay batched steps as CUDA graphs per rows bucket (fused layers on CUDA)

    def validate(self) -> None:
        if self.slots < 1 or self.max_seq_len < 2:
            raise LabkitError(f"a batch needs at least 1 slot of 2 positions, got {self.slots} x {self.max_seq_len}")


class BatchEngine:
    """Steps many requests over one static cache; built beside an Engine, sharing its model."""

    def __init__(self, engine: Engine, cfg: BatchConfig) -> None:
        cfg.validate()
        if family_of_model(engine.model).name != "llama":
            raise LabkitError(f"batched decoding serves Llama-family models for now, not {family_of_model(engine.model).name}")
        self.engine, self.cfg, self.model = engine, cfg, engine.model
        ops = engine.model.layer_ops
        self.graphs_ok = cfg.cuda_graph and engine.device.type == "cuda" and ops is not None and ops.ROW_POSITIONS
        if cfg.cuda_graph and not self.graphs_ok:
            raise LabkitError("batched CUDA graphs need a CUDA device and the fused layer kernels (--layer-kernels triton)")
        rows = -(-cfg.slots // TILE) * TILE if cfg.invariant else cfg.slots  # padding rows live in free slots
        if self.graphs_ok:
            rows = bucket(rows)
        headroom = GRAPH_HEADROOM if self.graphs_ok else 0  # capture warm-ups write the last positions
        if cfg.max_seq_len + headroom > engine.cache.max_len:
            raise LabkitError(f"{cfg.max_seq_len} positions per slot exceed the engine's rope table of {engine.cache.max_len - headroom}")
        L, _, H, _, D = engine.cache.k.shape
        self.cache = KVCache(L, rows, H, cfg.max_seq_len + headroom, D, dtype=engine.dtype, device=engine.device)  # (L, rows, H, S, D)
        self.lengths = [0] * rows  # host: valid positions per slot
        self.active = 0  # slots [0, active) hold requests
        self.turns = [0] * rows  # per slot: the requests it has taken (admitted into it, or moved there by a release)
        self.graphs: dict[tuple[int, int], BatchGraph] = {}
        self.stages = ops is not None and ops.ROW_POSITIONS  # joining requests' short prompts prefilled together (prefill.py)
        self.prompt_listeners: list[Callable[[int, list[int], torch.Tensor], None]] = []  # listen_prompts
        self.step_listeners: list[Callable[[list[int], torch.Tensor, torch.Tensor], None]] = []  # listen_steps
        self.release_listeners: list[Callable[[int, int], None]] = []  # listen_releases

    def listen_prompts(self, listener: Callable[[int, list[int], torch.Tensor], None]) -> None:
        """Hand every admitted prompt's final hidden states (T, D) to `listener(slot, prompt_ids, hidden)`
        as it is prefilled (valid during the call; the slot's turn already the request's), where the model
        keeps them (keep_hidden_states): a drafter that reads them (batch/eagle.py) then needs no second
        pass over the prompt."""
        self.prompt_listeners.append(listener)

    def listen_releases(self, listener: Callable[[int, int], None]) -> None:
        """Tell `listener(slot, source)` when a release moves the request in slot `source` into `slot`
        (its keys and values copied there; `turns[slot]` already counts it): what a listener keeps by
        slot for that request goes along (batch/eagle.py: the hidden states it catches rows up from)."""
        self.release_listeners.append(listener)

    def listen_steps(self, listener: Callable[[list[int], torch.Tensor, torch.Tensor], None]) -> None:
        """Hand every decode or verify step's final hidden states to `listener(starts, input_pos,
        hidden)` (the active slots' first positions, (n, T) and (n, T, D) on the device; valid during
        the call), where the model keeps them and the rows are not batch-invariant: a drafter that
        drafts from them (batch/eagle.py) keeps its rows current through steps it did not draft."""
        self.step_listeners.append(listener)

    def _heard(self, slot: int, prompt_ids: list[int], hidden: torch.Tensor | None) -> None:
        if hidden is not None:
            for listener in self.prompt_listeners:
                listener(slot, prompt_ids, hidden)

    @property
    def staging(self) -> StagedPrefill | None:
        """The engine's staging for batched admission, where the fused kernels take rows at their own positions."""
        return staged_prefill(self.engine, self.graphs_ok) if self.stages else None

    def _uncaptured(self, key: tuple[int, int]) -> bool:
        """Whether the step of (rows, T) needs capturing: never captured, or captured before the model
        kept hidden states (it hands listeners none: on the H200 every EAGLE row back from plain steps
        was then loaded by a prefill, 42-73 ms at one row, results/gpu/batch-NVIDIA-H200-20261203-201318.json)."""
        graph = self.graphs.get(key)
        return graph is None or (self.model.keep_hidden and not graph.keeps_hidden)

    def capture_graphs(self, widths: list[int]) -> None:
        """Capture the step of every rows bucket at these widths (tokens per row) now, and the
        staged admission's chunk steps, so that no timed step pays for a capture (speculative
        steps are ragged: 1 to K+1 tokens)."""
        if not self.graphs_ok:
            return
        if self.staging is not None:
            self.staging.capture()
        rows = 1
        while rows <= self.cache.batch_size:
            for T in widths:
                if self._uncaptured((rows, T)) and T <= GRAPH_HEADROOM:
                    self.graphs[(rows, T)] = BatchGraph(self.engine, self.cache, rows, T)
            rows *= 2

    @property
    def free(self) -> int:
        return self.cfg.slots - self.active

    def _forward(self, start: int, stop: int, tokens: torch.Tensor, input_pos: torch.Tensor, firsts: list[int], exact: bool) -> torch.Tensor:
        """tokens, input_pos (stop-start, T) into cache rows [start, stop), firsts: each row's first
        position (host) -> logits (rows, T, V)."""
        view = self.cache.rows(start, stop)
        spans = RowSpans(input_pos, [f + tokens.shape[1] for f in firsts], exact)
        with self.engine.autocast():
            return self.model(tokens, input_pos, view, max(spans.ends), spans, False, None)  # keys up to the longest row

    def admit(self, prompt_ids: list[int]) -> tuple[int, torch.Tensor]:
        """Prefill one new request into the next free slot: (slot, logits of its last position (V,))."""
        slot = self.active
        return slot, self.admit_many([prompt_ids])[0]

    @torch.inference_mode()
    def admit_many(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill new requests into the next free slots, in order -> logits of each prompt's last
        position (m, V). Every request starts from exactly the state batch-1 decoding would: the
        prompts the engine prefills through the fused kernels run together as rows of one step per
        chunk (prefill.py), the others one at a time through the engine's own batch-1 prefill
        (whatever path it takes there: a captured prompt pass, GGUF blocks), their keys and values
        then copied into their slots."""
        if len(prompts) > self.free:
            raise LabkitError(f"{len(prompts)} requests for {self.free} free slots")
        for p in prompts:
            if not 1 <= len(p) < self.cfg.max_seq_len:
                raise LabkitError(f"a prompt of {len(p)} tokens does not fit a slot of {self.cfg.max_seq_len} positions")
        first, staging = self.active, self.staging
        together = [i for i, p in enumerate(prompts) if staging is not None and staging.takes(len(p))]
        if len(together) < 2:
            together = []  # a prompt alone: the engine's own (captured) prefill
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for slot in range(first, first + len(prompts)):  # (before the prefills: listeners hear the slot's new request)
            self.turns[slot] += 1
        with self.engine.request_lock:
            for g in range(0, len(together), STAGE_ROWS):
                assert staging is not None
                group = together[g : g + STAGE_ROWS]
                logits, rows = staging.run([prompts[i] for i in group])  # (n, V)
                staging.copy_into(self.cache, [first + i for i in group], rows, max(len(prompts[i]) for i in group))
                for j, i in enumerate(group):
                    out[i] = logits[j]
                    if self.prompt_listeners:
                        self._heard(first + i, prompts[i], staging.hidden_of(rows[j], len(prompts[i])))
            for i, p in enumerate(prompts):
                if out[i] is None:
                    out[i] = self._prefill_one(first + i, p)
        for i, p in enumerate(prompts):
            self.lengths[first + i] = len(p)
        self.active += len(prompts)
        return torch.stack(out)  # type: ignore[arg-type]

    def _prefill_one(self, slot: int, prompt_ids: list[int]) -> torch.Tensor:
        """The engine's batch-1 prefill, its keys and values copied into `slot` -> logits (V,)."""
        T = len(prompt_ids)
        self.engine.ensure_capacity(T + 1)
        logits = self.engine.prefill(torch.tensor([prompt_ids], device=self.engine.device))[0]  # (V,)
        self.cache.copy_rows(slot, self.engine.cache, 0, T)
        if self.prompt_listeners and self.model.keep_hidden and self.model.keep_every_hidden:
            self._heard(slot, prompt_ids, self.engine.hidden_span(0, T)[0])
        return logits.clone()  # a captured pass's output buffer is overwritten by its next replay

    def step(self, tokens: list[int]) -> torch.Tensor:
        """One token for each active slot (tokens[i] for slot i) at its next position -> logits (n, V)."""
        return self.verify([[t] for t in tokens])[:, 0]

    @torch.inference_mode()
    def verify(self, feeds: list[list[int]], width: int | None = None) -> torch.Tensor:
        """Feed each active slot its tokens at its next positions: the last token and its drafts,
        ragged across slots (feeds[i] for slot i) -> logits (n, T, V), T = the longest feed (or
        `width`). Shorter feeds are padded with their last token; every slot's length grows by
        its own feed, so the padding is already rolled back. The caller rolls each slot back to
        what it accepts."""
        n = self.active
        if len(feeds) != n or n == 0 or not all(feeds):
            raise LabkitError(f"a step takes tokens for each of the {n} active slots, got {len(feeds)} feeds")
        T = max(width or 0, *(len(f) for f in feeds))
        ids = to_device([f + [f[-1]] * (T - len(f)) for f in feeds], self.engine.device)  # (n, T)
        return self._run(ids, [len(f) for f in feeds])

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each active slot, given on the device (tokens (n,), say the last step's
        argmax: nothing waits for the host) -> logits (n, V)."""
        n = self.active
        if n == 0 or tokens.shape != (n,):
            raise LabkitError(f"a step takes one token for each of the {n} active slots, got {tuple(tokens.shape)}")
        return self._run(tokens[:, None], [1] * n)[:, 0]

    def _run(self, ids: torch.Tensor, grow: list[int]) -> torch.Tensor:
        """ids (n, T) at each active slot's next positions; slot i's length then grows by grow[i] -> logits (n, T, V)."""
        n, T = ids.shape
        starts = self.lengths[:n]
        if max(s + T for s in starts) > self.cfg.max_seq_len:
            raise LabkitError(f"a slot is full ({self.cfg.max_seq_len} positions)")
        dev = self.engine.device
        pos = to_device([[s + t for t in range(T)] for s in starts], dev)  # (n, T)
        if self.graphs_ok and T <= GRAPH_HEADROOM and not self.cfg.invariant:
            key = (bucket(n), T)
            if self._uncaptured(key):
                self.graphs[key] = BatchGraph(self.engine, self.cache, *key)
            logits = self.graphs[key].run(ids, pos)
            hidden = self.graphs[key].hidden
        elif not self.cfg.invariant:
            logits = self._forward(0, n, ids, pos, starts, exact=False)
            hidden = self.model.last_hidden if self.model.keep_hidden else None
        else:
            outs = []
            for first in range(0, n, TILE):  # every tile TILE rows: rows past n are padding in free slots at position 0
                real = min(TILE, n - first)
                pad = TILE - real
                tile_ids = torch.cat([ids[first : first + real], ids.new_zeros(pad, T)])  # (TILE, T)
                firsts = starts[first : first + real] + [0] * pad
                tile_pos = torch.cat([pos[first : first + real], torch.arange(T, device=dev).repeat(pad, 1)])
                outs.append(self._forward(first, first + TILE, tile_ids, tile_pos, firsts, exact=True)[:real])
            logits, hidden = torch.cat(outs), None
        if hidden is not None:
            for listener in self.step_listeners:
                listener(list(starts), pos, hidden[:n])
        for i, g in enumerate(grow):
            self.lengths[i] += g
        return logits  # (n, T, V)

    @torch.inference_mode()
    def step_rows(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens at input_pos (r, T), both on the device, into cache rows [0, r) -> logits (r, T, V),
        the lengths left alone (the caller sets them: set_lengths). With the fused kernels no mask
        and no host read, so a caller can capture it in a CUDA graph (batch/lookup.py); else masks
        from the rows' first positions, read by the host."""
        r = tokens.shape[0]
        if self.graphs_ok:
            return self.model(tokens, input_pos, self.cache.rows(0, r), self.cache.max_len, None, False, None)
        return self._forward(0, r, tokens, input_pos, input_pos[:, 0].tolist(), exact=False)

    def set_lengths(self, lengths: list[int]) -> None:
        """The valid positions of slots [0, len(lengths)), after steps whose positions the device chose."""
        if len(lengths) > self.active or not all(0 <= n <= self.cfg.max_seq_len for n in lengths):
            raise LabkitError(f"cannot set {len(lengths)} slots' lengths to {lengths} ({self.active} active, {self.cfg.max_seq_len} positions)")
        self.lengths[: len(lengths)] = lengths

    def rollback(self, slot: int, length: int) -> None:
        """Forget slot's positions from `length` on."""
        if not 0 <= slot < self.active or not 0 <= length <= self.lengths[slot]:
            raise LabkitError(f"cannot roll slot {slot} back to {length}")
        self.lengths[slot] = length

    @torch.inference_mode()
    def release(self, slot: int) -> int | None:
        """Free `slot` at once: the last active request moves into it (its keys and values copied);
        returns the slot that request came from (None when `slot` was the last)."""
        if not 0 <= slot < self.active:
            raise LabkitError(f"slot {slot} is not active")
        last = self.active - 1
        self.active = last
        if slot == last:
            return None
        self.turns[slot] += 1
        n = self.lengths[last]
        self.cache.copy_rows(slot, self.cache, last, n)
        self.lengths[slot] = n
        for listener in self.release_listeners:
            listener(slot, last)
        return last

    def describe(self) -> dict[str, Any]:
        return {"slots": self.cfg.slots, "max_seq_len": self.cfg.max_seq_len, "invariant": self.cfg.invariant,
                "cache_mib": round(2 * self.cache.k.numel() * self.cache.k.element_size() / 2**20, 1)}
