"""What Co-Reg and DivideMix share: two networks trained in turn, each with its own SGD optimiser, predicting
with the sum of both networks' logits (or one of them), and an endless U loader.

Subclasses set `name`, call `TwoNetworks.__init__` and add their own modules and epoch logic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.training import Context, make_sgd

NETS = ("net1", "net2")


class TwoNetworks:
    def __init__(self, cfg, *, num_classes: int, make_net: Callable[[], nn.Module]):
        self.cfg, self.C = cfg, num_classes
        self.raw = {n: make_net() for n in NETS}
        self.wrapped = dict(self.raw)  # replaced by prepare() (e.g. a device-placed / compiled module)
        self.opts = {n: make_sgd(cfg, self.raw[n]) for n in NETS}
        self.avg: dict[str, AveragedModel] = {}  # prediction copies (`average_weights`); empty: predict with `raw`

    def average_weights(self, steps_per_epoch: int) -> None:
        """Predict with an exponential moving average of each network's weights and BatchNorm statistics
        (`--ema-epochs`, not in the paper): decay 1 - 1/(ema_epochs x steps per epoch), so the average spans
        about that many epochs of this run whatever its size. Training reads only `raw`; `update_average` after
        each optimiser step keeps the copies; they are what predict_logits and model.safetensors use."""
        tau = float(self.cfg.ema_epochs or 0) * max(1, steps_per_epoch)  # optimiser steps the average spans
        if tau > 0:
            fn = get_ema_multi_avg_fn(1.0 - 1.0 / max(tau, 1.0))
            self.avg = {n: AveragedModel(self.raw[n], multi_avg_fn=fn, use_buffers=True).requires_grad_(False) for n in NETS}

    def update_average(self, n: str) -> None:
        # AveragedModel reads its update count on the host (one device sync per step on a GPU): acceptable for an
        # option that is off in both presets; the default path never reaches this
        if self.avg:
            self.avg[n].update_parameters(self.raw[n])

    # --- Method protocol -------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {**self.raw, **{f"{n}_avg": m for n, m in self.avg.items()}}

    def predictor(self, n: str, averaged: bool = True) -> nn.Module:
        """The network that predicts for `n`: its weight average where there is one, else the trained net."""
        return self.avg[n].module if (averaged and self.avg) else self.raw[n]

    def optimizers(self):
        return self.opts

    def prepare(self, prepare) -> None:
        for n in NETS:
            self.wrapped[n], self.opts[n] = prepare(self.raw[n], self.opts[n])

    def extra_state(self) -> dict[str, Tensor]:
        return {}

    def load_extra_state(self, state) -> None:
        pass

    def prediction_weights(self) -> dict[str, Tensor]:
        return {f"{n}.{k}": v.detach().cpu().contiguous() for n in NETS for k, v in self.predictor(n).state_dict().items()}

    @torch.no_grad()
    def predict_logits(self, x: Tensor, which: str = "default", averaged: bool = True) -> Tensor:
        """Sum of both networks' logits (`ensemble`) or one network's, in eval mode (`--predict-with`); with
        their weight averages where `--ema-epochs` keeps them (`averaged=False`: the trained weights)."""
        which = self.cfg.predict_with if which == "default" else which
        if which not in ("ensemble", *NETS):
            from pipeline.errors import CoregError

            raise CoregError(f"which={which!r} is unknown; choose default, ensemble, net1 or net2")
        out = 0
        for n in NETS if which == "ensemble" else (which,):
            net = self.predictor(n, averaged)
            was = net.training
            net.eval()
            out = out + net(x).float()
            net.train(was)
        return out


def cycle(rows: Tensor, batch: int, ctx: Context, key: tuple):
    """Endless global batches of `rows`, reshuffled on every pass (the U loader cycles).

    `batch == 0` (U empty, or fewer U rows than processes) yields empty batches: a non-empty one would not
    split evenly over the processes (`Dist.rows` asserts), so those few rows sit out the epoch.
    """
    if batch == 0:
        while True:
            yield rows[:0]
    k = 0
    while True:
        g = ctx.rng(*key, k)
        order = rows[torch.randperm(rows.numel(), generator=g, device=g.device).to(rows.device)]
        for s in range(0, order.numel() - batch + 1, batch):
            yield order[s : s + batch]
        k += 1
