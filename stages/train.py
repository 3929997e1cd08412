"""`coreg train ANNOTATED OUT`: train a method on an annotated dataset and write the model directory.

The loop follows the Accelerate examples: Accelerator → data → networks → optimisers → one `prepare` →
epochs. It runs unchanged on CPU, one GPU, several GPUs and several machines (`accelerate launch -m
stages.cli train ...`). Every process holds the decoded images; the method takes its rows of each global
batch, and everything computed over the whole dataset is gathered (pipeline/training.py).

OUT holds config.json + model.safetensors (refreshed with every checkpoint, so an interrupted run still has
a usable model), metrics.jsonl (one object per epoch) and checkpoint.pt (for --resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from pipeline.accel import GracefulStop, average_grads, make_dist
from pipeline.config import TrainConfig, check
from pipeline.errors import CoregError


def check_options(cfg: TrainConfig) -> None:
    """Everything about the options that can be checked without the data: the declarations in
    pipeline/config.py (ranges, choices, --warmup-epochs <= --epochs) and the architecture's name. `coreg run`
    calls it before annotating, so a typo never costs an annotation."""
    check(cfg)
    if cfg.arch and cfg.arch not in ("preact_resnet18", "small_cnn") and not (cfg.arch.startswith("timm:") and cfg.arch[5:]):
        raise CoregError(f"--arch {cfg.arch!r} is unknown; choose one of: preact_resnet18, small_cnn, timm:NAME")


def _check_out(out: Path, resume: bool) -> None:
    from pipeline.checkpoint import CHECKPOINT

    if out.exists() and not out.is_dir():
        raise CoregError(f"{out}: exists and is a file; choose a folder for the model")
    if not out.exists() or not any(out.iterdir()):
        return
    if resume:
        return
    if (out / CHECKPOINT).exists() or (out / "config.json").exists():
        raise CoregError(f"{out}: holds a previous training run; add --resume to continue it or choose a new OUT")
    raise CoregError(f"{out}: exists and holds other files; choose an empty or new folder for the model")


def _columns(ds, device):
    """The small contract columns as tensors on the device."""
    import numpy as np
    import torch

    from pipeline.schema import candidate_matrix

    classes = ds.features["label"].names
    small = ds.select_columns(["candidates", "vlm_probs", "vlm_pred", "label", "trusted"])
    cols = small.to_dict()
    label = torch.as_tensor(np.asarray(cols["label"], dtype=np.int64))
    trusted = torch.as_tensor(np.asarray(cols["trusted"], dtype=bool))
    return {
        "candidates": torch.as_tensor(candidate_matrix(cols["candidates"], len(classes))).to(device),
        "vlm_probs": torch.as_tensor(np.asarray(cols["vlm_probs"], dtype=np.float32)).to(device),
        "vlm_pred": torch.as_tensor(np.asarray(cols["vlm_pred"], dtype=np.int64)).to(device),
        "trusted": trusted.to(device),
        "trusted_label": torch.where(trusted, label, torch.full_like(label, -1)).to(device),
        "label": label.to(device),
    }


def resolve_preset(cfg: TrainConfig, *, n_rows: int, quiet: bool = False) -> TrainConfig:
    """Fill the options left unset from --preset (pipeline/presets.py) and say what was chosen."""
    import torch

    from pipeline.presets import describe, resolve

    gpu = torch.cuda.is_available() and not cfg.cpu
    cfg, filled = resolve(cfg, n_rows=n_rows, gpu=gpu)
    line = describe(cfg.preset, filled)
    if line and not quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"{line} ({n_rows} training images, {'GPU' if gpu else 'CPU'})", flush=True)
    return cfg


def run(cfg: TrainConfig) -> Path:
    """Disk → disk: ANNOTATED → OUT (model directory)."""
    check_options(cfg)  # before the data: options left unset (None / "") are checked once the preset filled them
    out = Path(cfg.out)
    _check_out(out, cfg.resume)
    from pipeline.methods import get_method_module
    from pipeline.schema import load_annotated

    method_module = get_method_module(cfg.method)  # unknown --method fails before any heavy work
    dsd, classes = load_annotated(cfg.annotated, stage="coreg train")
    n = len(dsd["train"])
    if n < 2:
        raise CoregError(f"{cfg.annotated}: the train split has {n} image(s); training needs at least two")
    cfg = resolve_preset(cfg, n_rows=n)
    check_options(cfg)
    if cfg.batch_size > n:
        raise CoregError(f"--batch-size {cfg.batch_size} is larger than the {n} training images; use --batch-size {max(1, n // 2)} or less")
    return train(cfg, dsd, classes, method_module)


def train(cfg: TrainConfig, dsd, classes: list[str], method_module) -> Path:
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from pipeline import checkpoint as ckpt
    from pipeline.augment import BatchAugment
    from pipeline.data import PREPROCESSING, channel_stats, decode_images, default_image_size
    from pipeline.model_io import library_versions, save_model
    from pipeline.networks import build_student
    from pipeline.training import Context, sync_buffers

    out = Path(cfg.out)
    mp = cfg.mixed_precision
    gpu = torch.cuda.is_available() and not cfg.cpu
    if mp == "auto":
        mp = "bf16" if gpu else "no"
    if mp == "fp16" and not gpu:
        raise CoregError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    accelerator = Accelerator(
        cpu=cfg.cpu, mixed_precision=mp, log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(out)
    )
    main = accelerator.is_main_process
    device = accelerator.device
    train_ds = dsd["train"]
    size = cfg.image_size or default_image_size(train_ds)
    num_classes = len(classes)

    def make_net():
        return build_student(cfg.arch, num_classes=num_classes, image_size=size, proj_dim=cfg.proj_dim, pretrained=cfg.timm_pretrained)

    n_test = len(dsd["test"]) if "test" in dsd else 0
    _check_memory(size, len(train_ds), n_test, cfg.batch_size, cfg.image_size, gpu=device.type == "cuda")
    make_net()  # an architecture that cannot take this image size fails now, before decoding
    images = decode_images(train_ds, size=size, num_workers=cfg.num_workers, desc="decoding train" if main else None)
    mean, std = channel_stats(images)
    cols = _columns(train_ds, device)
    test = None
    if "test" in dsd and len(dsd["test"]):
        t_cols = _columns(dsd["test"], device)
        if (t_cols["label"] >= 0).any():
            test = (decode_images(dsd["test"], size=size, num_workers=cfg.num_workers, desc="decoding test" if main else None).to(device), t_cols["label"])
    images = images.to(device)
    augment = BatchAugment(image_size=size, mean=mean, std=std, hflip=cfg.hflip)

    torch.manual_seed(cfg.seed)  # identical initial weights on every process and every run
    method = method_module.build(cfg, num_classes=num_classes, make_net=make_net, num_rows=images.shape[0])
    for m in method.modules().values():
        m.to(device)
        if device.type == "cuda":
            m.to(memory_format=torch.channels_last)

    # No DDP wrapper: a Co-Reg step runs the trained network several times (mixup batch, contrastive queries,
    # no-grad views) and the warm-up leaves the projector unused, which DDP's reducer rejects. Instead the
    # optimiser is prepared (mixed-precision scaling) and `backward` averages the gradients of the networks
    # handed to `prepare` with one flattened all-reduce: the same update DDP would make.
    trainables: list = []

    def prepare(model, opt):
        trainables.append(model)
        return (torch.compile(model) if cfg.compile else model), accelerator.prepare(opt)

    method.prepare(prepare)

    def backward(loss):
        accelerator.backward(loss)
        if accelerator.num_processes > 1:
            average_grads(trainables, accelerator)
    resolved = {**dataclasses.asdict(cfg), "image_size": size, "mixed_precision": mp}
    start = 0
    if cfg.resume and (out / ckpt.CHECKPOINT).exists():
        start = ckpt.restore(ckpt.check_resumable(out, resolved), method, scaler=accelerator.scaler)
        if main:
            print(f"resuming {out} at epoch {start}")
    elif cfg.resume:
        ckpt.check_resumable(out, resolved)  # raises the "no checkpoint" error

    def progress(it, total, desc):
        return tqdm(it, total=total, desc=desc, leave=False, disable=not main, unit="step")

    ctx = Context(
        images=images, candidates=cols["candidates"], trusted=cols["trusted"], trusted_label=cols["trusted_label"],
        vlm_probs=cols["vlm_probs"], vlm_pred=cols["vlm_pred"], augment=augment, dist=make_dist(accelerator),
        seed=cfg.seed, device=device, backward=backward, autocast=accelerator.autocast, progress=progress,
        diag_label=cols["label"] if (cols["label"] >= 0).any() else None,
    )
    model_config = {
        "classes": list(classes), "arch": cfg.arch, "image_size": size, "mean": mean, "std": std,
        "proj_dim": cfg.proj_dim, "method": cfg.method, "preprocessing": PREPROCESSING, "train_config": resolved,
        "seed": cfg.seed, "versions": library_versions(),
    }
    if main:
        print(
            f"training {cfg.method} ({cfg.arch}, {size}px) on {images.shape[0]} images, {num_classes} classes; "
            f"{accelerator.num_processes} process(es) on {device.type}, mixed precision {mp}; epochs {start}..{cfg.epochs - 1}"
        )
        out.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out / "metrics.jsonl", start)
        if cfg.tensorboard:
            accelerator.init_trackers("coreg")
    rows_per_epoch = images.shape[0]
    stop = GracefulStop(main)
    warned = False
    last_saved = start - 1  # the epoch the checkpoint on disk holds (-1: none)
    with stop:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            # BatchNorm running statistics drift apart on each process (no DDP); the epoch's eval-mode
            # division pass runs before any training in it, so rank 0's statistics everywhere make that pass
            # (and its gathered division) the one network rank 0 saves. See `sync_buffers` for the other calls.
            for m in method.modules().values():
                sync_buffers(m, ctx.dist)
            metrics = method.train_epoch(epoch, ctx)
            # The metrics are process-averaged, so every process takes the same decision here, before this
            # epoch's weights can reach model.safetensors or the checkpoint (both keep the last good epoch).
            _check_finite(metrics, epoch, last_saved, cfg, out)
            seconds = time.perf_counter() - t0
            metrics = {"epoch": epoch, **metrics, "epoch_seconds": seconds, "images_per_second": rows_per_epoch / max(seconds, 1e-9)}
            if test is not None:
                for m in method.modules().values():  # the test pass is in eval mode too, after this epoch's training
                    sync_buffers(m, ctx.dist)
                metrics.update(_test_accuracy(method, augment, *test, ctx))
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                print(_summary(metrics, cfg.epochs), flush=True)
                warned = warned or _collapse_warning(metrics, num_classes)
                if cfg.tensorboard:
                    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=epoch)
            stopping = stop.requested(ctx.dist, device)  # every process stops after the same epoch
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or stopping:
                accelerator.wait_for_everyone()
                if main:
                    _save_model(out, method, model_config, save_model)
                    ckpt.save_checkpoint(out, epoch=epoch, method=method, config=resolved, scaler=accelerator.scaler)
                last_saved = epoch
            if stopping:
                if main:
                    print(f"stopped after epoch {epoch + 1} and saved it")  # the CLI says how to continue
                raise KeyboardInterrupt
    accelerator.wait_for_everyone()
    if main:
        _save_model(out, method, model_config, save_model)
        print(f"model written to {out}")
    if cfg.tensorboard:
        accelerator.end_training()
    return out


# Working memory of one step besides the decoded images, in float32 batch copies: the weak and strong views
# of a 2x warm-up batch and their augmentation temporaries (a rough floor, not a bound: activations come on top).
_BATCH_COPIES = 4


def _available_memory(gpu: bool) -> int:
    """Bytes free now: host RAM, or on a GPU run the smaller of RAM and the device's free memory."""
    import psutil

    free = psutil.virtual_memory().available
    if gpu:
        import torch

        free = min(free, torch.cuda.mem_get_info()[0])
    return int(free)


def _check_memory(size: int, n_train: int, n_test: int, batch_size: int, asked: int, *, gpu: bool) -> None:
    """Refuse an image size whose decoded uint8 tensors alone do not fit, before minutes of decoding end in
    the kernel's OOM killer (which prints nothing)."""

    def need(s: int) -> int:
        return (n_train + n_test) * 3 * s * s + _BATCH_COPIES * 2 * batch_size * 3 * s * s * 4

    free = _available_memory(gpu)
    if need(size) <= free:
        return
    fits = next((s for s in range(min(size, 224), 7, -1) if need(s) <= 0.8 * free), None)
    hint = f"use --image-size {fits} or less" if fits else "free some memory or use fewer images"
    which = f"--image-size {asked}" if asked else f"the training images' size ({size} px)"
    raise CoregError(
        f"{which}: {n_train + n_test} decoded images at {size} px plus one batch need about {need(size) / 2**30:.1f} GiB, "
        f"but {free / 2**30:.1f} GiB of {'GPU ' if gpu else ''}memory is free; {hint} (or a smaller --batch-size)"
    )


def _collapse_warning(metrics: dict, num_classes: int) -> bool:
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


def _check_finite(metrics: dict, epoch: int, last_saved: int, cfg: TrainConfig, out: Path) -> None:
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


def _save_model(out, method, model_config, save_model) -> None:
    weights = method.prediction_weights()
    # The loss check catches almost every divergence; this one guarantees that no non-finite weights are ever
    # written, whatever produced them.
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
    if bad is not None:
        raise CoregError(f"{out}: the weights hold non-finite values ({bad}); model.safetensors was not written and the "
                         "last good checkpoint is kept. Lower --lr and start again in a new OUT")
    nets = sorted({k.split(".", 1)[0] for k in weights})
    predict_with = model_config["train_config"]["predict_with"] if len(nets) == 2 else "net1"
    save_model(out, weights=weights, config={**model_config, "nets": nets, "predict_with": predict_with})


def _test_accuracy(method, augment, images, labels, ctx) -> dict[str, float]:
    """Test accuracy of the prediction model and of net1 alone: logged, never used to pick a checkpoint.
    Each process scores its share of the rows; counts are summed, so every row counts exactly once."""
    import torch

    dist = ctx.dist
    rows = dist.shard(images.shape[0])
    mine = torch.arange(rows.start, rows.stop, device=images.device)
    known = labels[mine] >= 0
    counts = torch.zeros(3, device=images.device, dtype=torch.float64)
    with torch.no_grad():
        for c in mine.split(1024):
            x = augment.normalize(images[c])
            lab = labels[c]
            ok = lab >= 0
            counts[0] += (method.predict_logits(x).argmax(1) == lab)[ok].sum()
            counts[1] += (method.predict_logits(x, "net1").argmax(1) == lab)[ok].sum()
    counts[2] = known.sum()
    counts = dist.all_reduce_sum(counts)
    if counts[2] == 0:
        return {}
    return {"test_acc": float(counts[0] / counts[2]), "test_acc_net1": float(counts[1] / counts[2])}


# Loss terms the methods log beside their total `loss` (pipeline/coreg/step.py, pipeline/baselines/).
LOSS_TERMS = ("partial_ce", "neg_entropy", "ce", "l_x", "l_u", "proto", "cont", "penalty")


def _loss_text(m: dict, net: str = "net1") -> str:
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


def _summary(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch'] + 1}/{epochs}"]
    for k in ("net1/loss", "net1/n_p", "net1/n_u", "test_acc", "test_acc_net1", "images_per_second"):
        if k in m:
            v = m[k]
            if k == "net1/loss":
                parts.append(_loss_text(m))
            else:
                parts.append(f"{k}={v:.0f}" if k.startswith("net1/n_") or k == "images_per_second" else f"{k}={v:.4f}")
    parts.append(f"{m['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def _trim_metrics(path: Path, start: int) -> None:
    """On resume, drop epochs at or after `start` (a killed run may have logged an epoch it never saved)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] < start]
    path.write_text("".join(line + "\n" for line in keep))
