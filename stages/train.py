"""`coreg train ANNOTATED OUT`: train a method on an annotated dataset and write the model directory.

The loop follows the Accelerate examples: Accelerator → data → networks → optimisers → one `prepare` →
epochs. It runs unchanged on CPU, one GPU, several GPUs and several machines (`accelerate launch -m
pipeline.cli train ...`). Every process holds the decoded images; the method takes its rows of each global
batch, and everything computed over the whole dataset is gathered (pipeline/training.py).

OUT holds config.json + model.safetensors (refreshed with every checkpoint, so an interrupted run still has
a usable model), metrics.jsonl (one object per epoch) and checkpoint.pt (for --resume).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pipeline.accel import GracefulStop, average_grads, make_dist
from pipeline.config import TrainConfig
from pipeline.errors import CoregError

MIXED = ("auto", "no", "bf16", "fp16")


def _check_options(cfg: TrainConfig) -> None:
    if cfg.mixed_precision not in MIXED:
        raise CoregError(f"--mixed-precision {cfg.mixed_precision!r} is unknown; choose one of {', '.join(MIXED)}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise CoregError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.warmup_epochs < 0 or cfg.image_size < 0:
        raise CoregError("--warmup-epochs and --image-size must not be negative")
    if cfg.predict_with not in ("ensemble", "net1", "net2"):
        raise CoregError(f"--predict-with {cfg.predict_with!r} is unknown; choose ensemble, net1 or net2")


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


def run(cfg: TrainConfig) -> Path:
    """Disk → disk: ANNOTATED → OUT (model directory)."""
    _check_options(cfg)
    out = Path(cfg.out)
    _check_out(out, cfg.resume)
    from pipeline.methods import get_method_module
    from pipeline.schema import load_annotated

    method_module = get_method_module(cfg.method)  # unknown --method fails before any heavy work
    dsd, classes = load_annotated(cfg.annotated, stage="coreg train")
    n = len(dsd["train"])
    if n < 2:
        raise CoregError(f"{cfg.annotated}: the train split has {n} image(s); training needs at least two")
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
    with stop:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            # BatchNorm running statistics drift apart on each process (no DDP); the epoch's eval-mode
            # division pass runs before any training in it, so rank 0's statistics everywhere make that pass
            # (and its gathered division) the one network rank 0 saves. See `sync_buffers` for the other calls.
            for m in method.modules().values():
                sync_buffers(m, ctx.dist)
            metrics = method.train_epoch(epoch, ctx)
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
            if stopping:
                if main:
                    print(f"stopped after epoch {epoch + 1} and saved it; continue with the same command plus --resume")
                raise KeyboardInterrupt
    accelerator.wait_for_everyone()
    if main:
        _save_model(out, method, model_config, save_model)
        print(f"model written to {out}")
    if cfg.tensorboard:
        accelerator.end_training()
    return out


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


def _save_model(out, method, model_config, save_model) -> None:
    weights = method.prediction_weights()
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


def _summary(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch'] + 1}/{epochs}"]
    for k in ("net1/loss", "net1/n_p", "net1/n_u", "test_acc", "test_acc_net1", "images_per_second"):
        if k in m:
            v = m[k]
            parts.append(f"{k}={v:.0f}" if k.startswith("net1/n_") or k == "images_per_second" else f"{k}={v:.4f}")
    parts.append(f"{m['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def _trim_metrics(path: Path, start: int) -> None:
    """On resume, drop epochs at or after `start` (a killed run may have logged an epoch it never saved)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] < start]
    path.write_text("".join(line + "\n" for line in keep))
