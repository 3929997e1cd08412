"""Cost next to quality: parameters, weight bytes and throughput of the student and of the annotating VLM.

Speeds are measured the same way for both: the same images, already decoded to PIL, in the same process on
the same device, from picture to class scores with each model's own preprocessing included. Where the VLM
cannot be loaded (no local weights, a 7B LLaVA without a GPU), its numbers come from annotation.json and the
report says so.
"""

from __future__ import annotations

import time

from pipeline.model_io import StudentModel

WARMUP_IMAGES = 8  # first calls pay for allocator growth and kernel selection; not what a user waits for


def student_cost(model: StudentModel, which: str = "default") -> dict:
    return {
        "arch": model.config["arch"],
        "nets": model._which(which),
        "parameters": model.num_parameters(which),
        "weights_bytes": model.weights_bytes(which),
        "file_bytes": model.file_bytes(),
    }


def time_student(model: StudentModel, images: list, *, batch_size: int, which: str = "default") -> float | None:
    """Images per second from PIL images to probabilities (resize + crop + normalise + forward)."""
    import torch

    from pipeline.data import image_to_tensor

    if not images:
        return None

    def run(batch):
        x = torch.stack([image_to_tensor(im, model.image_size) for im in batch])  # (B, 3, S, S) uint8
        model.probs(x, which)  # returns after the device has finished: .float()/softmax sync on the result

    run(images[:WARMUP_IMAGES])
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for start in range(0, len(images), batch_size):
        run(images[start : start + batch_size])
    sync()
    return len(images) / max(time.perf_counter() - t0, 1e-9)


VLM_SECONDS = 30.0  # stop timing the VLM after this long (one batch at least): a 7B LLaVA can take minutes


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_vlm(info: dict, classes: list[str], images: list, *, device, batch_size: int) -> tuple[dict, str | None]:
    """Re-load the annotating VLM named in annotation.json and time it on `images` (RGB PIL), on `device`.

    Returns (fields to merge into the VLM's cost entry, None) or ({}, the reason it was not measured).
    """
    import torch

    from annotators.base import annotate_images
    from annotators.factory import load_annotator

    kind = info.get("annotator")
    if kind not in ("clip", "llava"):
        return {}, f"annotator {kind!r} is not a VLM that can be re-timed" if kind else "annotation.json names no annotator"
    device = torch.device(device)
    if kind == "llava" and device.type != "cuda":
        return {}, "LLaVA is re-timed only on a GPU (a 7B model on a CPU takes minutes per batch)"
    if not images:
        return {}, "no images to time"
    config = info.get("config", {})
    try:
        annotator = load_annotator(
            kind, classes=classes, model=info.get("model") or "", pretrained=info.get("pretrained") or "",
            templates=info.get("templates") or "paper27", questions=info.get("questions") or "default",
            device=str(device), max_new_tokens=config.get("max_new_tokens", 12),
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - weights not available offline, a moved template file, ...
        return {}, f"the VLM could not be loaded here ({str(e)[:160]})"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    annotate_images(annotator, images[:WARMUP_IMAGES], batch_size=batch_size)
    done, t0 = 0, time.perf_counter()
    sync()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        annotate_images(annotator, batch, batch_size=batch_size)
        done += len(batch)
        if time.perf_counter() - t0 > VLM_SECONDS:
            break
    sync()
    seconds = time.perf_counter() - t0
    model = annotator.model
    # Per image, zero-shot CLIP runs only its image tower (the text classifier is computed once), so that is
    # the fair size to compare; LLaVA runs all of itself.
    used = model.visual if kind == "clip" and hasattr(model, "visual") else model
    return {
        "parameters": _count(used),
        "weights_bytes": sum(p.numel() * p.element_size() for p in used.parameters()),
        "parameters_total": _count(model),
        "images_per_second": done / max(seconds, 1e-9),
        "timed_images": done,
        "device": str(device),
        "source": "measured",
    }, None


def vlm_from_info(info: dict) -> dict:
    """What annotation.json says about the annotating VLM (nothing for the synthetic annotator: its speed is
    a random generator's, and comparing a student with it would be meaningless)."""
    if info.get("annotator") == "synthetic":
        return {"annotator": "synthetic", "model": None, "parameters": None, "images_per_second": None, "source": None}
    return {
        "annotator": info.get("annotator"),
        "model": info.get("model"),
        "pretrained": info.get("pretrained"),
        "parameters": info.get("parameters"),  # the whole model as loaded (CLIP: text tower included)
        "parameters_total": info.get("parameters"),
        "weights_bytes": info.get("weights_bytes"),
        "images_per_second": info.get("images_per_second"),
        "source": "annotation.json" if info.get("images_per_second") else None,
    }


def ratios(student: dict, vlm: dict) -> dict:
    """How many times smaller (parameters) and faster (images/s) the student is."""

    def div(a, b):
        return float(a) / float(b) if a and b else None

    return {
        "smaller_x": div(vlm.get("parameters"), student.get("parameters")),
        "faster_x": div(student.get("images_per_second"), vlm.get("images_per_second")),
    }
