"""Resumable training checkpoints: everything a run needs to continue exactly where it stopped.

One file, `OUT/checkpoint.pt`, replaced atomically after each saved epoch: every module's state (networks,
momentum encoders, queues, prototypes, loss histories), every optimiser, the fp16 gradient scaler (its loss
scale and growth tracker: without them a resume would restart the scale and skip steps while it re-learns
it), the method's extra tensors, the epoch, the resolved config and the RNG states. It holds only tensors and
plain Python values, so it is read with `torch.load(weights_only=True)`: loading runs no pickled code. Because all training randomness is counter-based (see
pipeline/training.py), resuming from epoch k gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from pipeline.errors import CoregError

CHECKPOINT = "checkpoint.pt"
# Options that may differ between a run and its resume: they change neither the computation nor its result
# (`epochs` may grow to extend a run; with lr_period = 0 it changes the schedule, which is checked below).
RESUME_FREE = {"resume", "num_workers", "tensorboard", "out", "annotated", "save_every", "epochs", "compile", "prior_shift"}  # prior_shift: read once, after the last epoch


def save_checkpoint(out: Path, *, epoch: int, method, config: dict, scaler=None) -> None:
    """`scaler`: the run's `torch.amp.GradScaler` (Accelerate's `accelerator.scaler`; None unless fp16)."""
    state = {
        "epoch": epoch,
        "config": config,
        "modules": {k: m.state_dict() for k, m in method.modules().items()},
        "optimizers": {k: o.state_dict() for k, o in method.optimizers().items()},
        "extra": method.extra_state(),
        "rng": {"torch": torch.get_rng_state()},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".checkpoint.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make a shared model folder unreadable to others
    try:
        torch.save(state, tmp)
        os.replace(tmp, out / CHECKPOINT)  # a kill mid-write leaves the previous checkpoint intact
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def result_changing(old: dict, new: dict, start: int) -> list[str]:
    """The options whose change would change the epochs already run (0..start-1): those a resume must refuse.

    Free: RESUME_FREE; an option only other `--method`s read (`only=` in pipeline/config.py); and, while Co-Reg
    is still in its warm-up (every epoch so far was a warm-up epoch under the old and the new
    --warmup-epochs), the options it reads only after the warm-up (`from_warmup=True`) and --warmup-epochs
    itself, unless the warm-up loss ramps the network's weight over --warmup-epochs (`vlm-hard-net`, the
    default, and `vlm-net[-soft]`: their warm-up steps read it). Everything else, including any option without
    a declaration, counts as result-changing.
    """
    import dataclasses

    from pipeline.config import TrainConfig
    from pipeline.coreg.method import WITH_NET, warmup_losses

    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    method = old.get("method")
    warm = method == new.get("method") == "coreg" and start <= min(old.get("warmup_epochs", 0), new.get("warmup_epochs", 0))
    ramped = any(w in WITH_NET for w in warmup_losses(old.get("warmup_loss") or ""))  # the warm-up steps themselves read --warmup-epochs (the net's ramp)
    diff = []
    for k in sorted(set(old) | set(new)):
        if k in RESUME_FREE or old.get(k) == new.get(k):
            continue
        m = meta.get(k, {})
        if k != "method" and "only" in m and method not in m["only"] and new.get("method") == method:
            continue
        if warm and (m.get("from_warmup") or (k == "warmup_epochs" and not ramped)):
            continue
        diff.append(k)
    return diff


def check_resumable(out: Path, config: dict) -> dict:
    """Load the checkpoint and refuse it when an option that shaped the epochs already run has changed (naming
    those options); other changes take effect from the next epoch on."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise CoregError(f"{out}: --resume given but there is no {CHECKPOINT}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CoregError(f"{path}: cannot read the checkpoint ({type(e).__name__}); delete it to start over") from None
    old = state.get("config", {})
    diff = result_changing(old, config, int(state.get("epoch", -1)) + 1)
    if old.get("lr_period") == 0 and old.get("epochs") != config.get("epochs"):
        diff.append("epochs (the cosine schedule follows the run length with --lr-period 0)")
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {config.get(k)!r}" for k in diff[:4] if k in old)
        if shown and len(diff) > 4:
            shown += f" and {len(diff) - 4} more"
        hint = ""
        if config.get("preset") == "default" and old.get("epochs") != config.get("epochs"):
            hint = " (the default preset derives the schedule and the self-training views from --epochs: keep --epochs, or give these options explicitly)"
        raise CoregError(
            f"{out}: the checkpoint was written with other options ({shown or ', '.join(diff)}){hint}; "
            "resume with the original options or train into a new OUT"
        )
    return state


def restore(state: dict, method, scaler=None) -> int:
    """Load a checkpoint's state into a freshly built method (and the fp16 gradient scaler, when the run has
    one); returns the first epoch still to run."""
    mods, opts = method.modules(), method.optimizers()
    for k, m in mods.items():
        m.load_state_dict(state["modules"][k])
    for k, o in opts.items():
        o.load_state_dict(state["optimizers"][k])
    method.load_extra_state(state.get("extra", {}))
    if scaler is not None and state.get("scaler"):  # fp16 is a resume-checked option: both sides agree
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["epoch"]) + 1
