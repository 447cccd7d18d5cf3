"""What every benchmark shares: the run order that rotates so that slow drift favours no system,
the parameters a results file records, transformers' `generate` timed the same way everywhere,
and the results files checked before and written during and after a run."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch

from labkit.bench.results import RowLog
from labkit.config import GenerationConfig
from labkit.metrics.timers import now

T = TypeVar("T")
UNRECORDED = ("progress",)  # config fields that change no number (a progress bar)


def rotated(items: list[T], shift: int) -> list[T]:
    """The run order for one round: `items` rotated by `shift` (the round's index), so that every
    system goes first as often as the others and a machine's slow drift hits them alike."""
    if not items:
        return []
    shift %= len(items)
    return items[shift:] + items[:shift]


def run_params(cfg: Any) -> dict[str, Any]:
    """A benchmark config as its results file records it (nested configs as dicts)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in UNRECORDED}


def time_hf_generate(hf_model: Any, prompt_ids: list[int], gen: GenerationConfig, device: torch.device,
                     streamer: Any = None, **assist: Any) -> tuple[list[int], float]:
    """transformers greedy `generate` on the same prompt and length: (new tokens, seconds). A
    streamer sees the prompt, then each new token, as transformers hands them out; `assist` are
    transformers' assisted-generation arguments (prompt lookup, an assistant model)."""
    ids = torch.tensor([prompt_ids], device=device)
    t0 = now(device)
    with torch.inference_mode():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen.max_new_tokens,
            min_new_tokens=gen.min_new_tokens or None, do_sample=False, num_beams=1,
            pad_token_id=hf_model.generation_config.pad_token_id or 0, streamer=streamer, **assist,
        )
    elapsed = now(device) - t0
    return out[0, len(prompt_ids):].tolist(), elapsed


def log2_panels(fig: Any, panels: list[tuple[Any, str]], xlabel: str, title: str, path: Any = None) -> None:
    """A figure's (matplotlib axes, title) panels against a size that doubles: a log-2 x axis, its label, a grid and a
    legend each; the figure's title, its layout, and the figure saved at `path` (None: not saved)."""
    for ax, panel in panels:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)


def start_log(output_dir: str | None, stem: str) -> RowLog | None:
    """Check where the results files go before anything is measured (None: write nothing); they are claimed at the first row."""
    return RowLog(output_dir, stem) if output_dir else None


def finish_log(log: RowLog | None, payload: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Write the payload and rows where start_log claimed; the paths written (also payload["files"])."""
    if log is None:
        return []
    json_path, csv_path = log.finish(payload, rows)
    payload["files"] = [str(json_path), str(csv_path)]
    return payload["files"]
