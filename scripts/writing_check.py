"""On a GPU: the texts `heads train` writes (continuously batched, the sampled user turns drawn by
sample_rows) against `generate` one at a time, and the writing's rate. python3 scripts/writing_check.py [N] [CHECK]"""
import sys
import time

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import generate, warm_up
from labkit.heads_train import REQUEST_OPENERS, HeadsTrainConfig, chat_frame, self_written_texts
from labkit.models.loading import load_model
from labkit.specdec.heads import HeadsConfig

n, check = (int(a) for a in (sys.argv[1:] + ["1024", "16"][len(sys.argv) - 1 :])[:2])
loaded = load_model()
tok = loaded.tokenizer
engine = Engine.from_loaded(loaded, torch.device("cuda"), torch.bfloat16, weights="dense", cuda_graph=True)
warm_up(engine)
frame = chat_frame(tok)
openers = [list(tok(t, add_special_tokens=False).input_ids) for t in REQUEST_OPENERS]
cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=2), texts=n, progress=False)
bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
torch.cuda.synchronize()
t0 = time.perf_counter()
texts = self_written_texts(engine, int(bos), cfg, frame, openers)
torch.cuda.synchronize()
s = time.perf_counter() - t0
print(f"{n} texts in {s:.1f} s: {1000 * s / n:.2f} ms a text ({torch.cuda.get_device_name()})")
same = 0
for i in range(check):
    tokens, first = texts[i]
    start = [*frame[0], *openers[i % len(openers)]]
    user = generate(engine, start, GenerationConfig(max_new_tokens=cfg.user_tokens, temperature=1.0, top_p=0.95, seed=cfg.seed + i, stop_at_eos=True)).tokens
    while user and user[-1] in set(engine.eos_token_ids):
        user = user[:-1]
    prefix = [*start, *user, *frame[1]]
    answer = generate(engine, prefix, GenerationConfig(max_new_tokens=cfg.greedy_tokens, min_new_tokens=cfg.greedy_tokens, stop_at_eos=False)).tokens
    same += prefix + answer == tokens and first == len(prefix)
print(f"texts identical to generate's one at a time: {same} of {check}")
