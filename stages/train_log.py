"""What `coreg train` logs per epoch: test accuracy of the prediction model, the one-line summary with the
loss and its terms, and the metrics.jsonl trim on resume (split from stages/train.py)."""

from __future__ import annotations

import json
from pathlib import Path


def test_accuracy(method, augment, images, labels, ctx) -> dict[str, float]:
    """Test accuracy of the prediction model and of net1 alone: logged, never used to pick a checkpoint.
    Each process scores its share of the rows; counts are summed, so every row counts exactly once."""
    import torch

    dist = ctx.dist
    rows = dist.shard(images.shape[0])
    mine = torch.arange(rows.start, rows.stop, device=images.device)
    known = labels[mine] >= 0
    averaged = bool(getattr(method, "avg", None))  # --ema-epochs: also score the trained weights (diagnostic)
    counts = torch.zeros(4, device=images.device, dtype=torch.float64)
    with torch.no_grad():
        for c in mine.split(1024):
            x = augment.normalize(images[c])
            lab = labels[c]
            ok = lab >= 0
            counts[0] += (method.predict_logits(x).argmax(1) == lab)[ok].sum()
            counts[1] += (method.predict_logits(x, "net1").argmax(1) == lab)[ok].sum()
            if averaged:
                counts[3] += (method.predict_logits(x, averaged=False).argmax(1) == lab)[ok].sum()
    counts[2] = known.sum()
    counts = dist.all_reduce_sum(counts)
    if counts[2] == 0:
        return {}
    out = {"test_acc": float(counts[0] / counts[2]), "test_acc_net1": float(counts[1] / counts[2])}
    if averaged:
        out["test_acc_trained"] = float(counts[3] / counts[2])
    return out


# Loss terms the methods log beside their total `loss` (pipeline/coreg/step.py, pipeline/baselines/).
LOSS_TERMS = ("partial_ce", "neg_entropy", "ce", "l_x", "l_u", "proto", "cont", "penalty")


def loss_text(m: dict, net: str = "net1") -> str:
    """net1's loss with its terms. The warm-up loss is partial CE plus a *negative* entropy, so the total is
    often below zero: printing the bare total reads like a bug, printing the sum does not."""
    loss = m[f"{net}/loss"]
    terms = {t: m[f"{net}/{t}"] for t in LOSS_TERMS if f"{net}/{t}" in m}
    if not terms:
        return f"{net}/loss={loss:.4f}"
    if abs(sum(terms.values()) - loss) <= 1e-4 * max(1.0, abs(loss)):  # an unweighted sum: show it as one
        return f"{net}/loss={loss:.4f} = " + " + ".join(f"{t} {v:.4f}" for t, v in terms.items())
    if len(terms) == 1:  # e.g. dividemix's warm-up logs its CE, not the negative-entropy penalty added to it
        (t, v), = terms.items()
        return f"{net}/loss={loss:.4f} = {t} {v:.4f} + other terms {loss - v:.4f}"
    return f"{net}/loss={loss:.4f} (" + ", ".join(f"{t} {v:.4f}" for t, v in terms.items()) + ")"


def summary(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch'] + 1}/{epochs}"]
    for k in ("net1/loss", "net1/n_p", "net1/n_u", "test_acc", "test_acc_net1", "images_per_second"):
        if k in m:
            v = m[k]
            if k == "net1/loss":
                parts.append(loss_text(m))
            else:
                parts.append(f"{k}={v:.0f}" if k.startswith("net1/n_") or k == "images_per_second" else f"{k}={v:.4f}")
    parts.append(f"{m['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def trim_metrics(path: Path, start: int) -> None:
    """On resume, drop epochs at or after `start` (a killed run may have logged an epoch it never saved)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] < start]
    path.write_text("".join(line + "\n" for line in keep))
