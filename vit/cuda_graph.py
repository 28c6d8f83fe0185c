"""One CUDA graph for a whole step (forward, loss, backward, optimizer): no host time per kernel on replay.

    x, y = static_x, static_y                      # the step reads these; copy each batch in before a replay
    def step():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    graph, loss = flashvit.capture_cuda_graph(step, grads_of=model.parameters())
    for xb, yb in loader:
        x.copy_(xb); y.copy_(yb)
        graph.replay()                             # loss and the parameters' .grad hold this batch's values
        optimizer.step()                           # no zero_grad(): each replay writes the gradients anew

flashvit's ops allow it: none syncs with the host or bakes a host-side value (attention dropout's seed is a
device draw) into its launches. Kernels compile and autotune in the warm-up calls, outside the capture. Both
run inside ``graph_step()``, where 'auto' picks each op's path by device time (a replay costs the host
nothing): LayerNorm's kernels then train at every width, not only from D = 768.
"""

from __future__ import annotations

from typing import Callable, Iterable, Tuple, TypeVar

import torch
from torch import nn

from flashvit.kernels._dispatch import graph_step

T = TypeVar("T")


def capture_cuda_graph(fn: Callable[[], T], grads_of: Iterable[nn.Parameter] = (),
                       warmup: int = 2) -> Tuple[torch.cuda.CUDAGraph, T]:
    """``fn()`` captured in one CUDA graph on the current device: returns (graph, fn's output at capture).

    The output's tensors are the graph's own, rewritten by every ``graph.replay()``. First ``warmup`` calls
    run on a side stream (kernel compiles and autotuning, cuBLAS workspaces, an optimizer's state: all outside
    the capture). The gradients of ``grads_of`` are set to None before each warm-up call and before the
    capture, so a captured backward allocates them in the graph and each replay writes them anew (no
    accumulation); after the capture nothing may set them to None while the graph or an optimizer uses them.
    """
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (kernels must compile before the capture), got {warmup}")
    if not torch.cuda.is_available():
        raise RuntimeError("capture_cuda_graph needs a CUDA device")
    params = list(grads_of)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with graph_step():  # 'auto' picks the ops' paths by device time, the same in the warm-up and the capture
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for p in params:
                    p.grad = None
                fn()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out
