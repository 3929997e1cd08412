"""Training presets: fill every TrainConfig option left unset (None or "") from the data and the device.

`paper` is every published constant (coreg-method.md §4): the setting of the AAAI tables, kept exactly.
`default` is what `bench/results/ablation.md` measured to give users a better student at their budgets
(thousands of images, tens of epochs): the paper's time constants are expressed per *epoch of 50,000 rows*,
so on small data they are re-derived to mean the same per unit of training, and these mechanisms change
(each one option, each measured with and without):

- `division=class`: one GMM per class (the class the network picks inside the candidate set), so the
  small-loss division cannot starve the classes the warm-up network is least sure of (bench/results/
  accuracy_cifar_small_notes.md §5: P held 72 of 500 trucks).
- `epoch_steps=rows`: an epoch is N/batch steps of one batch shared by P and U in proportion, both loaders
  cycling, so Co-Reg takes as many SGD steps on as many rows as the single-network baselines instead of one pass
  over P (11% of the rows at the switch on MNIST). `all` (full P and U batches per step) scored the same on the
  dev subset in 1.6x the time (bench/results/accuracy_dev_epoch_steps.md).
- `warmup_loss=vlm-hard-net`: warm-up on the annotator's own top class inside the set, a network that ranks
  the candidates when self-training starts (partial CE + negative entropy leaves it near uniform; the
  annotator's soft probabilities, `vlm`, are flat and train slowly). Where the top is tied (a synthetic
  annotator's uniform sets) the target is shared over the tie by the network's own class-balanced prediction,
  ramped in over the warm-up (PRODEN's disambiguation), instead of staying flat; a ranked set trains exactly
  as under `vlm-hard`. On the dev subset's synthetic sets that gained +0.6 (every seed); `vlm-net-soft`, the
  same product on every set, was +1.2 / +0.4 on the instance annotators there but -8.1 / -4.0 on the first
  two reported weak seeds, inside a per-seed spread of 5 points (bench/results/accuracy_notes.md §10). Not in
  the paper.
- `warmup_loss=vlm-net-soft` instead, for a *very weak* annotator, read from the annotation alone
  (`annotator_skew`, `very_weak`): when the annotator's top class inside the set gives its rarest class less than
  a third of a balanced share of the rows, the hard warm-up cannot teach that class, and the soft product with
  the network's class-balanced prediction (PRODEN's target with the annotator as a prior) can; but only where
  the annotator ranks its candidates (mean in-set margin at least 0.1): on a flat ranking the product is the
  weak network's own guess. On the MNIST dev subset the share separates the annotators where `vlm-net-soft` won
  every seed (+4.0 to +5.1; shares 0.11-0.28, margins 0.13-0.20) from those where it did not (shares 0.45 and
  up); on the CIFAR-10 dev subset (margins 0.04-0.05) it lost (bench/results/accuracy_notes.md §20). With it,
  `prior_penalty=1` (DivideMix's uniform-prior term on the mixed batch): +1.9 points on top on that dev annotator
  (every seed). Both are one recipe, applied only when `--warmup-loss` is left to the preset; an explicit
  `--prior-penalty` still wins. A class truly that rare also triggers it (nothing in the annotation tells the
  two apart, accuracy_notes.md §22); on a long-tailed folder it keeps every class but costs the common ones
  5-10 points against `vlm-hard-net` at 625 steps (§23, held out), 1.8-4.5 at a user's default 1,222 steps, where
  it beats the annotator and every baseline (§25). Class-keeping terms that assume no equal shares lost on the
  dev subsets (§24). Not in the paper.
- `warmup_epochs`: Co-Reg's hard warm-up lasts WARMUP_STEPS (320) optimiser steps, kept between a quarter and
  half of the run; every other warm-up (the very weak recipe's soft one, the baselines') half the run. At 640
  steps that is half either way; at a user's default 1,200 steps it is a quarter, which scored +0.5 / +3.8 / +2.4
  points over half on the dev subset's synthetic, weak and mid annotators, every seed, while the soft warm-up
  lost every seed when cut (bench/results/accuracy_notes.md §28; the held-out tables retrained with it: §29).
  The paper's 50 of 800 epochs is 6%.
- `mix_views`: the paper's strong self-training (mixup) and contrastive views (RandAugment + Cutout) on a run of
  at least STRONG_VIEWS_STEPS (900) optimiser steps, crop + flip (`weak`, not in the paper) on a shorter one. At
  640 steps the strong views kept the mixup loss high and the network below its own P labels' accuracy
  (bench/results/accuracy_notes.md §6) and cost 0.9 / 1.25 points held out (§18), 1.55 / 1.9 on the dev subset
  (§33); at a user's 1,216 steps they scored +4.2 / +2.7 / +1.6 points on the dev subset's very weak, weak and mid
  annotators (every seed), +7.7 / +6.8 / +1.1 on the long-tailed dev folder, and -0.2 on the synthetic sets
  (§33). Held out on the long tail: +9.3 / +8.0 / +2.5 (the class it lost in 1 of 9 runs is given back by the
  prior shift's presence floor, §34). A shorter run gets the strong views too where the very weak recipe fires
  (below): on the dev folders at 640 steps they scored +2.95 / +2.95 / +1.4 on the balanced very weak annotator
  and +4.0 / +9.8 / -1.1 and -1.0 / +7.6 on the long tail's very weak and weak ones where the recipe fired
  (mean +3.3, 6 of 8 up), against -4.0 to -1.55 where the hard warm-up ran (§35).
- `mixup_alpha=0.1` (Co-Reg only; the baselines keep their published 4): Beta(0.1, 0.1) trains almost always on
  one image with a trace of another, where the paper's Beta(4, 4) blends two images nearly half and half. On a
  short run the heavy blend is a regulariser the student cannot afford: on 3 dev seeds x 3 settings 0.5 scored
  +5.5 / +2.4 / +3.2 points over 4 and kept every class (bench/results/accuracy_dev_mixup.md), and 0.1 a
  further +1.85 / +0.1 / +0.4 over 0.5 (weak / synthetic / mid, accuracy_dev_u_mixup.md). Not in the paper.
- `use_unlabeled=False`: each Co-Reg epoch trains on P only (the paper's own "w/o U" ablation): U's co-guesses
  are the least accurate targets of the run (43% right on the weak annotator, 85% on the synthetic sets,
  against 87% / 98% on P), and with α 0.1 dropping them scored +1.6 / +0.5 / +0.35 on the dev subset
  (accuracy_dev_u_mixup.md, accuracy_notes.md §16). The division still runs every epoch, so a row can move
  from U to P. Not the paper's method.
- `prior_shift=em` (Co-Reg only; the baselines train on the annotator's top class and carry its class mix):
  after the last epoch the folder's class mix is re-estimated by EM from the networks' candidate-restricted
  predictions on the training images, and the saved model's logits are shifted by log(prior × C)
  (pipeline/prior_shift.py). Everything above balances the classes, which keeps a rare class but costs the
  common ones on a long-tailed folder (§22); the shift gives them back where the estimate is clearly uneven
  and leaves a folder that looks balanced as trained, weakened until every class keeps three quarters of its
  training-image predictions. On the long-tailed dev folder +1.1 points at a user's budget (9 of 9 runs up,
  every class kept) and +0.3 at 625 steps; on the balanced MNIST dev folders it did not fire (12 of 12), on
  the balanced CIFAR-10 one it fired once in 3 (-0.3 points there). Held out at a user's budget: +0.2 to +1.5
  points on the long-tailed means, every class kept; not fired on any of 14 balanced MNIST runs (1 of 14 since
  the strong views, §33), but on 2 of 3 balanced CIFAR-10 runs with a weak student (-0.4 points in one; 3 of 3
  since the strong views). At 625 steps on the long tail it still cost the mid
  annotator 0.6 points and, in 1 of 9 runs, a rare class's single test prediction (bench/results/
  accuracy_notes.md §30-31), which the presence floor of pipeline/prior_shift.py now gives back (§34). Not in
  the paper.

Measured and not adopted (each stays an option, the default keeps the paper's value): `partner_scores=vlm`
(the annotator's probabilities in the partner's P scores: −0.1 / −0.0 points when switched back, 3 seeds,
bench/results/ablation_v3.md; dropped; on the long-tailed dev folder too, where the annotator's ranking is free of
the folder's class mix that biases the network: −0.01 over 9 runs, accuracy_notes.md §43), `ema_epochs` / `ema_teach` (weight averages to predict / to teach with:
no gain at the end of a cosine schedule, bench/results/accuracy_notes.md §15), `u_confidence` (U back, but only its
rows with a confident co-guess: 99% right yet too few to matter, accuracy_notes.md §17; not preset-managed, 0 = off).

An option given explicitly always wins over the preset; `config.json` records the resolved values.
"""

from __future__ import annotations

import dataclasses
import math

from pipeline.errors import CoregError

PRESETS = ("default", "paper")

# coreg-method.md §4 (and the code's defaults for the three mechanisms the paper does not have)
PAPER = {
    "arch": "preact_resnet18", "epochs": 800, "warmup_epochs": 50, "batch_size": 256, "lr_period": 800,
    "rampup_epochs": 16, "start_cont": 10, "gmm_history": 5, "proto_m": 0.999, "moco_m": 0.999,
    "queue_size": 8192, "division": "global", "epoch_steps": "p", "warmup_loss": "paper", "partner_scores": "net",
    "mix_views": "strong", "mixup_alpha": 4.0, "ema_epochs": 0.0, "use_unlabeled": True, "prior_penalty": 0.0,
    "prior_shift": "off",
}  # fmt: skip
PAPER_ROWS = 50_000  # CIFAR's training set: the paper's time constants are per epoch of this many rows
PAPER_STEPS = 195  # ceil(50000 / 256) steps per epoch in the paper's setting
STEPS_CPU, STEPS_GPU = 1_200, 40_000  # default run length in optimiser steps per network (see `default_values`)
# a very weak annotator (see the module text): its in-set top gives the rarest class under this share of a balanced
# split; chosen on the dev subset of bench/accuracy.py (accuracy_notes.md §20), between 0.28 and 0.45 there
VERY_WEAK_SHARE = 1 / 3
# ... and only where the annotator ranks its candidates: a mean in-set margin under this leaves vlm-net-soft's product
# to the network's own guess (CIFAR-10 dev subset: margins 0.04-0.05, where it lost; MNIST dev: 0.13-0.20, where it won)
RANKS_MARGIN = 0.1
SKEW_MIN_ROWS = 30  # ranked rows per class on average below which a rare class cannot be told from chance
# Co-Reg's hard warm-up (vlm-hard-net) in optimiser steps: this many, kept between a quarter and half of the run.
# Measured on the MNIST dev subset: at 640 steps 0.3 of the run was mixed against half (320; -1.0 / +0.8 / +0.2,
# a class lost in two seeds, accuracy_notes.md §8); at 1,216 steps a quarter (320) beat half (608) in all 9 seeds
# of 3 annotators (§28), and held on the long-tailed dev folder (§29). The soft warm-up of the very weak recipe
# ramps its balancing over the warm-up and keeps half the run (a quarter lost every seed there, §28).
WARMUP_STEPS = 320
# the strong (paper) self-training views from this many optimiser steps per run, the weak ones below: between the
# two budgets measured on the MNIST dev subset, 640 steps (weak won, accuracy_notes.md §6, §18, §33) and 1,216
# (strong won on every instance annotator, every seed, §33); about their geometric mean. Just below it, at 896 steps,
# the two are level on the dev subset (weak views +0.19 over 6 runs, §39)
STRONG_VIEWS_STEPS = 900


def annotator_skew(candidates, vlm_probs) -> tuple[float, int, float] | None:
    """Label-free, from the annotation: (share, class, margin). `class` is the class least often the annotator's
    top class inside the candidate set and `share` its share of the rows times C (1 = a balanced split; 0.1 = a
    tenth of one); `margin` is the mean gap between the first and second in-set probabilities, renormalised over
    the set (how clearly the annotator ranks its candidates; a one-label set counts 1). Rows whose in-set top is
    tied (a synthetic annotator's uniform sets: no ranking) are left out. None when fewer than SKEW_MIN_ROWS
    ranked rows per class remain. `candidates` (N, C) bool, `vlm_probs` (N, C)."""
    import torch

    from pipeline.coreg.losses import annotator_top, ranked_targets

    # exactly the warm-up's targets: the annotator's ranking inside the set, and its top with vlm-hard's tie rule
    inset = ranked_targets(torch.as_tensor(vlm_probs), torch.as_tensor(candidates, dtype=torch.bool)).double()
    n_classes = inset.shape[1]
    if len(inset) == 0 or n_classes < 2:
        return None
    top, ranked = annotator_top(inset)  # a single top (a one-label set always has one)
    if int(ranked.sum()) < SKEW_MIN_ROWS * n_classes:
        return None
    two = inset[ranked].topk(2, dim=1).values  # (R, 2) the two highest in-set scores (0 outside the set)
    counts = torch.bincount(top[ranked], minlength=n_classes)
    c = int(counts.argmin())
    margin = float((two[:, 0] - two[:, 1]).mean())
    return float(counts[c] * n_classes / ranked.sum()), c, margin


def skew_value(skew):
    """`skew` as given to default_values: the value itself, or a (cached) function computing it."""
    return skew() if callable(skew) else skew


def very_weak(skew) -> bool:
    """The default preset's warm-up rule (see the module text): `skew` = annotator_skew(...) or None."""
    return skew is not None and skew[0] < VERY_WEAK_SHARE and skew[2] >= RANKS_MARGIN


def unset(cfg) -> list[str]:
    return [k for k in PAPER if getattr(cfg, k) in (None, "")]


def default_values(cfg, *, n_rows: int, gpu: bool, skew=None) -> dict:
    """The `default` preset for this run. Every value is a rule of the data size / device (and, for the
    warm-up, of the annotation: `skew` = `annotator_skew(...)`, or a function returning it, called only when
    Co-Reg's warm-up is left to the preset, since it reads the whole annotation), never a number tuned on a benchmark's test
    set: the rules translate the paper's constants to the run's length."""
    out: dict = {"arch": "preact_resnet18" if gpu else "small_cnn"}  # small_cnn: 0.15M params, learns fast on 2 CPU cores
    b = cfg.batch_size
    if b is None:  # the paper's 256, halved until an epoch has at least 30 steps (so the GMM, prototypes and
        b = 256  # the ramp see many updates per epoch on small data), never below 32
        while b > 32 and n_rows / b < 30:
            b //= 2
        b = max(1, min(b, n_rows // 2))  # fewer than 64 images: two steps per epoch (a batch over n is refused)
    out["batch_size"] = b
    steps = max(1, math.ceil(n_rows / b))  # per epoch
    e = cfg.epochs
    if e is None:
        e = min(800, max(20, math.ceil((STEPS_GPU if gpu else STEPS_CPU) / steps)))
    out["epochs"] = e
    out["warmup_epochs"] = max(1, round(0.5 * e))  # the baselines' warm-up, and the soft one of the very weak recipe
    out["rampup_epochs"] = max(1, round(0.1 * e))
    out["start_cont"] = max(1, round(0.1 * e))
    out["lr_period"] = 0  # cosine over the actual run (the paper's 800 leaves a short run at constant lr)
    out["gmm_history"] = max(1, round(PAPER["gmm_history"] * e / PAPER["epochs"]))
    # per-sample EMA: the paper's 0.999 over 50k rows refreshes a prototype ~98% per epoch; keep that share
    out["proto_m"] = max(0.9, 1 - (1 - PAPER["proto_m"]) * max(1.0, PAPER_ROWS / n_rows))
    out["moco_m"] = max(0.9, PAPER["moco_m"] ** max(1.0, PAPER_STEPS / steps))  # same key drift per epoch
    out["queue_size"] = int(min(PAPER["queue_size"], max(2 * b, round(n_rows * PAPER["queue_size"] / PAPER_ROWS))))
    # warm-up on the annotator's top class inside the set, ties shared by the network (accuracy_dev_warmup_net.md), and
    # the self-training views by run length: chosen on the dev subset of bench/accuracy.py (accuracy_dev*.md), never on a
    # reported one
    out.update(division="class", epoch_steps="rows", warmup_loss="vlm-hard-net", partner_scores="net")
    # only Co-Reg reads mix_views; the others keep the value they always had, so their cached benchmark runs stay valid
    out["mix_views"] = "strong" if cfg.method == "coreg" and e * steps >= STRONG_VIEWS_STEPS else "weak"  # notes §33
    if cfg.method == "coreg" and cfg.warmup_loss in (None, "") and very_weak(skew_value(skew)):
        # a very weak annotator that ranks its candidates (notes §20), the warm-up left to the preset: its recipe,
        # the soft warm-up and DivideMix's uniform prior penalty (both dev-chosen; a key absent here keeps PAPER's),
        # and the strong views at any run length (notes §35)
        out.update(warmup_loss="vlm-net-soft", prior_penalty=1.0, mix_views="strong")
    if cfg.method == "coreg" and (cfg.warmup_loss or out["warmup_loss"]) == "vlm-hard-net":
        # Co-Reg's hard warm-up: WARMUP_STEPS, between a quarter and half of the run (accuracy_notes.md §8, §28)
        out["warmup_epochs"] = max(1, round(min(0.5 * e * steps, max(0.25 * e * steps, WARMUP_STEPS)) / steps))
    # light mixup for Co-Reg (accuracy_dev_mixup.md: 0.5 over 4; accuracy_dev_u_mixup.md: 0.1 over 0.5, both on the
    # dev subset); dividemix and alim keep their papers' 4. And Co-Reg trains on P only (accuracy_dev_u_mixup.md)
    out["mixup_alpha"] = 0.1 if cfg.method == "coreg" else PAPER["mixup_alpha"]
    out["use_unlabeled"] = cfg.method != "coreg"  # only coreg reads it
    # the folder's class mix re-estimated after training (pipeline/prior_shift.py; accuracy_notes.md §30): Co-Reg's
    # default balances its classes; a baseline trained on the annotator's top class carries the annotator's mix
    out["prior_shift"] = "em" if cfg.method == "coreg" else "off"
    return out


def resolve(cfg, *, n_rows: int, gpu: bool, skew=None):
    """(cfg with every unset option filled, {option: value} of what the preset filled)."""
    if cfg.preset not in PRESETS:
        raise CoregError(f"--preset {cfg.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    todo = unset(cfg)
    if not todo:
        return cfg, {}
    values = PAPER if cfg.preset == "paper" else default_values(cfg, n_rows=n_rows, gpu=gpu, skew=skew)
    filled = {k: values.get(k, PAPER[k]) for k in todo}  # an option the default does not derive keeps the paper's value
    return dataclasses.replace(cfg, **filled), filled


def describe(preset: str, filled: dict) -> str:
    """One line for the terminal: what the preset chose."""
    if not filled:
        return ""
    parts = ", ".join(f"{k.replace('_', '-')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', '-')} {v}" for k, v in filled.items())
    why = "the published constants" if preset == "paper" else "derived from the data size and device"
    return f"preset {preset} ({why}): {parts}"
