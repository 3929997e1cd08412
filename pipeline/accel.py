"""Glue between the training loop and Accelerate (used by stages/train.py).

- `make_dist`: the `pipeline.training.Dist` of this run (gather with or without gradient, all-reduce sum,
  broadcast from rank 0);
- `average_grads`: one flattened all-reduce of every gradient, used instead of DDP because Co-Reg and the
  two-network baselines run several forward passes per step;
- `GracefulStop`: the first Ctrl-C finishes the epoch and saves it, a second one stops at once.
"""

from __future__ import annotations


def make_dist(accelerator):
    import torch

    from pipeline.training import Dist

    if accelerator.num_processes == 1:
        return Dist()

    def gather(t):
        if t.dtype == torch.bool:  # gloo cannot all-gather bools
            return accelerator.gather(t.to(torch.uint8)).bool()
        return accelerator.gather(t.contiguous())

    def gather_grad(t):
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous()))

    def broadcast(t):
        import torch.distributed

        torch.distributed.broadcast(t, src=0)  # in place; Accelerate initialised the default process group
        return t

    return Dist(
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        gather=gather,
        gather_grad=gather_grad,
        all_reduce_sum=lambda t: accelerator.reduce(t.clone(), "sum"),
        broadcast=broadcast,
    )


class GracefulStop:
    """First Ctrl-C: finish the current epoch, save it, stop (so --resume continues exactly). Second: stop now
    (the last saved epoch is kept)."""

    def __init__(self, main: bool):
        self.main, self.flag, self.previous = main, False, None

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if self.main:
            print("\nCtrl-C: finishing this epoch and saving it; press Ctrl-C again to stop at once", flush=True)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False

    def requested(self, dist, device) -> bool:
        import torch

        return bool(dist.all_reduce_sum(torch.tensor([float(self.flag)], device=device)).item() > 0)


def average_grads(modules, accelerator) -> None:
    """Average the gradients that exist (the same parameters on every process: the code path is the same)."""
    import torch

    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "sum") / accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
