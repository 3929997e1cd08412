"""What `coreg annotate` records: the cache key (everything that changes the rows) and annotation.json
(provenance and statistics). Statistics are summed shard by shard, so they never need the whole dataset in
memory and a resumed run reports the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from annotators.base import fingerprint, library_versions
from annotators.candidates import parse_rule
from annotators.templates import prompt_name
from pipeline.images import Layout
from pipeline.shards import digest

KEY_FORMAT = 1  # bump when the stage's output for the same inputs changes (e.g. a new preprocessing)
MAX_LISTED_SKIPS = 1000  # annotation.json lists at most this many unreadable files (the count is always exact)


def _files_digest(rows, root: Path) -> str:
    """Identity of a split's images: relative path, label, size and mtime of each (hashing GBs is too slow)."""
    entries = []
    for path, label in rows:
        st = path.stat()
        entries.append((path.relative_to(root).as_posix(), label, st.st_size, st.st_mtime_ns))
    return digest(entries)


def _model_identity(cfg) -> dict:
    """The model as requested, plus size/mtime of any local weights (a changed file changes the key)."""
    ident: dict = {"model": cfg.model, "pretrained": cfg.pretrained}
    if cfg.model.startswith("local-dir:"):
        ident["files"] = fingerprint(cfg.model.removeprefix("local-dir:"))
    elif cfg.annotator == "llava" and cfg.model and Path(cfg.model).is_dir():
        ident["files"] = fingerprint(cfg.model)
    if cfg.pretrained and Path(cfg.pretrained).is_file():
        ident["weights"] = fingerprint(cfg.pretrained)
    return ident


def request_key(cfg, layout: Layout, state) -> dict:
    from annotators.base import resolve_device
    from annotators.templates import load_questions, load_templates

    key: dict = {
        "format": KEY_FORMAT,
        "annotator": cfg.annotator,
        "classes": layout.classes,
        "shard_size": cfg.shard_size,
        "files": {s: _files_digest(rows, layout.roots[s]) for s, rows in layout.splits.items()},
    }
    if cfg.annotator == "synthetic":
        key.update(noise=cfg.noise, seed=cfg.seed)
        return key
    device = state.device if cfg.device == "auto" and state.device is not None else resolve_device(cfg.device)
    key.update(_model_identity(cfg), rule=str(parse_rule(cfg.candidates)), device_type=device.type)
    if cfg.annotator == "clip":
        key["prompts"] = load_templates(cfg.templates)
    else:
        key.update(prompts=load_questions(cfg.questions), max_new_tokens=cfg.max_new_tokens)
    return key


def shard_stats(mask: np.ndarray, label: np.ndarray, pred: np.ndarray, votes: np.ndarray) -> dict:
    """Additive counts of one shard: summing them over shards gives the split's statistics."""
    sizes = mask.sum(axis=1)
    known = label >= 0
    lab = label[known]
    return {
        "n": int(len(label)),
        "labeled": int(known.sum()),
        "correct": int((pred[known] == lab).sum()),
        "covered": int(mask[np.flatnonzero(known), lab].sum()) if known.any() else 0,
        "size_sum": int(sizes.sum()),
        "singletons": int((sizes == 1).sum()),
        "empty": int((sizes == 0).sum()),
        "template_correct": (votes[known] == lab[:, None]).sum(axis=0).tolist(),
        "template_answered": (votes >= 0).sum(axis=0).tolist(),
    }


def _ratio(a, b):
    return a / b if b else None


def split_stats(metas: list[dict]) -> dict:
    tot = {k: sum(m[k] for m in metas) for k in ("n", "labeled", "correct", "covered", "size_sum", "singletons", "empty", "fallback", "unparsed")}
    n_prompts = len(metas[0]["template_correct"]) if metas else 0
    tcorrect = [sum(m["template_correct"][p] for m in metas) for p in range(n_prompts)]
    tanswered = [sum(m["template_answered"][p] for m in metas) for p in range(n_prompts)]
    out = {
        "n": tot["n"],
        "skipped": sum(len(m["skipped"]) for m in metas),
        "labeled": tot["labeled"],
        "mean_candidates": _ratio(tot["size_sum"], tot["n"]),
        "singleton_share": _ratio(tot["singletons"], tot["n"]),
        "empty_sets": tot["empty"],
        "fallback_rows": tot["fallback"],  # rule gave an empty set (LLaVA: no answer mapped) -> {vlm_pred}
        "unparsed_answers": tot["unparsed"],
        "zero_shot_accuracy": _ratio(tot["correct"], tot["labeled"]),
        "coverage": _ratio(tot["covered"], tot["labeled"]),
        "eta": None if not tot["labeled"] else 1 - tot["covered"] / tot["labeled"],  # the paper's Table 2
    }
    if n_prompts:
        out["template_accuracy"] = [_ratio(c, tot["labeled"]) for c in tcorrect]
        out["template_answered_share"] = [_ratio(a, tot["n"]) for a in tanswered]
    return out


def annotation_info(*, cfg: dict, layout: Layout, rule: str, metas: dict[str, list[dict]], key: str, store) -> dict:
    specs = sorted(store.root.glob("spec-*.json"))
    spec = json.loads(specs[0].read_text()) if specs else {"spec": {"annotator": cfg["annotator"]}, "prompts": []}
    every = [m for ms in metas.values() for m in ms]
    n, seconds, model_seconds = sum(m["n"] for m in every), sum(m["seconds"] for m in every), sum(m["model_seconds"] for m in every)
    skipped = [f"{s}/{p}" for s, ms in metas.items() for m in ms for p in m["skipped"]]
    info = {
        **spec["spec"],
        "prompts": spec["prompts"],
        "templates": cfg["templates"] if cfg["annotator"] == "clip" else None,
        "questions": cfg["questions"] if cfg["annotator"] == "llava" else None,
        "candidate_rule": rule if cfg["annotator"] != "synthetic" else f"synthetic({cfg['noise']},seed={cfg['seed']})",
        "classes": layout.classes,
        "prompt_class_names": [prompt_name(c) for c in layout.classes],
        # One annotator instance's throughput, file to scores (decode + preprocess + model); per process
        # under accelerate. `model_images_per_second` counts the model calls alone.
        "images_per_second": _ratio(n, seconds),
        "model_images_per_second": _ratio(n, model_seconds) if model_seconds else None,
        "labeled": layout.labeled,
        "roots": {s: str(r) for s, r in layout.roots.items()},
        "skipped": len(skipped),
        "skipped_files": skipped[:MAX_LISTED_SKIPS],
        "stats": {s: split_stats(ms) for s, ms in metas.items()},
        "notes": layout.notes,
        "versions": library_versions(),
        "cache_key": key,
        "config": cfg,
    }
    if cfg["annotator"] == "synthetic":
        from annotators.synthetic import parse_noise

        q, eta = parse_noise(cfg["noise"])
        info["noise"] = {"q": q, "eta": eta, "seed": cfg["seed"]}
    return info
