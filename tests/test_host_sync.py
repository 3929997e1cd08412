"""No host-device sync inside a training step (issue 11).

A GPU run is fast only while the host queues kernels ahead of the device; every read of a device value on the
host (`.item()`, `float(t)`, `if t:`, `.tolist()`, a size known only after a kernel ran) stops the host until
the device has caught up. These tests run Co-Reg (and the baselines) on the CPU and watch the step loops,
from the first batch to the last (not the per-epoch division and metric reduction around them), for
everything that would sync on a GPU:

- Python-level reads of a tensor: `item`, `tolist`, `float()`, `int()`, `bool()`, `__index__`, `cpu`, `numpy`;
- `torch.tensor` / `torch.as_tensor` of host data: on a GPU that is a blocking copy to the device, which
  PyTorch follows with a stream sync;
- operators whose output size depends on the data, so ATen reads it on the host: `nonzero`,
  `masked_select`, `bincount`, `unique`, `repeat_interleave` without `output_size`, and indexing with a
  boolean mask, read or write (which expands the mask with `nonzero`). One exception, ATen's own: writing a
  one-element host value through a single mask (`x[mask] = 0.0`) becomes `masked_fill_`, no sync
  (`canDispatchToMaskedFill`; torchvision's autocontrast does this).

Left out, because they read the host only on the CPU: `F.one_hot(t, num_classes)` checks its input's range
with `.item()` on the CPU, and on CUDA relies on device asserts instead (ATen's Onehot.cpp); without
`num_classes` it reads the maximum on every device, so that form is counted.

The training device here is the CPU, so the augmentation is forced onto its accelerator path
(`group_ops=False`; the CPU path reads the per-op counts, free on the CPU). Mixup's λ is a host number drawn
from a CPU generator (`sample_lambda` refuses any other): its `.item()` reads a host tensor, not the device,
so it is left out of the count and counted on its own (one per mixup step).
"""

from __future__ import annotations

import traceback
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.augment import BatchAugment

aten = torch.ops.aten

TENSOR_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
HOST_DATA = ("tensor", "as_tensor")
DATA_SIZED = {
    aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default, aten._local_scalar_dense.default,
}  # fmt: skip
INDEX_PUT = {aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _mask(indices) -> list:
    return [i for i in indices if i is not None and i.dtype in (torch.bool, torch.uint8)]


def sync_of(func, args, kwargs) -> str | None:
    """The reason `func(*args, **kwargs)` would sync on a GPU, or None."""
    if func in DATA_SIZED:
        return str(func)
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return str(func)
    if func is aten.index.Tensor and _mask(args[1]):
        return "indexing with a boolean mask"
    if func in INDEX_PUT and _mask(args[1]):
        single = len([i for i in args[1] if i is not None]) == 1
        if not (single and args[2].numel() == 1 and args[2].device.type == "cpu"):  # else: masked_fill_
            return "writing through a boolean mask"
    return None


class Watch(TorchDispatchMode):
    """Records every would-be sync while `on`, with the line of pipeline/ code that made it."""

    def __init__(self):
        super().__init__()
        self.on, self.paused, self.found, self.lambdas = False, False, [], 0
        self.loops: list[list] = []  # [description, steps] of every step loop

    def note(self, what: str) -> None:
        if self.on and not self.paused:
            here = [f for f in traceback.extract_stack() if "/pipeline/" in f.filename]
            self.found.append(f"{what} at {here[-1].filename.split('/pipeline/')[-1]}:{here[-1].lineno}" if here else what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = sync_of(func, args, kwargs)
        if why:
            self.note(why)
        return func(*args, **kwargs)

    def progress(self, it, total, desc):
        """Ctx.progress: the loop's body runs while this generator waits at its yield."""
        self.loops.append(loop := [desc, 0])
        self.on = True
        try:
            for item in it:
                loop[1] += 1
                yield item
        finally:
            self.on = False

    def steps(self, prefix: str) -> int:
        return sum(n for desc, n in self.loops if desc.startswith(prefix))


@pytest.fixture
def watch(monkeypatch):
    w = Watch()
    for name in TENSOR_READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, _noting(w, f"Tensor.{name}", real))
    for name in HOST_DATA:
        monkeypatch.setattr(torch, name, _noting(w, f"torch.{name}", getattr(torch, name)))
    import pipeline.baselines.alim as alim_mod
    import pipeline.baselines.dividemix as dividemix_mod
    import pipeline.coreg.step as step_mod

    for mod in (step_mod, dividemix_mod, alim_mod):
        monkeypatch.setattr(mod, "sample_lambda", _lambda(w, mod.sample_lambda))
    monkeypatch.setattr(torch.nn.functional, "one_hot", _one_hot(w, torch.nn.functional.one_hot))
    return w


def _noting(w: Watch, what: str, real):
    def wrapper(*a, **k):
        w.note(what)
        return real(*a, **k)

    return wrapper


def _lambda(w: Watch, real):
    def wrapper(alpha, generator):
        assert generator.device.type == "cpu"
        w.lambdas += 1
        was, w.paused = w.paused, True
        try:
            return real(alpha, generator)
        finally:
            w.paused = was

    return wrapper


def _one_hot(w: Watch, real):
    def wrapper(t, num_classes=-1):
        if num_classes < 1:
            w.note("one_hot without num_classes")
        was, w.paused = w.paused, True  # its range checks run on the CPU only
        try:
            return real(t, num_classes)
        finally:
            w.paused = was

    return wrapper


def _accelerator_like(ctx):
    """The context with the accelerator's augmentation, its constants already on the device (they are copied
    there once per run, at the first view)."""
    a = ctx.augment
    aug = BatchAugment(image_size=a.image_size, mean=a.mean, std=a.std, hflip=a.hflip, group_ops=False)
    aug.strong(ctx.images[:1], ctx.rng("constants"))
    return aug


def _run(watch, method, ctx, epochs):
    ctx = replace(ctx, progress=watch.progress)
    ctx = replace(ctx, augment=_accelerator_like(ctx))
    with watch:
        return [method.train_epoch(e, ctx) for e in epochs]


@pytest.mark.parametrize(
    "options",
    [{}, {"prior_penalty": 1.0, "contrast": "supcon"},
     {"division": "class", "epoch_steps": "all", "warmup_loss": "vlm", "partner_scores": "vlm"}],
    ids=["paper", "penalty-supcon", "default-mechanisms"],
)  # fmt: skip
def test_coreg_steps_do_not_sync(watch, options):
    from test_coreg_method import make_cfg, make_ctx, make_method

    cfg = make_cfg(**options)
    ctx = make_ctx(trusted=(0, 1, 2))  # diagnostics on (diag_label), trusted rows in P
    metrics = _run(watch, make_method(cfg), ctx, range(3))  # warm-up; Co-Reg without, then with, the terms
    assert [d for d, _ in watch.loops] == ["warm-up net1", "warm-up net2"] + ["co-reg net1", "co-reg net2"] * 2
    assert watch.steps("warm-up") > 0 and watch.steps("co-reg") > 0
    assert watch.found == []
    assert watch.lambdas == watch.steps("co-reg")  # one host λ per Co-Reg step, never read from a device
    assert all("net1/loss" in m and "net2/loss" in m for m in metrics)


def test_the_watch_sees_the_syncs_it_looks_for(watch):
    """The instrument itself: each kind of sync is seen inside a step loop, none outside it."""
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    for _ in watch.progress(iter([0]), 1, "probe"):
        with watch:
            float(x.sum())
            x[mask]
            x[mask] = torch.ones(3)
            x[mask] = 0.0  # masked_fill_: not a sync
            torch.bincount(x.long())
            torch.tensor([1.0])
            torch.nn.functional.one_hot(x.long())
            torch.nn.functional.one_hot(x.long(), 6)  # checks its range on the host on the CPU only
    assert [f.split(" at ")[0] for f in watch.found] == [
        "Tensor.__float__", str(aten._local_scalar_dense.default), "indexing with a boolean mask",
        "writing through a boolean mask", str(aten.bincount.default), "torch.tensor", "one_hot without num_classes",
    ]  # fmt: skip
    watch.found.clear()
    with watch:
        x.sum().item()  # outside a step loop: the per-epoch reductions may read
    assert watch.found == []


@pytest.mark.parametrize("name", ["ce", "kd", "proden", "cc", "cr_dpll", "pico", "alim", "dividemix"])
def test_baseline_steps_do_not_sync(watch, name):
    from test_baselines import make_ctx, make_method

    _run(watch, make_method(name), make_ctx(), range(2))  # epoch 1: after DivideMix's warm-up, ALIM's λ set
    assert sum(n for _, n in watch.loops) > 0
    assert watch.found == []
