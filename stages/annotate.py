"""`coreg annotate IMAGES OUT`: an image folder -> the annotated dataset of DESIGN.md "Stage contract".

`run(cfg)` does the I/O around `annotate_batch` (scores -> contract columns, in memory): it finds the splits
(pipeline.images.discover), streams each split shard by shard (decode + per-image preparation in threads,
overlapping the model's batches), writes every finished shard at once (pipeline.shards: resumable, exactly
once across `accelerate launch` processes), then merges the shards into OUT and writes annotation.json.
Memory holds one shard's image bytes plus two batches in flight, whatever the folder size.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from annotators.candidates import Rule, apply_rule, mask_to_lists, parse_rule
from pipeline.config import AnnotateConfig
from pipeline.errors import CoregError
from pipeline.images import Layout, discover, read_image
from pipeline.schema import ANNOTATION_FILE
from pipeline.shards import PARTIAL, ShardStore, digest, my_shards, shard_ranges
from stages.annotate_info import annotation_info, request_key, shard_stats

ANNOTATORS = ("clip", "llava", "synthetic")
OWN_ENTRIES = {ANNOTATION_FILE, "dataset_dict.json", "train", "test", PARTIAL}
PREFETCH_BATCHES = 2  # batches decoded ahead of the model: enough to hide decoding, bounded memory


def annotate_batch(probs: np.ndarray, votes: np.ndarray, rule: Rule) -> dict:
    """Contract columns from an annotator's scores (the in-memory core): candidates, vlm_probs, vlm_pred,
    votes, and the number of rows whose rule gave an empty set and fell back to {vlm_pred}."""
    mask, fallback = apply_rule(rule, probs, votes)
    return {
        "candidates": mask_to_lists(mask),
        "vlm_probs": probs.astype(np.float32).tolist(),
        "vlm_pred": probs.argmax(axis=1).astype(np.int32).tolist(),
        "votes": votes.astype(np.int32).tolist(),
        "_mask": mask,
        "_fallback": fallback,
    }


def contract_features(classes: list[str], annotator: str):
    import datasets

    from pipeline.schema import features

    f = features(classes)
    f["votes"] = datasets.Sequence(datasets.Value("int32"))  # each prompt's top-1 (-1: no usable answer)
    if annotator == "llava":
        f["answers"] = datasets.Sequence(datasets.Value("string"))  # the raw answers, for auditing the parser
    return f


def check_options(cfg: AnnotateConfig) -> None:
    """The options alone, before any image is read (`coreg run` calls it before any stage starts)."""
    from pipeline.config import check

    check(cfg)  # ranges and choices declared in pipeline/config.py
    if cfg.annotator not in ANNOTATORS:
        raise CoregError(f"--annotator {cfg.annotator!r}: unknown; use {' | '.join(ANNOTATORS)}")
    parse_rule(cfg.candidates)  # syntax now; the K <= classes check once the classes are known
    for name in ("batch_size", "shard_size", "max_new_tokens", "llava_batch_size"):
        if getattr(cfg, name) < 1:
            raise CoregError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.num_workers < 0:
        raise CoregError(f"--num-workers {cfg.num_workers}: must be 0 or more")
    if cfg.annotator == "synthetic":
        from annotators.synthetic import parse_noise

        parse_noise(cfg.noise)
        if cfg.candidates != "union" or cfg.model or cfg.pretrained:
            raise CoregError("--annotator synthetic draws its own sets from the labels: drop --candidates, --model and --pretrained")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CoregError(f"OUT {out}: exists and is a file; give a new or empty folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES)
        if other:
            raise CoregError(f"OUT {out}: holds other things ({', '.join(other[:3])}); give a new or empty folder, or a previous `coreg annotate` output")


class _OneProcess:
    """What the stage needs of accelerate's PartialState when not launched with several processes."""

    num_processes, process_index, is_main_process, device = 1, 0, True, None

    def wait_for_everyone(self) -> None:
        pass


def _process_state(device: str):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun
        import torch
        from accelerate import PartialState

        # Without cpu=True accelerate does not join CPU processes into one group (gloo) and each would
        # believe it is alone.
        return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return _OneProcess()


def _build_annotator(cfg: AnnotateConfig, classes: list[str], state, text_cache=None):
    from annotators.factory import load_annotator

    device = cfg.device
    if cfg.device == "auto" and state.device is not None:
        device = str(state.device)  # one GPU per process under accelerate
    return load_annotator(cfg.annotator, classes=classes, model=cfg.model, pretrained=cfg.pretrained,
                          templates=cfg.templates, questions=cfg.questions, device=device,
                          max_new_tokens=cfg.max_new_tokens, text_cache=text_cache)


def _synthetic_sets(cfg: AnnotateConfig, layout: Layout) -> dict:
    from annotators.synthetic import draw_candidates, parse_noise, uniform_probs

    q, eta = parse_noise(cfg.noise)
    out = {}
    for k, (split, rows) in enumerate(layout.splits.items()):
        if not layout.labeled[split]:
            raise CoregError(f"--annotator synthetic needs labeled images: put the {split} images in class sub-folders")
        labels = np.array([y for _, y in rows], dtype=np.int64)
        mask, pred = draw_candidates(labels, len(layout.classes), q=q, eta=eta, seed=np.random.SeedSequence([cfg.seed, k]))
        out[split] = (mask, pred, uniform_probs(mask))
    return out


def _load(path: Path, annotator, draft_size):
    from pipeline.messages import reading

    with reading(path):  # a warning while decoding names this file
        got = read_image(path, draft_size=draft_size)
    if got is None:
        return None
    rgb, data = got
    return data, (annotator.prepare(rgb) if annotator is not None else None)


def _annotate_shard(rows, root: Path, start: int, *, annotator, synthetic, rule, batch_size, pool, bar):
    """Columns and meta of one shard. `rows` = [(path, label)], `start` = its first row in the split."""
    t0, model_s = time.perf_counter(), 0.0
    draft = getattr(annotator, "input_size", None)
    cols: dict[str, list] = {k: [] for k in ("image", "path", "label", "trusted", "candidates", "vlm_probs", "vlm_pred", "votes")}
    if annotator is not None and annotator.name == "llava":
        cols["answers"] = []
    masks, skipped, fallback, unparsed = [], [], 0, 0
    batches = [list(range(j, min(j + batch_size, len(rows)))) for j in range(0, len(rows), batch_size)]
    ahead = [[pool.submit(_load, rows[i][0], annotator, draft) for i in b] for b in batches[:PREFETCH_BATCHES]]
    for k, batch in enumerate(batches):
        loaded = [f.result() for f in ahead.pop(0)]
        if k + PREFETCH_BATCHES < len(batches):
            ahead.append([pool.submit(_load, rows[i][0], annotator, draft) for i in batches[k + PREFETCH_BATCHES]])
        ok = [i for i, r in zip(batch, loaded, strict=True) if r is not None]
        skipped += [rows[i][0].relative_to(root).as_posix() for i, r in zip(batch, loaded, strict=True) if r is None]
        data = [r for r in loaded if r is not None]
        if ok and synthetic is not None:
            mask_all, pred_all, probs_all = synthetic
            idx = np.array(ok) + start
            mask = mask_all[idx]
            out = {"candidates": mask_to_lists(mask), "vlm_probs": probs_all[idx].tolist(), "vlm_pred": pred_all[idx].tolist(), "votes": [[] for _ in ok]}
        elif ok:
            t1 = time.perf_counter()
            scores = annotator.score([d[1] for d in data])
            model_s += time.perf_counter() - t1
            out = annotate_batch(scores.probs, scores.votes, rule)
            mask, fallback, unparsed = out["_mask"], fallback + out["_fallback"], unparsed + scores.unparsed
            if "answers" in cols:
                cols["answers"] += scores.answers
        if ok:
            masks.append(mask)
            cols["image"] += [{"bytes": d[0], "path": None} for d in data]
            cols["path"] += [rows[i][0].relative_to(root).as_posix() for i in ok]
            cols["label"] += [rows[i][1] for i in ok]
            cols["trusted"] += [False] * len(ok)
            for c in ("candidates", "vlm_probs", "vlm_pred", "votes"):
                cols[c] += out[c]
        bar.update(len(batch))
    n_prompts = len(annotator.prompts) if annotator is not None else 0
    mask = np.concatenate(masks) if masks else np.zeros((0, 1), bool)
    meta = shard_stats(mask, np.array(cols["label"], dtype=np.int64), np.array(cols["vlm_pred"], dtype=np.int64),
                       np.array(cols["votes"], dtype=np.int64).reshape(len(cols["label"]), n_prompts))
    meta.update(skipped=skipped, fallback=fallback, unparsed=unparsed, seconds=time.perf_counter() - t0, model_seconds=model_s)
    return cols, meta


def run(cfg: AnnotateConfig) -> Path:
    """Annotate cfg.images into cfg.out; re-running the same command resumes (or returns at once if done)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per shard write would bury the annotation bar
    try:
        return _run(cfg)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _run(cfg: AnnotateConfig) -> Path:
    from tqdm.auto import tqdm

    check_options(cfg)
    layout = discover(cfg.images, cfg.classes, cfg.classes_file, cfg.test_dir)
    rule = parse_rule(cfg.candidates, len(layout.classes))
    out = Path(cfg.out)
    _check_out(out)
    state = _process_state(cfg.device)
    key = request_key(cfg, layout, state)
    info_file = out / ANNOTATION_FILE
    if info_file.is_file() and (out / "dataset_dict.json").is_file():
        if json.loads(info_file.read_text()).get("cache_key") == digest(key):
            if state.is_main_process:
                print(f"{out}: already annotated with these inputs and settings; nothing to do")
            return out
    store = ShardStore(out, key)
    store.open(main=state.is_main_process)
    state.wait_for_everyone()
    plan = {s: shard_ranges(len(rows), cfg.shard_size) for s, rows in layout.splits.items()}
    todo = [(s, i) for s in plan for i in my_shards(len(plan[s]), state.process_index, state.num_processes) if not store.done(s, i)]
    for note in layout.notes if state.is_main_process else []:
        print(f"note: {note}")
    if todo:
        # CLIP's text classifier is kept in the shard store, so a resumed run does not encode the prompts again
        annotator = None if cfg.annotator == "synthetic" else _build_annotator(cfg, layout.classes, state, store.root / "clip-text.safetensors")
        spec = annotator.spec() if annotator is not None else {"annotator": "synthetic", "model": None, "pretrained": None}
        prompts = list(annotator.prompts) if annotator is not None else []
        (store.root / f"spec-{state.process_index}.json").write_text(json.dumps({"spec": spec, "prompts": prompts}))
        batch_size = cfg.llava_batch_size if cfg.annotator == "llava" else cfg.batch_size
        synthetic = _synthetic_sets(cfg, layout) if cfg.annotator == "synthetic" else {}
        feats = contract_features(layout.classes, cfg.annotator)
        total = sum(plan[s][i][1] - plan[s][i][0] for s, i in todo)
        with ThreadPoolExecutor(max(1, cfg.num_workers)) as pool, tqdm(
            total=total, unit="img", desc="annotate", disable=not state.is_main_process, dynamic_ncols=True
        ) as bar:
            for split, i in todo:
                a, b = plan[split][i]
                cols, meta = _annotate_shard(
                    layout.splits[split][a:b], layout.roots[split], a, annotator=annotator, synthetic=synthetic.get(split),
                    rule=rule, batch_size=batch_size, pool=pool, bar=bar,
                )
                store.write(split, i, cols, feats, meta)
    state.wait_for_everyone()
    if state.is_main_process:
        metas = {s: [store.meta(s, i) for i in range(len(plan[s]))] for s in plan}
        if sum(m["n"] for m in metas["train"]) == 0:
            raise CoregError(f"IMAGES {cfg.images}: none of the {len(layout.splits['train'])} training images could be read; check the files")
        info = annotation_info(cfg=asdict(cfg), layout=layout, rule=str(rule), metas=metas, key=digest(key), store=store)
        info_file.unlink(missing_ok=True)  # a stale annotation.json must never describe the new dataset
        store.publish({s: len(plan[s]) for s in plan})
        info_file.write_text(json.dumps(info, indent=2))
        store.remove()
        _print_summary(out, info)
    state.wait_for_everyone()
    return out


def _print_summary(out: Path, info: dict) -> None:
    parts = []
    for split, s in info["stats"].items():
        acc = f", zero-shot {s['zero_shot_accuracy']:.3f}, coverage {s['coverage']:.3f}" if s.get("zero_shot_accuracy") is not None else ""
        parts.append(f"{split}: {s['n']} rows, mean set {s['mean_candidates']:.2f}{acc}")
    skipped = f"; skipped {info['skipped']} unreadable (listed in {ANNOTATION_FILE})" if info["skipped"] else ""
    print(f"annotated {out}: " + "; ".join(parts) + skipped)
