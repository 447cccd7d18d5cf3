"""On a CPU: the texts `heads train` writes, on the dense weights (the PyTorch layers' invariant tiles of 16 rows)
and on the GGUF blocks (the C layer operations' rows, CPU_WRITING_ROWS at once), in turns; the rate of each and
whether they wrote the same texts. python scripts/cpu_writing.py [TEXTS] [ROUNDS]"""
import sys
import time

import torch

from labkit.engine import Engine
from labkit.heads_train import REQUEST_OPENERS, HeadsTrainConfig, chat_frame, self_written_texts
from labkit.models.loading import load_model
from labkit.specdec.heads import HeadsConfig

n, rounds = (int(a) for a in (sys.argv[1:] + ["16", "2"][len(sys.argv) - 1 :])[:2])
loaded = load_model()
tok = loaded.tokenizer
frame = chat_frame(tok)
openers = [list(tok(t, add_special_tokens=False).input_ids) for t in REQUEST_OPENERS]
bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=2), texts=n, progress=False)
engines = {w: Engine.from_loaded(loaded, torch.device("cpu"), torch.float32, weights=w) for w in ("dense", "gguf")}
seconds: dict[str, list[float]] = {w: [] for w in engines}
texts = {}
for r in range(rounds):
    for w, engine in (engines.items() if r % 2 == 0 else reversed(engines.items())):
        t0 = time.perf_counter()
        texts[w] = self_written_texts(engine, int(bos), cfg, frame, openers)
        seconds[w].append(time.perf_counter() - t0)
        print(f"round {r}: {w} ({engine.layer_kernels} layers) {n} texts in {seconds[w][-1]:.1f} s", flush=True)
for w, s in seconds.items():
    print(f"{w}: {min(s) / n:.3f} s a text (best of {rounds})")
print(f"gguf blocks / dense: {min(seconds['dense']) / min(seconds['gguf']):.2f}x; texts the same both ways: "
      f"{sum(a == b for a, b in zip(texts['dense'], texts['gguf'], strict=True))} of {n}; torch threads {torch.get_num_threads()}")
