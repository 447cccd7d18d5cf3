"""Our decoder engine: a compact model plus its static KV cache, stepped by position.

    prefill(prompt)   → logits of the last prompt position
    decode(token)     → logits of the next position (one token per step)
    verify(tokens)    → logits for all T positions in one pass (speculative verify)
    rollback(n)       → forget positions >= n (O(1): the cache length lives on the host)
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any, cast

import torch

from labkit.config import Flags, resolve_device, resolve_dtype
from labkit.errors import LabkitError
from labkit.kernels import cpu_quant
from labkit.metrics.timers import now
from labkit.models.gguf_weights import attach_gguf_blocks
from labkit.models.gpt2 import GPT2
from labkit.models.kvcache import KVCache
from labkit.models.llama import LLAMA_FAMILY, Llama
from labkit.models.loading import LoadedModel, eos_token_ids


def build_decoder(hf_model: Any) -> torch.nn.Module:
    """Our compact forward for a transformers model, sharing its weights where it can."""
    model_type = hf_model.config.model_type
    if model_type in LLAMA_FAMILY:
        return Llama.from_hf(hf_model)
    if model_type == "gpt2":
        return GPT2.from_hf(hf_model)
    raise LabkitError(f"architecture {model_type!r} is not supported by labkit's engine")


def gguf_unusable(engine: Engine, loaded: LoadedModel) -> str:
    """Why the GGUF block weights cannot serve this engine ("" when they can)."""
    if loaded.gguf_path is None:
        return "the model was not loaded from a GGUF file"
    if engine.device.type != "cpu" or engine.dtype != torch.float32 or engine.amp:
        return "the block kernel runs on the CPU in float32 only"
    if engine.model.__class__ is not Llama:
        return "only Llama-family GGUF files are supported"
    if engine.layer_kernels != "torch":
        return "the fused Triton layers read dense weights"
    ok, reason = cpu_quant.available()
    return "" if ok else f"the CPU kernel is unavailable ({reason})"


LAYER_KERNELS = ("auto", "triton", "torch")


def pick_layer_ops(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, amp: bool,
                   compile: bool, choice: str) -> tuple[Any, str]:
    """The fused layer kernels for this engine: (module or None, why). "auto" takes Triton's on a
    CUDA device for a Llama-family model without AMP or torch.compile (which fuses on its own)."""
    if choice not in LAYER_KERNELS:
        raise LabkitError(f"unknown layer kernels {choice!r}: use {', '.join(LAYER_KERNELS)}")
    if choice == "torch":
        return None, "asked for torch layers"
    from labkit.kernels.registry import backend_status

    status = backend_status("triton", device)
    why_not = ""
    if not isinstance(model, Llama):
        why_not = "only Llama-family models have fused layers"
    elif model.args.head_dim not in (32, 64, 128, 256):
        why_not = f"head_dim {model.args.head_dim} is not 32, 64, 128 or 256"
    elif amp:
        why_not = "AMP keeps fp32 weights and casts per op; the fused layers need one dtype"
    elif dtype not in (torch.float32, torch.float16, torch.bfloat16):
        why_not = f"{dtype} is not a float type the kernels take"
    elif compile:
        why_not = "torch.compile fuses the layers itself (use one or the other)"
    elif device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        why_not = "bf16 tensor-core dots need compute capability 8.0 or newer"
    elif not status.ok or (choice == "auto" and not status.auto):
        why_not = f"triton: {status.reason}"
    if why_not:
        if choice == "triton":
            raise LabkitError(f"--layer-kernels triton is not possible here: {why_not}")
        return None, why_not
    from labkit.kernels import layer_triton

    return layer_triton, "Triton: 5 fused kernels per layer"


GRAPH_MAX_T = 16  # steps of up to this many tokens run as CUDA graphs; longer ones (prefill) eagerly
GRAPH_HEADROOM = GRAPH_MAX_T  # cache positions kept free at the end for capture warm-ups
GREEDY_CHUNK = 16  # greedy tokens per host synchronisation on GPUs (decode_greedy)


def capture(engine: Engine, body: Any, prepare: Any) -> torch.cuda.CUDAGraph:
    """Warm `body` up twice on a side stream (as CUDA graph capture requires), then capture it
    into the engine's graph pool. `prepare` resets the static inputs before each run."""
    device = engine.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), engine._autocast():
        for _ in range(2):
            prepare()
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    prepare()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=engine.graph_pool()), engine._autocast():
        body()
    return graph


def greedy_verdict(
    logits: torch.Tensor,  # (B, K+1, V) the verify step's logits
    tokens: torch.Tensor,  # (B, K+1) the last token and the K drafts
    eos_mask: torch.Tensor,  # (V,) bool
    block_rows: torch.Tensor,  # (1,) EOS is blocked in the first block_rows rows (min_new_tokens)
) -> torch.Tensor:  # (B, 2): accepted drafts, and the target's token after them
    """Greedy acceptance on the device (the registry's greedy_verdict: the target's argmax per
    position, EOS blocked where asked, then the accepted prefix). The same tokens as GreedyMatch."""
    from labkit.kernels import registry

    return registry.get("greedy_verdict", tokens.device)(logits, tokens, eos_mask, block_rows)


def heads_after_verdict(
    heads: Any,  # DraftHeads
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,  # (B, K+1, D) the verify pass's final hidden states
    verdict: torch.Tensor,  # (B, 2) accepted drafts, the target's next token
) -> torch.Tensor:  # (B, n_heads) greedy draft for the step after this one
    """The heads' draft from the hidden state that predicted the verdict's next token: row
    `accepted` of the verify pass (row 0 is the last token before the drafts). The same tokens as
    HeadsDrafter.propose after the step, without a host round trip in between."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
    return heads.draft(hidden[rows, verdict[:, 0]], lm_head, heads.cfg.n_heads)


class GraphStep:
    """One captured fixed-shape step (T tokens, optionally the first n layers only).

    Inputs are copied into static buffers and the graph replays; the logits it returns live in
    the graph's output buffer and are valid until the next replay of this step. Warm-up and
    capture write keys and values at the cache's last T positions, which `ensure_capacity`
    keeps beyond any request's reach.

    With `greedy`, the graph also decides greedy acceptance of the T-1 drafts (greedy_verdict):
    a speculative step replays one graph and reads back two integers, instead of launching the
    EOS mask, the argmax and the comparison from Python. With `draft_heads` it also runs the
    engine's draft heads on the hidden state of the last accepted position, so the same read
    brings back the next step's draft (heads_after_verdict).
    """

    def __init__(self, engine: Engine, T: int, n_layers: int | None, greedy: bool = False, draft_heads: bool = False) -> None:
        cache = engine.cache
        assert cache is not None
        device = engine.device
        self.T = T
        self.tokens = torch.zeros(engine.batch_size, T, dtype=torch.long, device=device)  # (B, T)
        self.input_pos = torch.arange(cache.max_len - T, cache.max_len, device=device)  # (T,)
        step = engine._static_step or engine._static_forward  # compiled (fused kernels) when --compile
        self.logits = torch.empty(0)
        self.eos_mask = torch.zeros(engine.args.vocab_size if greedy else 0, dtype=torch.bool, device=device)  # (V,)
        self.block_rows = torch.zeros(1, dtype=torch.long, device=device)  # (1,) EOS blocked in rows < this
        self.verdict = torch.empty(0)  # (B, 2) with greedy

        def body() -> None:
            self.logits = step(self.tokens, self.input_pos, n_layers)  # (B, T, V): the graph's output buffer
            if greedy:
                verdict = greedy_verdict(self.logits, self.tokens, self.eos_mask, self.block_rows)  # (B, 2)
                if draft_heads:  # (B, 2 + n_heads): the next step's draft, from this pass's hidden state
                    verdict = torch.cat([verdict, heads_after_verdict(engine.heads, engine.model.lm_head, engine.model.last_hidden, verdict)], 1)
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
        cache = engine.cache
        assert cache is not None
        device, B = engine.device, engine.batch_size
        V = engine.args.vocab_size
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) input, then output
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,) position being written
        self.step_idx = torch.zeros(1, dtype=torch.long, device=device)  # (1,) steps done in this chunk
        self.block_steps = torch.zeros(1, dtype=torch.long, device=device)  # EOS blocked while step_idx < this
        self.eos_mask = torch.zeros(V, dtype=torch.bool, device=device)  # (V,)
        self.out = torch.zeros(B, chunk, dtype=torch.long, device=device)  # (B, chunk)
        step = engine._static_step or engine._static_forward

        def body() -> None:
            logits = step(self.token, self.pos, None)[:, -1]  # (B, V)
            blocked = self.eos_mask & (self.step_idx < self.block_steps)  # (V,)
            nxt = logits.masked_fill(blocked, float("-inf")).argmax(-1, keepdim=True)  # (B, 1)
            self.out.index_copy_(1, self.step_idx, nxt)
            self.token.copy_(nxt)
            self.pos.add_(1)
            self.step_idx.add_(1)

        def prepare() -> None:  # warm-ups write the cache's last position, out of every request's reach
            self.pos.fill_(cache.max_len - 1)
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


class Engine:
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
        max_seq_len: int = 1024,
        layer_kernels: str = "auto",
    ) -> None:
        if cuda_graph and device.type != "cuda":
            raise LabkitError(f"CUDA graphs need a CUDA device, not {device}")
        self.device, self.dtype, self.amp = device, dtype, amp
        self.cuda_graph = cuda_graph
        self._graphs_safe = cuda_graph  # set per request by ensure_capacity
        self._graphs: dict[tuple[int, int | None, bool, bool], GraphStep] = {}  # (T, n_layers, greedy verdict, heads draft)
        self._greedy_graph: GreedyGraph | None = None
        self.heads: Any = None  # draft heads (attach_heads): the model then keeps its final hidden states
        self._hidden: torch.Tensor | None = None  # (B, T, D) final hidden states of the last full pass ...
        self._hidden_start = 0  # ... whose first row is this cache position
        weight_dtype = torch.float32 if amp else dtype
        self.model: Any = model.to(device=device, dtype=weight_dtype).eval()  # Llama or GPT2
        ops, self.layer_kernels_reason = pick_layer_ops(self.model, device, dtype, amp, compile, layer_kernels)
        self.layer_kernels = "torch" if ops is None else "triton"
        if isinstance(self.model, Llama):
            self.model.layer_ops = ops
        self.args: Any = cast(Any, model).args  # LlamaArgs or GPT2Args
        self.context_len: int = self.args.context_len
        self.batch_size = batch_size
        self.eos_token_ids: tuple[int, ...] = ()  # set by from_hf; generate stops on these
        self.weights = "dense"  # or "gguf": linears read the GGUF's quantised blocks
        self.cache: KVCache | None = None
        self._allocate(min(max_seq_len, self.context_len))
        # Fixed-shape steps (decode, verify of K+1) attend over the whole cache with a mask,
        # so one compiled graph serves every position.
        self._static_step: Any = None
        if compile:
            import torch._dynamo as dynamo

            # decode (T=1) compiles for its static shape; the second width (a verify) makes dynamo
            # compile once more with T dynamic, which then serves every verify width 2..K+1
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
            self._static_step = torch.compile(self._static_forward, fullgraph=True)

    @classmethod
    def from_hf(
        cls,
        hf_model: Any,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        *,
        amp: bool | None = None,
        compile: bool = False,
        cuda_graph: bool | None = None,
        batch_size: int = 1,
        max_seq_len: int = 1024,
        layer_kernels: str = "auto",
    ) -> Engine:
        """Build from a transformers model. None reads the SPECDEC_* flags: dtype (default auto),
        amp, cuda_graph. layer_kernels: "auto", "triton" (fused Llama layers) or "torch"."""
        flags = Flags.from_env()
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or flags.dtype, dev)
        if dev.type != "cpu":  # the weights are copied there: refuse clearly rather than crash
            from labkit.doctor import check_fits, estimate_model_bytes

            check_fits(estimate_model_bytes(hf_model.config, dt, max_seq_len), dev, f"the {hf_model.config.model_type} model")
        engine = cls(
            build_decoder(hf_model), device=dev, dtype=dt, amp=flags.amp if amp is None else amp,
            compile=compile, cuda_graph=flags.cuda_graph if cuda_graph is None else cuda_graph,
            batch_size=batch_size, max_seq_len=max_seq_len, layer_kernels=layer_kernels,
        )
        engine.eos_token_ids = eos_token_ids(hf_model)
        return engine

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        *,
        weights: str = "auto",
        **kwargs: Any,
    ) -> Engine:
        """Build for a loaded model. weights: "dense", "gguf" (the GGUF's own quantised blocks,
        CPU fp32 only), or "auto" (gguf where it applies, else dense)."""
        if weights not in ("auto", "dense", "gguf"):
            raise LabkitError(f"unknown weights {weights!r}: use auto, dense or gguf")
        engine = cls.from_hf(loaded.hf_model, device, dtype, **kwargs)
        why_not = gguf_unusable(engine, loaded)
        if weights == "gguf" and why_not:
            raise LabkitError(f"--weights gguf is not possible here: {why_not}")
        if weights == "gguf" or (weights == "auto" and not why_not):
            assert loaded.gguf_path is not None
            attach_gguf_blocks(engine.model, loaded.gguf_path)
            engine.weights = "gguf"
        return engine

    def graph_pool(self) -> Any:
        if getattr(self, "_pool", None) is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    # -- cache management -------------------------------------------------------------
    def _allocate(self, max_len: int) -> None:
        self._graphs = {}  # captured graphs point into the old cache
        self._greedy_graph = None
        cache_dtype = self.dtype
        self.cache = KVCache(
            self.args.n_layers, self.batch_size, self.args.n_kv_heads, max_len, self.args.head_dim,
            dtype=cache_dtype, device=self.device,
        )
        self.model.setup_rope(max_len)

    def ensure_capacity(self, total_len: int) -> None:
        """Make room for `total_len` positions (up to the model's context); resets the cache."""
        if total_len > self.context_len:
            raise LabkitError(f"{total_len} positions exceed the model's context of {self.context_len} tokens")
        assert self.cache is not None
        # Graph capture warms up on the cache's last positions: keep them out of reach.
        need = min(self.context_len, total_len + GRAPH_HEADROOM) if self.cuda_graph else total_len
        if need > self.cache.max_len:
            self._allocate(min(self.context_len, max(need, 2 * self.cache.max_len)))
        assert self.cache is not None
        # Near the end of the context there is no room for that headroom: steps run eagerly then.
        self._graphs_safe = self.cuda_graph and total_len + GRAPH_HEADROOM <= self.cache.max_len
        self.reset()

    @property
    def length(self) -> int:
        assert self.cache is not None
        return self.cache.length

    def reset(self) -> None:
        assert self.cache is not None
        self.cache.length = 0

    def rollback(self, length: int) -> None:
        assert self.cache is not None
        self.cache.rollback(length)

    # -- steps ------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, last_only: bool = False, n_layers: int | None = None) -> torch.Tensor:
        """Run T new tokens (B, T) at the next positions; returns logits (B, T or 1, vocab).

        n_layers runs only the first layers (then the final norm and head): a layer-skip draft.
        It writes those layers' cache at the new positions, which the next full pass overwrites.
        """
        cache = self.cache
        assert cache is not None
        B, T = tokens.shape
        if B != self.batch_size:
            raise ValueError(f"engine was built for batch {self.batch_size}, got {B}")
        start = cache.length
        self._check_room(start, T)
        if self._graphs_safe and T > GRAPH_MAX_T:
            # A long input (a prompt) as captured chunks of GRAPH_MAX_T tokens: a few graph replays
            # instead of one eager pass of hundreds of small kernels launched from Python.
            outs = []
            for i in range(0, T, GRAPH_MAX_T):
                last_chunk = i + GRAPH_MAX_T >= T
                logits = self.forward(tokens[:, i : i + GRAPH_MAX_T], last_only=last_only, n_layers=n_layers)
                if last_chunk or not last_only:
                    outs.append(logits if last_chunk else logits.clone())  # graph outputs are overwritten by the next replay
            return outs[-1] if last_only else torch.cat(outs, dim=1)
        with self._autocast():
            if self._graphs_safe and T <= GRAPH_MAX_T:
                step = self._graph_step(T, n_layers)
                logits = step.run(tokens, start)
                cache.length = start + T
                self._keep_hidden(step.hidden, start + T)
                return logits[:, -1:] if last_only else logits
            input_pos = torch.arange(start, start + T, device=self.device)  # (T,)
            if self._static_step is not None and not last_only and n_layers is None:
                logits = self._static_step(tokens, input_pos)
            else:
                mask = self._mask(input_pos, start + T, decode_step=T == 1)
                logits = self.model(tokens, input_pos, cache, start + T, mask, last_only, n_layers)
                if n_layers is None:
                    self._keep_hidden(self.model.last_hidden, start + T)
        cache.length = start + T
        return logits

    def _static_forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """The fixed-shape step: attends over the whole cache with a mask, so one graph serves every position."""
        cache = self.cache
        assert cache is not None
        mask = self._mask(input_pos, cache.max_len)
        return self.model(tokens, input_pos, cache, cache.max_len, mask, False, n_layers)

    def _mask(self, input_pos: torch.Tensor, attend_len: int, decode_step: bool = False) -> torch.Tensor | None:
        """(T, attend_len) attention mask for the PyTorch layers; the fused layers need none: they
        read each query's visible keys from the cache themselves."""
        assert self.cache is not None
        if self.layer_kernels == "triton":
            return None
        return self.cache.mask(input_pos, attend_len, self.args.sliding_window, decode_step=decode_step)

    def _graph_step(self, T: int, n_layers: int | None, greedy: bool = False, draft_heads: bool = False) -> GraphStep:
        key = (T, n_layers, greedy, draft_heads)
        step = self._graphs.get(key)
        if step is None:
            assert self.cache is not None
            step = GraphStep(self, T, n_layers, greedy, draft_heads)
            self._graphs[key] = step
        return step

    def _check_room(self, start: int, n: int) -> None:
        assert self.cache is not None
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
        draft_heads: bool = False,  # also draft the next step with the attached heads
    ) -> torch.Tensor:  # (B, 2) on the device: accepted drafts, the target's next token (+ n_heads drafts)
        """verify + greedy acceptance in one step; with CUDA graphs one captured graph, nothing
        launched from Python in between. With draft_heads, columns 2.. are the heads' draft for
        the next step (heads_after_verdict), read back with the verdict."""
        cache = self.cache
        assert cache is not None
        if draft_heads and self.heads is None:
            raise LabkitError("draft_heads needs heads attached to the engine (attach_heads)")
        start, T = cache.length, tokens.shape[1]
        if self._graphs_safe and T <= GRAPH_MAX_T:
            self._check_room(start, T)
            step = self._graph_step(T, None, greedy=True, draft_heads=draft_heads)
            step.set_eos(eos_mask, block_rows)
            step.run(tokens, start)
            cache.length = start + T
            self._keep_hidden(step.hidden, start + T)
            return step.verdict
        logits = self.forward(tokens)  # (B, K+1, V)
        verdict = greedy_verdict(logits, tokens, eos_mask, torch.tensor([block_rows], device=self.device))  # (B, 2)
        if not draft_heads:
            return verdict
        assert self._hidden is not None and self._hidden_start == start and self._hidden.shape[1] == T  # one pass kept every row
        return torch.cat([verdict, heads_after_verdict(self.heads, self.model.lm_head, self._hidden, verdict)], 1)

    # -- draft heads ----------------------------------------------------------------------
    def attach_heads(self, heads: torch.nn.Module) -> None:
        """Keep the final hidden state of every full pass from now on, for `heads` to draft from.
        Captured steps are dropped, to be captured again with that state kept."""
        if self._static_step is not None:
            raise LabkitError("draft heads need an engine without --compile: its compiled step cannot hand out the hidden state")
        self.heads = heads.to(device=self.device, dtype=self.dtype).eval()
        self.model.keep_hidden = True
        self._graphs.clear()
        self._greedy_graph = None

    def _keep_hidden(self, hidden: torch.Tensor | None, end: int) -> None:  # hidden: (B, rows, D) for positions up to end-1
        if hidden is not None:  # None unless heads are attached (the model keeps nothing then)
            self._hidden, self._hidden_start = hidden, end - hidden.shape[1]

    def hidden_at(self, pos: int) -> torch.Tensor:  # -> (B, D)
        """The final hidden state at cache position `pos`, from the last full pass that covered it
        (valid until the next pass: a captured step reuses its buffer)."""
        if self._hidden is None:
            raise LabkitError("no hidden states kept: attach draft heads before decoding")
        row = pos - self._hidden_start
        if not 0 <= row < self._hidden.shape[1]:
            raise LabkitError(f"position {pos} is not in the last pass (positions {self._hidden_start}.."
                              f"{self._hidden_start + self._hidden.shape[1] - 1})")
        return self._hidden[:, row]

    @torch.inference_mode()
    def time_verify(self, max_k: int, reps: int = 5) -> dict[int, float]:
        """Median seconds (host clock, device synchronised) of a verify of K drafts, i.e. K+1
        tokens, for K = 0..max_k: the shape of a step's cost against its width, measured on this
        device for the cost-aware controller. Widths take turns so drift hits them alike; the
        first round is a warm-up. Runs at the cache's start and leaves the cache empty."""
        self.ensure_capacity(max_k + 1)
        tokens = torch.zeros(self.batch_size, max_k + 1, dtype=torch.long, device=self.device)  # (B, max_k+1)
        times: dict[int, list[float]] = {K: [] for K in range(max_k + 1)}
        for rep in range(reps + 1):
            for K in times:
                self.reset()
                t0 = now(self.device)
                self.forward(tokens[:, : K + 1])
                if rep:
                    times[K].append(now(self.device) - t0)
        self.reset()
        return {K: statistics.median(ts) for K, ts in times.items()}

    @torch.inference_mode()
    def warm_up(self, max_t: int = 1) -> None:
        """Capture (and compile) every step shape up to `max_t` tokens, and the greedy chunk, now
        rather than inside a timed request. A speculative verify is 2..K+1 tokens wide (and
        has a greedy-verdict graph of its own)."""
        verify_t = min(max_t, GRAPH_MAX_T)
        if self.cuda_graph:  # prompts run as chunks of up to GRAPH_MAX_T tokens
            max_t = max(max_t, GRAPH_MAX_T)
        self.ensure_capacity(max_t + 1)
        token = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        eos_mask = torch.zeros(self.args.vocab_size, dtype=torch.bool, device=self.device)
        for T in range(1, max_t + 1):
            self.reset()
            self.forward(token.expand(self.batch_size, T).contiguous())
            if 2 <= T <= verify_t:
                self.reset()
                self.verify_greedy(token.expand(self.batch_size, T).contiguous(), eos_mask, 0)
                if self.heads is not None and T <= self.heads.cfg.n_heads + 1:  # the verifies that also draft
                    self.reset()
                    self.verify_greedy(token.expand(self.batch_size, T).contiguous(), eos_mask, 0, draft_heads=True)
        self.reset()
        self.decode_greedy(token, 1)
        self.reset()

    @property
    def greedy_chunk(self) -> int:
        """Greedy tokens decoded per host synchronisation: several on an asynchronous device,
        one on the CPU (where a chunk would only compute tokens past an EOS for nothing)."""
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
        assert cache is not None
        start = cache.length
        self._check_room(start, n)
        if self._graphs_safe and n <= GREEDY_CHUNK:
            if self._greedy_graph is None:
                self._greedy_graph = GreedyGraph(self, GREEDY_CHUNK)
            out = self._greedy_graph.run(token, start, n, eos_mask, block_steps)
            cache.length = start + n
            self._keep_hidden(self._greedy_graph.hidden, start + n)
            return out
        outs = []
        for i in range(n):
            logits = self.decode(token)  # (B, V)
            if eos_mask is not None and i < block_steps:
                logits = logits.masked_fill(eos_mask, float("-inf"))
            token = logits.argmax(-1, keepdim=True)  # (B, 1)
            outs.append(token)
        return torch.cat(outs, dim=1)
