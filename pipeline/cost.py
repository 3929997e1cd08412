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


def vlm_from_info(info: dict) -> dict:
    """What annotation.json says about the annotating VLM."""
    return {
        "annotator": info.get("annotator"),
        "model": info.get("model"),
        "pretrained": info.get("pretrained"),
        "parameters": info.get("parameters"),
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
