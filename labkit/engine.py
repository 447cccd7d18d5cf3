"""Our decoder engine: a compact model plus its static KV cache, stepped by position.

    prefill(prompt)   → logits of the last prompt position
    decode(token)     → logits of the next position (one token per step)
    verify(tokens)    → logits for all T positions in one pass (speculative verify)
    rollback(n)       → forget positions >= n (O(1): the cache length lives on the host)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, cast

import torch

from labkit.config import resolve_max_seq_len
from labkit.engine_choices import compile_step, cpu_layer_ops, pick_layer_ops
from labkit.errors import LabkitError
from labkit.graphs import (
    GRAPH_HEADROOM,
    GRAPH_MAX_T,
    GREEDY_CHUNK,
    CapturedGraphs,
    EagerVerdict,
    GraphStep,
    GreedyGraph,
    PrefillGraph,
    VerifyHook,
    prefill_bucket,
)
from labkit.hidden import KeptHidden
from labkit.models.families import family_of_model
from labkit.models.gguf_weights import set_block_weights
from labkit.models.kvcache import CAUSAL, KVCache
from labkit.models.loading import LoadedModel

MIN_ATTEND = 1024  # the smallest attention span of a masked fixed-shape step (see Engine.ensure_capacity)
PREFILL_CHUNK = 8192  # a longer input runs as passes of this many tokens (activations and masks stay bounded)
# With CUDA graphs a prompt from position 0 runs as one captured pass (PrefillGraph), padded to a power of two: through
# the fused layers up to their PROMPT_MAX_T (layer_triton), else the PyTorch layers, and then only past
# PREFILL_GRAPH_CHUNKS_MAX_T tokens (shorter ones as captured fused steps of GRAPH_MAX_T). Anything else: one eager pass.
PREFILL_GRAPH_CHUNKS_MAX_T = 48  # measured on an H200: 32 tokens as two chunks 1.1 ms, as one pass 2.1 ms; 512: 17.6 and 2.6 ms
PREFILL_GRAPHS = True  # captured prompt passes (scripts/prefill_costs.py compares the ways)


class Engine:
    """Steps one model over its static cache. The cache is allocated once, at load, for `max_seq_len` positions (default:
    the model's context, at most config.DEFAULT_MAX_SEQ_LEN): `resize` is the one way to move it (dropping every captured graph)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        amp: bool = False,
        compile: bool = False,
        cuda_graph: bool = False,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        layer_kernels: str = "auto",
    ) -> None:
        if cuda_graph and device.type != "cuda":
            raise LabkitError(f"CUDA graphs need a CUDA device, not {device}")
        self.device, self.dtype, self.amp = device, dtype, amp
        self.cuda_graph = cuda_graph
        self._graphs_safe = cuda_graph  # set per request by ensure_capacity
        self.graphs = CapturedGraphs()  # every captured graph and its buffers (captured())
        # one request at a time: the cache, the captured graphs' buffers and the drafters' state
        # belong to the request that holds it (generate takes it; re-entrant for nested calls)
        self.request_lock = threading.RLock()
        self.kept_hidden = KeptHidden()  # final hidden states of the last full pass (keep_hidden_states)
        self.eager_verdict = EagerVerdict()  # greedy acceptance and EOS blocking of steps run outside a captured graph
        weight_dtype = torch.float32 if amp else dtype
        self.model: Any = model.to(device=device, dtype=weight_dtype).eval()  # a decoder of models/families.py
        ops, self.layer_kernels_reason = pick_layer_ops(self.model, device, dtype, amp, compile, layer_kernels)
        self.layer_kernels = "torch" if ops is None else "triton"  # "cpu" once GGUF blocks come (read_blocks)
        self.layer_choice = layer_kernels
        if family_of_model(self.model).fused_layers:
            self.model.layer_ops = ops
        self.args: Any = cast(Any, model).args  # LlamaArgs or GPT2Args
        self.context_len: int = self.args.context_len
        self.batch_size = batch_size
        self.eos_token_ids: tuple[int, ...] = ()  # set by from_hf; generate stops on these
        self.weights = "dense"  # or "gguf": linears read the GGUF's quantised blocks ("gguf-q8": with 8-bit activations)
        self.weights_note = ""  # how "auto" chose for a CPU engine of a GGUF model: the timings, or why not the blocks
        # Captures warm up on positions past every request's reach: models with rotary positions get
        # GRAPH_HEADROOM positions beyond max_seq_len for it (GPT-2's learned positions end at its
        # context, so there graphs give way to eager steps in the cache's last positions instead).
        self.headroom = 0 if getattr(self.model, "learned_positions", False) else GRAPH_HEADROOM
        self.max_seq_len = resolve_max_seq_len(max_seq_len, self.context_len)
        self.attend_len = self.max_seq_len  # keys a fixed-shape step attends over (ensure_capacity)
        self._allocate(self.max_seq_len)
        # Fixed-shape steps (decode, verify of K+1) attend over the first attend_len positions of
        # the cache with a mask, so one compiled graph serves every position.
        self._static_step: Any = compile_step(self._static_forward) if compile else None

    # -- building (labkit/engine_build.py) ----------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: Any, *args: Any, **kwargs: Any) -> Engine:
        """Build from a transformers model: engine_build.from_hf."""
        from labkit.engine_build import from_hf

        return from_hf(hf_model, *args, **kwargs)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, *args: Any, **kwargs: Any) -> Engine:
        """Build for a loaded model (its GGUF blocks as weights where they serve): engine_build.from_loaded."""
        from labkit.engine_build import from_loaded

        return from_loaded(loaded, *args, **kwargs)

    def read_blocks(self, on: bool, act: str = "fp32") -> None:
        """Let the linears read the GGUF blocks, and the CPU layer operations run the layers (where they can and
        --layer-kernels allows), or the dense weights through the PyTorch layers: the same values either way. act
        "q8": the blocks' products take 8-bit activations (--weights gguf-q8: faster, not the same values)."""
        set_block_weights(self.model, on, act)
        self.model.layer_ops, self.layer_kernels_reason = cpu_layer_ops(self.model, self.batch_size, on, self.layer_choice)
        self.layer_kernels = "cpu" if self.model.layer_ops is not None else "torch"
        self.weights = ("gguf-q8" if act == "q8" else "gguf") if on else "dense"

    # -- captured graphs ----------------------------------------------------------------
    def captured(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """The captured object for `key` (graphs.CapturedGraphs), built by `build()` the first
        time; the attention span of the fixed-shape step is part of every key."""
        return self.graphs.get((*key, self.attend_len), build)

    @property
    def compiled(self) -> bool:
        """Whether the fixed-shape steps are torch.compile'd (--compile)."""
        return self._static_step is not None

    @property
    def graphs_safe(self) -> bool:
        """Whether this request's fixed-shape steps may replay captured graphs (ensure_capacity)."""
        return self._graphs_safe

    @property
    def prompt_pass_min_t(self) -> int:
        """The shortest prompt `prefill` runs as one captured pass (PrefillGraph; 0: never): past one step's
        tokens where the pass runs through the fused layers (their PROMPT_MAX_T), else past PREFILL_GRAPH_CHUNKS_MAX_T.
        Read when asked, so that a tuned PREFILL_GRAPH_CHUNKS_MAX_T holds for warm-ups too."""
        if not (PREFILL_GRAPHS and self.cuda_graph):
            return 0
        fused = self.layer_kernels != "torch" and self.model.runs_fused(prefill_bucket(GRAPH_MAX_T + 1), prompt=True)  # (its smallest bucket)
        return GRAPH_MAX_T + 1 if fused else max(GRAPH_MAX_T, PREFILL_GRAPH_CHUNKS_MAX_T) + 1

    def prefills_fused(self, T: int) -> bool:
        """Whether `prefill` runs T tokens through the fused kernels (a token's bits then do not depend on
        what shares its step), for a request with room for graphs (a batch slot's). Batched admission asks."""
        if self.compiled or self.layer_kernels == "torch":
            return False
        if 0 < self.prompt_pass_min_t <= T:  # one captured pass: fused up to the kernels' PROMPT_MAX_T
            return self.model.runs_fused(prefill_bucket(T), prompt=True)
        chunk = self._prompt_chunk(T, self.cuda_graph)
        return self.model.runs_fused(min(T, chunk), prompt=T <= chunk)  # (one eager pass: a prompt's, from position 0)

    @staticmethod
    def _prompt_chunk(T: int, graphs: bool) -> int:  # the widest step forward runs T prompt tokens in (no prompt pass)
        return GRAPH_MAX_T if graphs and T <= PREFILL_GRAPH_CHUNKS_MAX_T else PREFILL_CHUNK

    @property
    def static_step(self) -> Callable[..., torch.Tensor]:
        """The fixed-shape step (tokens (B, T), input_pos (T,), n_layers) -> logits (B, T, V) graphs capture (--compile's)."""
        return self._static_step or self._static_forward

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context every step runs in (a no-op without AMP)."""
        return torch.autocast(device_type=self.device.type, dtype=self.dtype) if self.amp else contextlib.nullcontext()

    # -- cache management -------------------------------------------------------------
    def _allocate(self, max_seq_len: int) -> None:
        self.graphs.clear()  # captured graphs point into the old cache
        if hasattr(self, "cache"):
            del self.cache  # the old buffers go before the new ones come
        self.cache: KVCache = KVCache(
            self.args.n_layers, self.batch_size, self.args.n_kv_heads, max_seq_len + self.headroom, self.args.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.max_seq_len = self.attend_len = max_seq_len
        self.model.setup_rope(self.cache.max_len)

    def resize(self, max_seq_len: int) -> None:
        """Reallocate the cache for `max_seq_len` positions. Every captured graph (steps, greedy chunks,
        drafters' device steps) is dropped, to be captured again on the new cache; the cache starts empty."""
        self._allocate(resolve_max_seq_len(max_seq_len, self.context_len))

    def ensure_capacity(self, total_len: int) -> None:
        """Start a request of up to `total_len` positions: check that the cache holds them, choose
        the attention span of masked fixed-shape steps, and empty the cache."""
        if total_len > self.context_len:
            raise LabkitError(f"{total_len} positions exceed the model's context of {self.context_len} tokens")
        if total_len > self.max_seq_len:
            raise LabkitError(f"{total_len} positions exceed this engine's cache of {self.max_seq_len} "
                              f"(--max-seq-len, at most the model's context of {self.context_len})")
        # Fixed-shape steps attend over a span: the request's length rounded up to a power of two, so a short request on
        # a long cache pays for neither a mask over the whole cache (PyTorch layers) nor attention programs past its keys.
        span = max(MIN_ATTEND, 1 << max(0, total_len + GRAPH_HEADROOM - 1).bit_length())
        self.attend_len = min(self.max_seq_len, span)
        # Graph capture warms up on the cache's last positions: keep them out of reach. Near the
        # end of the cache there is no room for that headroom: steps run eagerly then.
        self._graphs_safe = self.cuda_graph and total_len + GRAPH_HEADROOM <= self.cache.max_len
        self.reset()

    @property
    def length(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.length = 0

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)

    def set_length(self, length: int) -> None:
        """Declare positions [0, length) valid (a captured speculative step knows how far it got only on the device)."""
        if not 0 <= length <= self.cache.max_len:
            raise LabkitError(f"cache length {length} is outside 0..{self.cache.max_len}")
        self.cache.length = length

    # -- steps ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, last_only: bool = False, n_layers: int | None = None) -> torch.Tensor:
        """Run T new tokens (B, T) at the next positions; returns logits (B, T or 1, vocab).

        n_layers runs only the first layers (then the final norm and head): a layer-skip draft.
        It writes those layers' cache at the new positions, which the next full pass overwrites.
        A prompt runs in one pass (PREFILL_CHUNK tokens at most per pass; captured as above): fused layers
        for up to model.fused_max_t tokens (a prompt's pass: the kernels' PROMPT_MAX_T), PyTorch layers
        (cuBLAS GEMMs, flash attention) for more.
        """
        cache = self.cache
        B, T = tokens.shape
        if B != self.batch_size:
            raise ValueError(f"engine was built for batch {self.batch_size}, got {B}")
        start = cache.length
        self._check_room(start, T)
        if (self._graphs_safe and start == 0 and last_only is True and n_layers is None and 0 < self.prompt_pass_min_t <= T
                and prefill_bucket(T) <= cache.max_len):
            graph: PrefillGraph = self.captured(("prefill", prefill_bucket(T)), lambda: PrefillGraph(self, prefill_bucket(T)))
            logits = graph.run(tokens)
            cache.length = T
            self.kept_hidden.keep(None if graph.hidden is None else graph.hidden[:, :T], T)  # one row, or every prompt row
            return logits
        chunk = self._prompt_chunk(T, self._graphs_safe)
        if T > chunk:
            outs = []
            if self.model.keep_every_hidden:
                self.kept_hidden.gather()
            for i in range(0, T, chunk):
                last_chunk = i + chunk >= T
                logits = self.forward(tokens[:, i : i + chunk], last_only=last_only, n_layers=n_layers)
                if last_chunk or not last_only:
                    outs.append(logits if last_chunk else logits.clone())  # graph outputs are overwritten by the next replay
            self.kept_hidden.gathered()
            return outs[-1] if last_only else torch.cat(outs, dim=1)
        with self.autocast():
            if self._graphs_safe and T <= GRAPH_MAX_T:
                step = self.graph_step(T, n_layers)
                logits = step.run(tokens, start)
                cache.length = start + T
                self.kept_hidden.keep(step.hidden, start + T)
                return logits[:, -1:] if last_only else logits
            input_pos = torch.arange(start, start + T, device=self.device)  # (T,)
            if self._static_step is not None and not last_only and n_layers is None and T <= GRAPH_MAX_T:
                logits = self._static_step(tokens, input_pos)
            else:
                mask = self._mask(input_pos, start, start + T)
                logits = self.model(tokens, input_pos, cache, start + T, mask, last_only, n_layers)
                if n_layers is None:
                    self.kept_hidden.keep(self.model.last_hidden, start + T)
        cache.length = start + T
        return logits

    @torch.inference_mode()
    def prompt_pass(self, tokens: torch.Tensor, input_pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """A prompt from position 0 (B, T) in one causal pass (the fused layers up to their PROMPT_MAX_T); logits
        (B, 1, V) at row `last` (a (1,) device index: captured passes pad the prompt)."""
        return self.model(tokens, input_pos, self.cache, tokens.shape[1], CAUSAL, last, None)

    def _static_forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """The fixed-shape step: attends over the first attend_len cache positions with a mask, so
        one graph serves every position of a request."""
        cache = self.cache
        mask = None if self.layer_kernels != "torch" else cache.mask(input_pos, self.attend_len, self.args.sliding_window)
        return self.model(tokens, input_pos, cache, self.attend_len, mask, False, n_layers)

    def _mask(self, input_pos: torch.Tensor, start: int, end: int) -> Any:
        """The attention mask of an eager step over positions [start, end): None where the fused
        layers run (they read each query's visible keys from the cache themselves), else the
        cache's mask (CAUSAL for a prompt from position 0)."""
        if self.layer_kernels != "torch" and self.model.runs_fused(end - start):
            return None
        return self.cache.mask(input_pos, end, self.args.sliding_window, decode_step=end - start == 1, start=start)

    def graph_step(self, T: int, n_layers: int | None, greedy: bool = False, hook: VerifyHook | None = None) -> GraphStep:
        """The captured step of T tokens (captured now if it was not)."""
        return self.captured(("step", T, n_layers, greedy, hook), lambda: GraphStep(self, T, n_layers, greedy, hook))

    def _check_room(self, start: int, n: int) -> None:
        if start + n > self.cache.max_len:
            raise LabkitError(f"{start + n} positions exceed the cache of {self.cache.max_len}; call ensure_capacity first")

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prompt (B, T) → logits of its last position (B, vocab)."""
        return self.forward(tokens, last_only=True)[:, -1]

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """One token per row (B, 1) → next-token logits (B, vocab)."""
        return self.forward(token)[:, -1]

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last accepted token + K draft tokens (B, K+1) → logits at every position (B, K+1, vocab)."""
        return self.forward(tokens)

    @torch.inference_mode()
    def verify_greedy(
        self,
        tokens: torch.Tensor,  # (B, K+1) last accepted token + K drafts
        eos_mask: torch.Tensor,  # (V,) bool: EOS ids ...
        block_rows: int,  # ... blocked in the first block_rows positions (min_new_tokens)
        hook: VerifyHook | None = None,  # a drafter's work after the verdict, in the same step
    ) -> torch.Tensor:  # (B, 2) on the device: accepted drafts, the target's next token (+ the hook's columns)
        """verify + greedy acceptance in one step; with CUDA graphs one captured graph, nothing
        launched from Python in between. With a hook, columns 2.. are what its draft_after made
        from the pass's hidden states and the verdict, read back with the verdict."""
        cache = self.cache
        if hook is not None and not self.model.keep_hidden:
            raise LabkitError("a verify hook reads the hidden states: call keep_hidden_states first")
        start, T = cache.length, tokens.shape[1]
        if self._graphs_safe and T <= GRAPH_MAX_T:
            self._check_room(start, T)
            step = self.graph_step(T, None, greedy=True, hook=hook)
            step.set_eos(eos_mask, block_rows)
            step.run(tokens, start)
            cache.length = start + T
            self.kept_hidden.keep(step.hidden, start + T)
            return step.verdict
        verdict = self.eager_verdict(self.forward(tokens), tokens, eos_mask, block_rows)  # (B, 2)
        if hook is None:
            return verdict
        hidden = self.kept_hidden.span(start, start + T)  # (B, T, D): the pass kept every row
        input_pos = torch.arange(start, start + T, device=self.device)  # (T,)
        return torch.cat([verdict, hook.draft_after(hidden, verdict, self.model.lm_head, tokens, input_pos)], 1)

    # -- hidden states (draft heads read them) -----------------------------------------------
    def keep_hidden_states(self, every_position: bool = False) -> None:
        """Keep the final hidden state of every full pass from now on (draft heads draft from it); every_position: of
        every prompt position too (EAGLE reads them all). Captured steps are dropped, to be captured again keeping it."""
        if self.compiled:
            raise LabkitError("draft heads need an engine without --compile: its compiled step cannot hand out the hidden state")
        self.model.keep_hidden = True
        self.model.keep_every_hidden = self.model.keep_every_hidden or every_position
        self.graphs.clear()

    def hidden_at(self, pos: int) -> torch.Tensor:  # -> (B, D)
        """The final hidden state at cache position `pos`, from the last full pass that covered it
        (valid until the next pass: a captured step reuses its buffer)."""
        return self.kept_hidden.at(pos)

    def hidden_span(self, start: int, end: int) -> torch.Tensor:  # -> (B, end - start, D)
        """The final hidden states at cache positions [start, end), from the last full pass (a
        prompt's passes gathered with keep_hidden_states(every_position=True))."""
        return self.kept_hidden.span(start, end)

    @property
    def greedy_chunk(self) -> int:
        """Greedy tokens per host synchronisation: several on an asynchronous device, one on the CPU (where a chunk
        would only compute tokens past an EOS for nothing)."""
        return GREEDY_CHUNK if self.device.type in ("cuda", "mps") else 1

    @torch.inference_mode()
    def decode_greedy(
        self,
        token: torch.Tensor,  # (B, 1) the last token of each row
        n: int,
        eos_mask: torch.Tensor | None = None,  # (V,) bool: tokens to block ...
        block_steps: int = 0,  # ... during the first block_steps of the n steps (min_new_tokens)
    ) -> torch.Tensor:  # (B, n) the next n greedy tokens, left on the device
        """n greedy steps with no host synchronisation between them (one CUDA graph per step
        when graphs are on). Greedy tokens are the same as n calls of decode + argmax."""
        cache = self.cache
        start = cache.length
        self._check_room(start, n)
        if self._graphs_safe and n <= GREEDY_CHUNK:
            graph: GreedyGraph = self.captured(("greedy", GREEDY_CHUNK), lambda: GreedyGraph(self, GREEDY_CHUNK))
            out = graph.run(token, start, n, eos_mask, block_steps)
            cache.length = start + n
            self.kept_hidden.keep(graph.hidden, start + n)
            return out
        outs = []
        for i in range(n):
            logits = self.decode(token)  # (B, V)
            if eos_mask is not None and i < block_steps:
                self.eager_verdict.block_eos(logits, eos_mask)
            token = logits.argmax(-1, keepdim=True)  # (B, 1)
            outs.append(token)
        return torch.cat(outs, dim=1)
