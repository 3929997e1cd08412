"""Checks of `coreg train` that stop a run early with an actionable message, or warn: memory for the decoded
images, class collapse, non-finite losses and weights (split from stages/train.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.errors import CoregError

# Working memory of one step besides the decoded images, in float32 batch copies: the weak and strong views
# of a 2x warm-up batch and their augmentation temporaries (a rough floor, not a bound: activations come on top).
BATCH_COPIES = 4


def available_memory(gpu: bool) -> int:
    """Bytes free now: host RAM, or on a GPU run the smaller of RAM and the device's free memory."""
    import psutil

    free = psutil.virtual_memory().available
    if gpu:
        import torch

        free = min(free, torch.cuda.mem_get_info()[0])
    return int(free)


def check_memory(size: int, n_train: int, n_test: int, batch_size: int, asked: int, *, gpu: bool) -> None:
    """Refuse an image size whose decoded uint8 tensors alone do not fit, before minutes of decoding end in
    the kernel's OOM killer (which prints nothing)."""

    def need(s: int) -> int:
        return (n_train + n_test) * 3 * s * s + BATCH_COPIES * 2 * batch_size * 3 * s * s * 4

    free = available_memory(gpu)
    if need(size) <= free:
        return
    fits = next((s for s in range(min(size, 224), 7, -1) if need(s) <= 0.8 * free), None)
    hint = f"use --image-size {fits} or less" if fits else "free some memory or use fewer images"
    which = f"--image-size {asked}" if asked else f"the training images' size ({size} px)"
    raise CoregError(
        f"{which}: {n_train + n_test} decoded images at {size} px plus one batch need about {need(size) / 2**30:.1f} GiB, "
        f"but {free / 2**30:.1f} GiB of {'GPU ' if gpu else ''}memory is free; {hint} (or a smaller --batch-size)"
    )


def collapse_warning(metrics: dict, num_classes: int) -> bool:
    """Warn (once per run) when a network stops predicting some class on the training images (methods that
    log `NET/pred_classes`, e.g. coreg). Label-free; returns whether it warned."""
    low = {k.split("/")[0]: int(v) for k, v in metrics.items() if k.endswith("/pred_classes") and v < num_classes}
    if not low:
        return False
    name, k = next(iter(low.items()))
    print(
        f"warning: epoch {metrics['epoch'] + 1}: {name} predicts only {k} of {num_classes} classes on the training "
        "images; self-training rarely brings a lost class back. If it persists, compare with another --method "
        "(kd, ce) or try --prior-penalty 1 (README: 'Class collapse')",
        flush=True,
    )
    return True


def check_finite(metrics: dict, epoch: int, last_saved: int, cfg: TrainConfig, out: Path) -> None:
    """Stop at the first epoch whose loss terms are not finite: a NaN loss only spreads (the weights follow),
    and a NaN model would still predict, evaluate and export without complaint."""
    import math

    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return
    kept = f"the checkpoint of epoch {last_saved + 1} is kept in {out}" if last_saved >= 0 else "nothing was saved"
    cause = f"the learning rate is too high for this data (--lr {cfg.lr:g}; try --lr {cfg.lr / 10:g})"
    if cfg.mixed_precision == "fp16":
        cause += " or fp16 overflowed (try --mixed-precision bf16)"
    raise CoregError(
        f"epoch {epoch + 1}: the loss is not finite ({', '.join(f'{k}={metrics[k]}' for k in bad[:3])}); training stopped "
        f"and {kept}. Likely cause: {cause}; start again with the changed option in a new OUT"
    )


def save_checked(out, method, model_config, save_model, shift=None) -> None:
    """`shift`: {net: (C,) logit shift} folded into each network's last bias (pipeline/prior_shift.py)."""
    weights = method.prediction_weights()
    for n, d in (shift or {}).items():
        weights[f"{n}.fc.bias"] = weights[f"{n}.fc.bias"] + d.to(weights[f"{n}.fc.bias"])
    # The loss check catches almost every divergence; this one guarantees that no non-finite weights are ever
    # written, whatever produced them.
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
    if bad is not None:
        raise CoregError(f"{out}: the weights hold non-finite values ({bad}); model.safetensors was not written and the "
                         "last good checkpoint is kept. Lower --lr and start again in a new OUT")
    nets, predict_with = prediction_nets(weights, model_config["train_config"]["predict_with"])
    save_model(out, weights=weights, config={**model_config, "nets": nets, "predict_with": predict_with})


def prediction_nets(weights: dict, predict_with: str) -> tuple[list[str], str]:
    """The networks in `prediction_weights()` (keys `net1.<param>`, ...) and what the saved model predicts with:
    the configured `--predict-with` for two networks, `net1` for one."""
    nets = sorted({k.split(".", 1)[0] for k in weights})
    return nets, (predict_with if len(nets) == 2 else "net1")
