"""CUDA graphs of the engine's fixed-shape steps.

A captured graph replays fixed kernels on fixed addresses: the cache, the rope tables, the
step's own input and output buffers. The engine owns every captured object (`Engine.captured`,
keyed by what it was captured for) and drops them all whenever those addresses could change, so
nothing is ever replayed against a cache that is no longer there.

    capture(engine, body, prepare)   warm `body` up, then capture it in the engine's graph pool
    only_where(pred)                 a block's device work only where a device flag holds (an IF node)
    GraphStep      one step of T tokens (decode, verify; optionally the greedy verdict and heads)
    GreedyGraph    a greedy decode step that feeds itself: n steps per host read
    PrefillGraph   a prompt from position 0 in one pass, padded to a power-of-two bucket
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch

from labkit.config import env_flag

if TYPE_CHECKING:
    from labkit.engine import Engine

GRAPH_MAX_T = 16  # steps of up to this many tokens run as CUDA graphs; longer ones (prefill) eagerly
GRAPH_HEADROOM = GRAPH_MAX_T  # cache positions kept free at the end for capture warm-ups
GREEDY_CHUNK = 16  # greedy tokens per host synchronisation on GPUs (decode_greedy)
PREFILL_MIN_BUCKET = 32  # the smallest captured prompt pass


def prefill_bucket(T: int) -> int:
    """The captured prompt pass that serves a T-token prompt: the next power of two."""
    return max(PREFILL_MIN_BUCKET, 1 << (T - 1).bit_length())


class CapturedGraphs:
    """Every captured object of one engine (a CUDA graph and its buffers), by what it was captured
    for, and the memory pool they share. Everything that holds addresses into the engine's cache
    lives here, drafters' device steps included, so a new cache (or new layer kernels) drops it
    all at once (`clear`)."""

    def __init__(self) -> None:
        self._objects: dict[tuple[Any, ...], Any] = {}
        self._pool: Any = None

    def get(self, key: tuple[Any, ...], build: Any) -> Any:
        obj = self._objects.get(key)
        if obj is None:
            obj = self._objects[key] = build()
        return obj

    def keys(self) -> list[tuple[Any, ...]]:
        """What is captured now (tests and tools read it)."""
        return list(self._objects)

    def clear(self) -> None:
        """Forget every captured graph (captured again when next needed). Their memory pool goes
        with them: PyTorch cannot capture into a pool whose graphs are all gone."""
        self._objects.clear()
        self._pool = None

    def pool(self) -> Any:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool


_capturing = threading.local()  # .pool: the memory pool of the graph capture() is making in this thread (an IF node's body allocates from it)


def _torch_if_nodes() -> bool:
    graph = torch.cuda.CUDAGraph
    return hasattr(graph, "get_currently_capturing_graph") and hasattr(graph, "begin_capture_to_if_node")


def if_nodes() -> bool:
    """Whether only_where captures CUDA graph IF nodes: on a CUDA device unless LABKIT_IF_NODES=0, with
    PyTorch's own API where it has one, else labkit's (kernels/graph_if.cu, CUDA 12.4, built at first
    use: PyTorch 2.11 has no API for them). Where neither builds, off (the block then always runs)."""
    status = if_nodes_status()
    if status in ("off", "no CUDA device", "PyTorch's"):
        return status == "PyTorch's"
    from labkit.kernels import cuda_ops

    return cuda_ops.graph_if()[0] is not None  # built here at first use


def if_nodes_status() -> str:
    """What only_where does in this process, for results files, without building anything: "off"
    (LABKIT_IF_NODES=0), "no CUDA device", "PyTorch's", "labkit's" (kernels/graph_if.cu built), why
    labkit's could not build, or "not yet asked" (no capture needed one yet)."""
    if not env_flag("LABKIT_IF_NODES", default=True):
        return "off"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _torch_if_nodes():
        return "PyTorch's"
    from labkit.kernels import cuda_ops

    if not cuda_ops.graph_if.cache_info().currsize:
        return "not yet asked"
    module, reason = cuda_ops.graph_if()
    return "labkit's" if module is not None else f"none: {reason}"


@contextmanager
def only_where(pred: torch.Tensor, pool: Any = None) -> Iterator[None]:  # pred (1,) bool on the device
    """The block's device work runs only where pred holds, when a CUDA graph is being captured
    (a conditional IF node, read on the device at each replay: no host sync). Anywhere else the
    block always runs: its writes must be harmless where pred is false (the caller picks past them).
    pool: the capture's memory pool, which labkit's own IF nodes need (default: capture()'s)."""
    pool = getattr(_capturing, "pool", None) if pool is None else pool
    if not (pred.is_cuda and torch.cuda.is_current_stream_capturing() and if_nodes()):
        yield
    elif _torch_if_nodes():
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        graph.begin_capture_to_if_node(pred)
        try:
            yield
        finally:
            graph.end_capture_to_conditional_node()
    elif pool is None:  # a capture whose pool is unknown: no body of its own
        yield
    else:
        from labkit.kernels import cuda_ops

        module = cuda_ops.graph_if()[0]
        module.begin_if(pred, *pool)  # the body is captured on a stream of its own, PyTorch's current one
        try:
            yield
        finally:
            module.end_if()


def capture(engine: Engine, body: Any, prepare: Any) -> torch.cuda.CUDAGraph:
    """Warm `body` up twice on a side stream (as CUDA graph capture requires), then capture it
    into the engine's graph pool. `prepare` resets the static inputs before each run."""
    device = engine.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), engine.autocast():
        for _ in range(2):
            prepare()
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    prepare()
    graph = torch.cuda.CUDAGraph()
    pool = engine.graphs.pool()
    with torch.cuda.graph(graph, pool=pool), engine.autocast():
        _capturing.pool = pool
        try:
            body()
        finally:
            _capturing.pool = None
    return graph


def greedy_verdict(
    logits: torch.Tensor,  # (B, K+1, V) the verify step's logits
    tokens: torch.Tensor,  # (B, K+1) the last token and the K drafts
    eos_mask: torch.Tensor,  # (V,) bool
    block_rows: torch.Tensor | int,  # (1,) EOS is blocked in the first block_rows rows (min_new_tokens); an int: known on the host
) -> torch.Tensor:  # (B, 2): accepted drafts, and the target's token after them
    """Greedy acceptance on the device (the registry's greedy_verdict: the target's argmax per
    position, EOS blocked where asked, then the accepted prefix). The same tokens as GreedyMatch.
    Where the host knows nothing is blocked (an int <= 0: an eager step past min_new_tokens), the
    argmax itself, without the masked copy of the logits (~2% of a verify step on a CPU)."""
    from labkit.kernels import registry

    if isinstance(block_rows, int):
        if block_rows <= 0:
            accepted, bonus = registry.get("verify_prefix", tokens.device)(tokens[:, 1:], logits.argmax(-1))  # (B,), (B,)
            return torch.stack([accepted, bonus], dim=1)
        block_rows = torch.tensor([block_rows], device=tokens.device)
    return registry.get("greedy_verdict", tokens.device)(logits, tokens, eos_mask, block_rows)


class EagerVerdict:
    """greedy_verdict for a verify run outside a captured graph, where the block is a host int: EOS
    written as -inf into the first block_rows positions of the step's own logits (a few entries,
    by the mask's ids, kept for the mask last asked about), then the argmax itself; no masked copy
    of every logit (on a CPU ~2.5x cheaper for a 4-token verify: scripts/verdict_costs.py)."""

    def __init__(self) -> None:
        self._ids: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # the last EOS mask (V,) and its ids (E,)

    def __call__(
        self,
        logits: torch.Tensor,  # (B, K+1, V) the step's own logits, written here, read by nothing after
        tokens: torch.Tensor,  # (B, K+1) the last token and the K drafts
        eos_mask: torch.Tensor,  # (V,) bool
        block_rows: int,  # EOS blocked in the first block_rows positions (min_new_tokens)
    ) -> torch.Tensor:  # (B, 2): accepted drafts, and the target's token after them
        if block_rows > 0:
            self.block_eos(logits[:, :block_rows], eos_mask)
        return greedy_verdict(logits, tokens, eos_mask, 0)

    def block_eos(self, logits: torch.Tensor, eos_mask: torch.Tensor) -> None:  # (..., V) written in place, (V,) bool
        """EOS as -inf in these logits (a step's own), by the mask's ids: a few entries, not a masked copy."""
        mask, ids = self._ids
        if mask is not eos_mask or ids is None:
            ids = eos_mask.nonzero().squeeze(1)  # (E,)
            self._ids = (eos_mask, ids)  # one assignment: a reader sees a mask with its own ids
        logits.index_fill_(-1, ids, float("-inf"))


class VerifyHook(Protocol):
    """Draft work inside the target's greedy verify step (captured with it where graphs are on):
    `draft_after` reads the pass's final hidden states, its tokens and positions and the verdict
    on the device, and the host hands the columns it returned, read back with the verdict, to
    `take` for the next proposal."""

    max_t: int  # the widest verify (K+1 tokens) it drafts after

    def draft_after(self, hidden: torch.Tensor, verdict: torch.Tensor, lm_head: torch.nn.Module,
                    tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) final hidden states of the verify pass, verdict (B, 2), the pass's
        tokens (B, T) at positions input_pos (T,) -> (B, n) draft ids."""
        ...

    def take(self, tokens: list[int], context_len: int) -> None:
        """The columns draft_after made, for the context of context_len tokens that the step left."""



class GraphStep:
    """One captured fixed-shape step (T tokens, optionally the first n layers only).

    Inputs are copied into static buffers and the graph replays; the logits it returns live in
    the graph's output buffer and are valid until the next replay of this step. Warm-up and
    capture write keys and values at the cache's last T positions, which `ensure_capacity`
    keeps beyond any request's reach.

    With `greedy`, the graph also decides greedy acceptance of the T-1 drafts (greedy_verdict):
    a speculative step replays one graph and reads back two integers, instead of launching the
    EOS mask, the argmax and the comparison from Python. With a `hook` it also runs a drafter's
    work on the pass's hidden states and verdict (draft heads: the next step's draft), so the
    same read brings that back.
    """

    def __init__(self, engine: Engine, T: int, n_layers: int | None, greedy: bool = False, hook: VerifyHook | None = None) -> None:
        max_len = engine.cache.max_len  # warm-ups write the cache's last positions, past every request
        device = engine.device
        self.T = T
        self.tokens = torch.zeros(engine.batch_size, T, dtype=torch.long, device=device)  # (B, T)
        self.input_pos = torch.arange(max_len - T, max_len, device=device)  # (T,)
        step = engine.static_step
        self.logits = torch.empty(0)
        self.eos_mask = torch.zeros(engine.args.vocab_size if greedy else 0, dtype=torch.bool, device=device)  # (V,)
        self.block_rows = torch.zeros(1, dtype=torch.long, device=device)  # (1,) EOS blocked in rows < this
        self.verdict = torch.empty(0)  # (B, 2) with greedy

        def body() -> None:
            self.logits = step(self.tokens, self.input_pos, n_layers)  # (B, T, V): the graph's output buffer
            if greedy:
                verdict = greedy_verdict(self.logits, self.tokens, self.eos_mask, self.block_rows)  # (B, 2)
                if hook is not None:  # (B, 2 + n): the drafter's columns, from this pass's hidden states
                    verdict = torch.cat([verdict, hook.draft_after(engine.model.last_hidden, verdict, engine.model.lm_head,
                                                                           self.tokens, self.input_pos)], 1)
                self.verdict = verdict

        self.graph = capture(engine, body, lambda: None)
        # the final hidden state the captured pass writes (draft heads read it), full passes only
        self.hidden = engine.model.last_hidden if engine.model.keep_hidden and n_layers is None else None  # (B, T, D)

    def set_eos(self, eos_mask: torch.Tensor, block_rows: int) -> None:
        """EOS blocking for the greedy verdict. The (V,) mask is copied on every call: one small
        device copy, and no guess about whether the caller changed it (inference tensors carry no
        version counter, and an id can be reused)."""
        self.eos_mask.copy_(eos_mask, non_blocking=True)
        self.block_rows.fill_(block_rows)

    def run(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        torch.arange(start, start + self.T, out=self.input_pos)  # (T,) written in place: one kernel, no copy
        self.graph.replay()
        return self.logits


class GreedyGraph:
    """`n` greedy decode steps without the host: one captured step that also takes the argmax,
    blocks EOS while asked to, writes the token into its own input, and advances the position.

    The host replays the graph n times and reads the n tokens back once, so a chunk of tokens
    costs one synchronisation instead of one per token.
    """

    def __init__(self, engine: Engine, chunk: int) -> None:
        device, B = engine.device, engine.batch_size
        V = engine.args.vocab_size
        max_len = engine.cache.max_len
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) input, then output
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,) position being written
        self.step_idx = torch.zeros(1, dtype=torch.long, device=device)  # (1,) steps done in this chunk
        self.block_steps = torch.zeros(1, dtype=torch.long, device=device)  # EOS blocked while step_idx < this
        self.eos_mask = torch.zeros(V, dtype=torch.bool, device=device)  # (V,)
        self.out = torch.zeros(B, chunk, dtype=torch.long, device=device)  # (B, chunk)
        step = engine.static_step

        def body() -> None:
            logits = step(self.token, self.pos, None)[:, -1]  # (B, V)
            blocked = self.eos_mask & (self.step_idx < self.block_steps)  # (V,)
            nxt = logits.masked_fill(blocked, float("-inf")).argmax(-1, keepdim=True)  # (B, 1)
            self.out.index_copy_(1, self.step_idx, nxt)
            self.token.copy_(nxt)
            self.pos.add_(1)
            self.step_idx.add_(1)

        def prepare() -> None:  # warm-ups write the cache's last position, out of every request's reach
            self.pos.fill_(max_len - 1)
            self.step_idx.zero_()

        self.graph = capture(engine, body, prepare)
        self.hidden = engine.model.last_hidden if engine.model.keep_hidden else None  # (B, 1, D) of the last step run

    def run(self, token: torch.Tensor, start: int, n: int, eos_mask: torch.Tensor | None, block_steps: int) -> torch.Tensor:
        self.token.copy_(token, non_blocking=True)
        self.pos.fill_(start)
        self.step_idx.zero_()
        self.block_steps.fill_(max(0, block_steps))
        if eos_mask is None:
            self.eos_mask.zero_()
        else:
            self.eos_mask.copy_(eos_mask)
        for _ in range(n):
            self.graph.replay()
        return self.out[:, :n]


class PrefillGraph:
    """A prompt of up to `bucket` tokens from position 0 as one captured pass (the fused layers up to
    their PROMPT_MAX_T, else the PyTorch layers: cuBLAS GEMMs and flash attention), so a prompt costs
    its GPU time, not hundreds of launches from Python. The prompt is padded at the end to the bucket;
    the padding's keys and values land past the prompt, where no query of this request looks before a
    later step rewrites them (attention is causal), and the logits are taken at the prompt's last token."""

    def __init__(self, engine: Engine, bucket: int) -> None:
        device, B = engine.device, engine.batch_size
        self.bucket = bucket
        self.tokens = torch.zeros(B, bucket, dtype=torch.long, device=device)  # (B, bucket)
        self.positions = torch.arange(bucket, device=device)  # (bucket,)
        self.last = torch.full((1,), bucket - 1, dtype=torch.long, device=device)  # (1,) the prompt's last row
        self.logits = torch.empty(0)

        def body() -> None:
            self.logits = engine.prompt_pass(self.tokens, self.positions, self.last)  # (B, 1, V)

        self.graph = capture(engine, body, lambda: None)
        self.hidden = engine.model.last_hidden if engine.model.keep_hidden else None  # (B, 1, D)

    def run(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens (B, T) -> logits (B, 1, V) at the last one
        T = tokens.shape[1]
        self.tokens[:, :T].copy_(tokens, non_blocking=True)
        self.last.fill_(T - 1)
        self.graph.replay()
        return self.logits
