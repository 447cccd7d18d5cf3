"""How well an EAGLE head predicts on the features of each way labkit runs the target (diagnostic, CPU).

    python3 scripts/eagle_feature_gap.py EAGLE_FOLDER TEXTS_FILE [N] [WEIGHTS,...]

A head is trained on the features of the engine that wrote its texts (a GPU's bf16 target). On the CPU
the target runs in fp32, on the GGUF's blocks (`gguf`) or with 8-bit activations (`gguf-q8`), and its
hidden states differ from the bf16 ones. This takes the last N texts of a texts file (`heads train
--texts-file`), makes each engine's features for them, and reports the head's top-1 given the drafts
before at each depth (the held-out figure `heads train` reports), per way of running the target.
"""

import json
import sys

import torch

from labkit.eagle_train import EagleTrainConfig, FrozenEmbedding, TextBatch, eagle_loss_counts, engine_features
from labkit.engine import Engine
from labkit.models.loading import load_model
from labkit.specdec.eagle import draft_head_weight, load_eagle, vocab_index
from labkit.specdec.heads import fingerprint


def main() -> None:
    folder, texts_path = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    ways = sys.argv[4].split(",") if len(sys.argv) > 4 else ["dense:bfloat16", "dense:float32", "gguf:float32", "gguf-q8:float32"]
    texts = [(list(t), int(f)) for t, f in json.load(open(texts_path))["texts"][-n:]]
    loaded = load_model("default")
    cfg = EagleTrainConfig()
    for way in ways:
        weights, dtype = way.split(":")
        engine = Engine.from_loaded(loaded, "cpu", dtype, weights=weights, max_seq_len=-(-max(len(t) for t, _ in texts) // 64) * 64)
        head = load_eagle(folder, fingerprint(engine.model.lm_head.weight)).float()
        lm = engine.model.lm_head.weight.detach().float()
        weight, index = draft_head_weight(head, lm), vocab_index(head.vocab_ids, lm.shape[0])
        feats = engine_features(engine, [t for t, _ in texts])
        hits = torch.zeros(head.cfg.depth)
        seen = torch.zeros(head.cfg.depth)
        with torch.no_grad():
            for i in range(0, n, 16):
                items = [(f.float(), t, first) for f, (t, first) in zip(feats[i : i + 16], texts[i : i + 16], strict=True)]
                _, h, s = eagle_loss_counts(head, TextBatch.of(items), FrozenEmbedding(engine.model), weight, index, head.cfg.depth, cfg)
                hits, seen = hits + h, seen + s
        top1 = (hits / seen.clamp(min=1)).tolist()
        print(f"{way:18s} top-1 by depth " + " ".join(f"{p:.1%}" for p in top1), flush=True)


if __name__ == "__main__":
    main()
