"""What a tiny PyTorch op costs inside a captured CUDA graph (diagnostic; prints a replay's time).

    python3 scripts/graph_op_cost.py

Graphs of 1, 9, 17, 33 and 65 small ops on (4, 4) tensors (a subtraction, a gather, a concatenation, a
scatter in turn: the kind a device step runs around its kernels), each replayed 100 times, median of 7.
"""

import time

import torch

dev = "cuda"
x = torch.arange(16, device=dev).view(4, 4)
h = torch.zeros(4, 1024, dtype=torch.long, device=dev)
L = torch.full((4,), 100, device=dev)


def glue(n: int) -> torch.Tensor:
    y, last, g = x, L[:, None], x[:, :1]
    for i in range(n):
        if i % 4 == 0:
            last = (L - 1)[:, None]
        elif i % 4 == 1:
            g = h.gather(1, last)
        elif i % 4 == 2:
            y = torch.cat([g, y[:, 1:]], 1)
        else:
            y = y.scatter(1, last.clamp(max=3), g)
    return y


for n in (1, 9, 17, 33, 65):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            glue(n)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        glue(n)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(100):
            graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 100 * 1e6)
    print(f"{n} tiny ops in a graph: {sorted(times)[3]:.1f} us a replay")
