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
import functools
import json
import os
import time
from pathlib import Path

from pipeline.accel import GracefulStop, average_grads, make_dist
from pipeline.config import TrainConfig, check
from pipeline.errors import CoregError
from stages.train_checks import check_finite, check_memory, collapse_warning, save_checked
from stages.train_log import summary, test_accuracy, trim_metrics
from stages.train_shift import prior_shift


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


def annotation_skew(train_ds) -> tuple[float, int, float] | None:
    """pipeline.presets.annotator_skew of a train split (label-free: candidate sets and annotator probabilities)."""
    import numpy as np

    from pipeline.presets import annotator_skew
    from pipeline.schema import candidate_matrix

    cols = train_ds.select_columns(["candidates", "vlm_probs"]).to_dict()
    probs = np.asarray(cols["vlm_probs"], dtype=np.float32)
    return annotator_skew(candidate_matrix(cols["candidates"], probs.shape[1]), probs)


def resolve_preset(cfg: TrainConfig, *, n_rows: int, quiet: bool = False, skew=None, classes=None) -> TrainConfig:
    """Fill the options left unset from --preset (pipeline/presets.py) and say what was chosen. `skew`:
    `annotation_skew` of the train split, or a cached function returning it (the default preset's warm-up rule
    reads it, only for Co-Reg with the warm-up left to the preset)."""
    import torch

    from pipeline.presets import describe, resolve, skew_value

    gpu = torch.cuda.is_available() and not cfg.cpu
    cfg, filled = resolve(cfg, n_rows=n_rows, gpu=gpu, skew=skew)
    line = describe(cfg.preset, filled)
    if line and not quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"{line} ({n_rows} training images, {'GPU' if gpu else 'CPU'})", flush=True)
        if filled.get("warmup_loss") == "vlm-net-soft":
            skew = skew_value(skew)  # computed (and cached) by the preset's rule already
            name = classes[skew[1]] if classes else f"class {skew[1]}"
            print(f"very weak annotator: its top class inside the set is {name!r} for only {skew[0]:.0%} of a balanced "
                  f"share of the images (under a third) while it ranks its candidates (mean margin {skew[2]:.2f}), so the "
                  f"warm-up is vlm-net-soft (the network's own prediction shares the targets) and the prior penalty "
                  f"{cfg.prior_penalty:g}; both pull towards equal class shares, so if {name!r} is truly that rare in your "
                  f"images, --warmup-loss vlm-hard-net may keep more accuracy on the common classes (the prior shift keeps the rare one either way; it won on the long-tailed dev folder's weak annotator and lost on its very weak one, accuracy_notes.md §36)",
                  flush=True)  # fmt: skip
    return cfg


def resolved_config(cfg: TrainConfig, train_ds) -> dict:
    """The options as this run uses them (the preset already filled), with the image size and the mixed precision
    resolved: what config.json records and a checkpoint is checked against (also by `coreg run`'s resume)."""
    import torch

    from pipeline.data import default_image_size

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and not cfg.cpu else "no"
    return {**dataclasses.asdict(cfg), "image_size": cfg.image_size or default_image_size(train_ds), "mixed_precision": mp}


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
    # lazy: the skew reads every row's probabilities, and only Co-Reg's preset warm-up rule needs it
    cfg = resolve_preset(cfg, n_rows=n, skew=functools.cache(lambda: annotation_skew(dsd["train"])), classes=classes)
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
    from pipeline.data import PREPROCESSING, channel_stats, decode_images
    from pipeline.model_io import library_versions, save_model
    from pipeline.networks import build_student
    from pipeline.training import Context, sync_buffers

    out = Path(cfg.out)
    train_ds = dsd["train"]
    resolved = resolved_config(cfg, train_ds)
    mp, size = resolved["mixed_precision"], resolved["image_size"]
    gpu = torch.cuda.is_available() and not cfg.cpu
    if mp == "fp16" and not gpu:
        raise CoregError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    accelerator = Accelerator(
        cpu=cfg.cpu, mixed_precision=mp, log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(out)
    )
    main = accelerator.is_main_process
    device = accelerator.device
    num_classes = len(classes)

    def make_net():
        return build_student(cfg.arch, num_classes=num_classes, image_size=size, proj_dim=cfg.proj_dim, pretrained=cfg.timm_pretrained)

    n_test = len(dsd["test"]) if "test" in dsd else 0
    check_memory(size, len(train_ds), n_test, cfg.batch_size, cfg.image_size, gpu=device.type == "cuda")
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
        trim_metrics(out / "metrics.jsonl", start)
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
            check_finite(metrics, epoch, last_saved, cfg, out)
            seconds = time.perf_counter() - t0
            metrics = {"epoch": epoch, **metrics, "epoch_seconds": seconds, "images_per_second": rows_per_epoch / max(seconds, 1e-9)}
            if test is not None:
                for m in method.modules().values():  # the test pass is in eval mode too, after this epoch's training
                    sync_buffers(m, ctx.dist)
                metrics.update(test_accuracy(method, augment, *test, ctx))
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                print(summary(metrics, cfg.epochs), flush=True)
                warned = warned or collapse_warning(metrics, num_classes)
                if cfg.tensorboard:
                    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=epoch)
            stopping = stop.requested(ctx.dist, device)  # every process stops after the same epoch
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or stopping:
                accelerator.wait_for_everyone()
                if main:
                    save_checked(out, method, model_config, save_model)
                    ckpt.save_checkpoint(out, epoch=epoch, method=method, config=resolved, scaler=accelerator.scaler)
                last_saved = epoch
            if stopping:
                if main:
                    print(f"stopped after epoch {epoch + 1} and saved it")  # the CLI says how to continue
                raise KeyboardInterrupt
    accelerator.wait_for_everyone()
    if main:
        shift = None
        if cfg.prior_shift == "em":
            shift, model_config["prior_shift"] = prior_shift(method, ctx, model_config, classes)
        save_checked(out, method, model_config, save_model, shift=shift)
        print(f"model written to {out}")
    if cfg.tensorboard:
        accelerator.end_training()
    return out
