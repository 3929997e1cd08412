"""pipeline.checkpoint: the fp16 gradient scaler survives a resume, and loading runs no pickled code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline.errors import CoregError


class _Method:
    """The slice of the Method protocol that checkpoints use."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)

    def modules(self):
        return {"net1": self.net}

    def optimizers(self):
        return {"net1": self.opt}

    def extra_state(self):
        return {"history": torch.arange(3.0)}

    def load_extra_state(self, state):
        self.history = state["history"]


def _trained_scaler(method: _Method) -> torch.amp.GradScaler:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    for _ in range(2):  # two finite steps: the growth tracker counts them
        method.opt.zero_grad()
        scaler.scale(method.net(torch.randn(8, 3)).square().mean()).backward()
        scaler.step(method.opt)
        scaler.update()
    scaler.update(new_scale=512.0)  # as after a few overflows backed the scale off
    return scaler


def test_the_gradient_scaler_is_saved_and_restored(tmp_path):
    method = _Method(0)
    scaler = _trained_scaler(method)
    config = {"mixed_precision": "fp16", "lr": 0.1, "betas": (0.9, 0.99), "note": None}
    ckpt.save_checkpoint(tmp_path, epoch=4, method=method, config=config, scaler=scaler)

    state = ckpt.check_resumable(tmp_path, config)  # torch.load(weights_only=True) reads it
    fresh, fresh_scaler = _Method(1), torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    assert ckpt.restore(state, fresh, scaler=fresh_scaler) == 5
    assert fresh_scaler.state_dict() == scaler.state_dict()
    assert fresh_scaler.get_scale() == 512.0
    for a, b in zip(fresh.net.state_dict().values(), method.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(fresh.history, torch.arange(3.0))


def test_a_run_without_a_scaler_saves_none_and_restores_without_one(tmp_path):
    method = _Method(0)
    ckpt.save_checkpoint(tmp_path, epoch=0, method=method, config={})
    state = ckpt.check_resumable(tmp_path, {})
    assert state["scaler"] is None
    assert ckpt.restore(state, _Method(1)) == 1


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint would carry: code run at load time
        return (print, ("pwned",))


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path, capsys):
    torch.save({"config": {}, "epoch": 0, "payload": _Payload()}, tmp_path / ckpt.CHECKPOINT)
    with pytest.raises(CoregError, match="cannot read the checkpoint"):
        ckpt.check_resumable(tmp_path, {})
    assert "pwned" not in capsys.readouterr().out
