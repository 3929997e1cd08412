"""One flat, frozen dataclass per stage: each knob has one default here; typer options read these defaults;
every run writes its resolved config beside its output (DESIGN.md habit 2).

`TrainConfig` options left at None / "" are filled by `--preset` (pipeline/presets.py): `paper` = the
published Co-Reg values (docs/method.md §4), `default` = derived from the run (docs/method.md §7).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from pipeline.errors import CoregError
from pipeline.methods import METHODS  # a name table: it imports no method module, --help stays instant

_METHODS = tuple(METHODS)
_MIXED = ("auto", "no", "bf16", "fp16")


# --help panels (a field without one lands in typer's default "Options" panel)
DATA, MODEL, SCHEDULE, COREG, BASELINES, ANNOTATOR, SYSTEM = (
    "Data", "Model", "Schedule", "Co-Reg", "Baselines", "Annotator", "System"
)


def _arg(help: str):
    """A required field: a positional argument of the CLI, with its help line."""
    return field(metadata={"help": help})


def _f(default, help: str = "", *, range=None, gt=None, lt=None, choices=None, only=None, from_warmup=False, panel=None):
    """A field with its CLI help text (the CLI builds its options from these) and, optionally, what values
    mean something. Every declaration is checked by `check(cfg)` before a stage does any work, and shown in
    `--help`:

    - `range=(lo, hi)`: lo <= value <= hi (None = unbounded); `gt` / `lt`: strict bounds;
    - `choices=(...)`: the allowed values;
    - `only=(methods)`: read by these `--method`s only (a resume of another method may change it);
    - `from_warmup=True`: Co-Reg reads it only after the warm-up (a resume still in the warm-up may change it).
    """
    meta = {"help": help}
    for key, value in (("range", range), ("gt", gt), ("lt", lt), ("choices", choices), ("only", only)):
        if value is not None:
            meta[key] = tuple(value) if key in ("range", "choices", "only") else value
    if from_warmup:
        meta["from_warmup"] = True
    if panel is not None:
        meta["panel"] = panel
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class AnnotateConfig:
    images: str = _arg("image folder, searched recursively (class sub-folders give labels and class names)")
    out: str = _arg("output folder for the annotated dataset (re-run the same command to resume)")
    classes: str | None = _f(None, "'a,b,c'; default: class sub-folder names", panel=DATA)
    classes_file: str | None = _f(None, "one class name per line", panel=DATA)
    test_dir: str | None = _f(None, "a labeled test split from another folder", panel=DATA)
    annotator: str = _f("clip", "clip | llava | synthetic (research tool: noisy sets drawn from the true labels)", choices=("clip", "llava", "synthetic"), panel=ANNOTATOR)
    model: str = _f("", "'' = the annotator's default (CLIP ViT-B-32, llava-hf/llava-1.5-7b-hf)", panel=ANNOTATOR)
    pretrained: str = _f("", "'' = the annotator's default (CLIP: openai); a tag or a local weights file", panel=ANNOTATOR)
    templates: str = _f("paper27", "paper27 | imagenet80 | a file with one template per line, {} = class name", panel=ANNOTATOR)
    questions: str = _f("default", "LLaVA question wordings: default | a file, one per line", panel=ANNOTATOR)
    candidates: str = _f("union", "union | topk:K | ratio:R | mass:M", panel=ANNOTATOR)
    noise: str = _f("q=0.03,eta=0.2", "synthetic annotator: each wrong class enters with prob. q; the label leaves with prob. eta", panel=ANNOTATOR)
    seed: int = _f(0, "random seed (the synthetic annotator's draws)", range=(0, None), panel=SYSTEM)
    batch_size: int = _f(64, "images per CLIP batch", range=(1, None), panel=SYSTEM)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", panel=SYSTEM)
    num_workers: int = _f(2, "image decoding threads", range=(0, None), panel=SYSTEM)
    shard_size: int = _f(1024, "rows per resumable shard", range=(1, None), panel=SYSTEM)
    max_new_tokens: int = _f(12, "LLaVA answer length", range=(1, None), panel=ANNOTATOR)
    llava_batch_size: int = _f(4, "images per LLaVA batch (each image is asked every question)", range=(1, None), panel=SYSTEM)


@dataclass(frozen=True)
class TrainConfig:
    annotated: str = _arg("annotated dataset folder (the OUT of `coreg annotate`, or a hand-made one)")
    out: str = _arg("output folder for the model (config.json, model.safetensors, metrics.jsonl, checkpoint.pt)")
    method: str = _f("coreg", "the learner: coreg (the paper) or a baseline (README 'Methods')", choices=_METHODS, panel=MODEL)
    # `preset` fills every option left unset (None or "") below (pipeline/presets.py): `default` derives the
    # schedule and time constants from the data size and device (measured: bench/results/ablation.md);
    # `paper` is every published constant (coreg-method.md §4). An option given explicitly always wins.
    preset: str = _f("default", "what fills the options left unset: default (derived from the data size and device, bench/results/ablation.md) | paper (the published constants)", choices=("default", "paper"), panel=MODEL)
    arch: str = _f("", "preact_resnet18 | small_cnn | timm:NAME; unset = preset (paper: preact_resnet18; default: small_cnn on CPU, preact_resnet18 on GPU)", panel=MODEL)
    timm_pretrained: bool = _f(False, "load pretrained timm weights (must be available locally)", panel=MODEL)
    epochs: int | None = _f(None, "the loop runs epochs 0..epochs-1; unset = preset (paper 800; default: about 1,200 steps on CPU, 40,000 on GPU, 20 to 800 epochs)", range=(1, None), panel=SCHEDULE)
    warmup_epochs: int | None = _f(None, "epochs of warm-up before the method's main phase (at most --epochs); unset = preset (paper 50; default half the epochs, for Co-Reg's hard warm-up 320 steps within a quarter to half of the run)", range=(0, None), panel=SCHEDULE)
    batch_size: int | None = _f(None, "per step, labeled and unlabeled each (warm-up uses 2x); unset = preset (paper 256; default: 256 halved until an epoch has 30 steps, at least 32)", range=(1, None), panel=SCHEDULE)
    image_size: int = _f(0, "0 = the training images' size (max side, capped at 224)", range=(0, None), panel=DATA)
    lr: float = _f(0.01, "SGD learning rate (start of the cosine schedule)", gt=0, panel=SCHEDULE)
    lr_min_ratio: float = _f(1e-3, "eta_min = lr * 0.1**3", range=(0, 1), panel=SCHEDULE)
    lr_period: int | None = _f(None, "cosine period in epochs, hard-coded to 800 in the paper's code; 0 = run length; unset = preset (paper 800, default 0)", range=(0, None), panel=SCHEDULE)
    momentum: float = _f(0.9, "SGD momentum", range=(0, 1), panel=SCHEDULE)
    weight_decay: float = _f(5e-4, "SGD weight decay", range=(0, None), panel=SCHEDULE)
    hflip: bool = _f(True, "random horizontal flips; turn off where a flip changes the class (digits, signs)", panel=DATA)
    seed: int = _f(0, "seed of every random draw (initial weights, batches, augmentation)", range=(0, None), panel=SYSTEM)
    cpu: bool = _f(False, "train on the CPU even when a GPU is available", panel=SYSTEM)
    mixed_precision: str = _f("auto", "auto (bf16 on GPU, no on CPU) | no | bf16 | fp16", choices=_MIXED, panel=SYSTEM)
    compile: bool = _f(False, "torch.compile the trained networks", panel=SYSTEM)
    num_workers: int = _f(2, "image decoding threads", range=(0, None), panel=SYSTEM)
    resume: bool = _f(False, "continue the run in OUT from its checkpoint (same options; see README)", panel=SYSTEM)
    tensorboard: bool = _f(False, "write TensorBoard logs in OUT", panel=SYSTEM)
    # --- Co-Reg (method §3) ---
    p_threshold: float = _f(0.5, "tau, GMM clean-probability threshold", range=(0, 1), from_warmup=True, panel=COREG)
    gmm_history: int | None = _f(None, "epochs of normalised division losses averaged before the GMM; unset = preset (paper 5; default 5 x epochs/800, at least 1)", range=(1, None), panel=COREG)
    division: str = _f("", "global (one GMM over all rows, paper) | class (one GMM per class the network picks inside the set, so every class keeps its share of P; not in the paper); unset = preset (default: class)", from_warmup=True, panel=COREG)
    epoch_steps: str = _f("", "p (an epoch = one pass over P, paper) | all (an epoch = N/batch steps, the P and U loaders both cycle; not in the paper) | rows (N/batch steps of one batch shared by P and U in proportion: one pass over all rows; not in the paper); unset = preset (default: rows)", from_warmup=True, panel=COREG)
    partner_scores: str = _f("", "net (the partner's candidate-masked prediction, paper Eq. 5) | vlm (that prediction times the annotator's probabilities, renormalised inside the set; not in the paper, measured no gain: bench/results/ablation_v3.md, and level on a long-tailed folder: accuracy_notes.md §43); unset = preset (both: net)", from_warmup=True, panel=COREG)
    warmup_loss: str = _f("", "paper (partial CE + negative entropy) | vlm (soft CE to the annotator's probabilities inside the set, a warm-up that ranks the candidates; not in the paper) | vlm-sharp (the same targets sharpened with --sharpen-t; experimental, bench/results/accuracy_notes.md) | vlm-hard (one-hot on the annotator's top class inside the set, uniform over ties; not in the paper) | vlm-hard-net (vlm-hard, but a tied top is shared by the network's own class-balanced prediction instead of uniformly: a synthetic annotator's sets are disambiguated as PRODEN does; a ranked set trains exactly as vlm-hard; not in the paper) | vlm-net / vlm-net-soft (the annotator's ranking inside the set times the network's own prediction, one-hot on the top / renormalised: a warm-up that also disambiguates sets the annotator cannot rank; not in the paper); unset = preset (default: vlm-hard-net, or vlm-net-soft with --prior-penalty 1 for a very weak annotator: its in-set top gives some class under a third of a balanced share of the images while it still ranks its candidates, pipeline/presets.py); two as A,B: net1 warms up with A, net2 with B (not in the paper)", panel=COREG)
    mix_views: str = _f("", "strong (the self-training and contrastive views are RandAugment + Cutout, paper) | weak (crop and flip only, as the co-pseudo-label views; not in the paper); unset = preset (default: strong on a run of 900 steps or more or where the very weak recipe fires, weak otherwise)", from_warmup=True, panel=COREG)
    ema_epochs: float | None = _f(None, "coreg: predict (test, model.safetensors) with an exponential moving average of each network's weights over about this many epochs (0 = the trained weights, paper); training itself is unchanged; not in the paper, measured no gain (bench/results/accuracy_notes.md §15); unset = preset (both: 0)", range=(0, None), only=("coreg",), panel=COREG)
    ema_teach: bool = _f(False, "coreg: the division pass and the partner's guesses also use the weight averages of --ema-epochs (a mean teacher) instead of the trained networks; not in the paper, measured no gain (accuracy_notes.md §15)", from_warmup=True, only=("coreg",), panel=COREG)
    keep_classes: float = _f(0.0, "coreg: a class a network predicts on the training images for under this share of the rows the annotator ranks first for it is lost; its rows are then put in P with the annotator's label (0 = off); not in any paper (bench/results/accuracy_notes.md §41)", range=(0, 1), from_warmup=True, only=("coreg",), panel=COREG)
    dist_align: bool = _f(True, "distribution alignment of division scores (code-only)", from_warmup=True, panel=COREG)
    k_views: int = _f(2, "weak views averaged for the self-prediction", range=(1, None), from_warmup=True, panel=COREG)
    sharpen_t: float = _f(0.5, "T, temperature of the pseudo-label sharpening", gt=0, from_warmup=True, panel=COREG)
    mixup_alpha: float | None = _f(None, "alpha of the Beta(alpha, alpha) mixup coefficient (coreg, dividemix, alim); unset = preset (paper 4; default 0.1 for coreg, 4 for the baselines)", gt=0, from_warmup=True, panel=COREG)
    lambda_u: float = _f(1.0, "weight of the loss on the unlabeled set U", range=(0, None), from_warmup=True, panel=COREG)
    rampup_epochs: int | None = _f(None, "epochs of the linear ramp of the U weight after the warm-up; unset = preset (paper 16; default 10% of the epochs)", range=(0, None), from_warmup=True, panel=COREG)
    proto_m: float | None = _f(None, "gamma, momentum of the class prototypes; unset = preset (paper 0.999 for 50k rows; default 1 - 0.001 x 50000/N: the paper's refresh per epoch)", range=(0, 1), from_warmup=True, panel=COREG)
    proto_t: float = _f(0.3, "T', temperature of the prototype loss", gt=0, from_warmup=True, panel=COREG)
    cont_t: float = _f(0.07, "T'', temperature of the contrastive loss", gt=0, from_warmup=True, panel=COREG)
    queue_size: int | None = _f(None, "feature queue length of the contrastive loss; unset = preset (paper 8192; default the paper's 16% of the rows, at least 2 batches)", range=(1, None), panel=COREG)
    moco_m: float | None = _f(None, "momentum of the key encoders; unset = preset (paper 0.999; default 0.999^(195/steps per epoch): the paper's drift per epoch)", range=(0, 1), from_warmup=True, panel=COREG)
    proj_dim: int = _f(128, "dimension of the projection head's features", range=(1, None), panel=MODEL)
    lambda_proto: float = _f(0.1, "weight of the prototype loss", range=(0, None), from_warmup=True, panel=COREG)
    lambda_cont: float = _f(0.1, "weight of the contrastive loss", range=(0, None), from_warmup=True, panel=COREG)
    start_cont: int | None = _f(None, "representation losses start at warmup_epochs + start_cont; unset = preset (paper 10; default 10% of the epochs)", range=(0, None), from_warmup=True, panel=COREG)
    # ablations (paper Table 4)
    co_pseudo_labels: bool = _f(True, "False: each network labels itself ('w/o Co-PL')", from_warmup=True, panel=COREG)
    use_unlabeled: bool | None = _f(None, "True: train on U with the partner's co-pseudo-labels (paper) | False: discard U, each epoch trains on P only (the paper's 'w/o U' ablation); unset = preset (default: False)", from_warmup=True, panel=COREG)
    u_confidence: float = _f(0.0, "with --use-unlabeled: train only on the U rows whose co-guess is confident, the two networks' mean prediction at the division pass (weak view, before alignment) at least this high; 0 = every U row (paper); a FixMatch-style threshold, not in the paper", range=(0, 1), from_warmup=True, only=("coreg",), panel=COREG)
    prototypes: bool = _f(True, "False: no prototype loss ('w/o proto')", from_warmup=True, panel=COREG)
    contrast: str = _f("noisy", "noisy (unconfident selection) | supcon ('w/ SupCont')", choices=("noisy", "supcon"), from_warmup=True, panel=COREG)
    predict_with: str = _f("ensemble", "ensemble (sum of both networks' logits) | net1 | net2", choices=("ensemble", "net1", "net2"), panel=MODEL)
    # not in the paper (off by default): a guard against class collapse on weak students
    prior_penalty: float | None = _f(None, "weight of DivideMix's prior penalty on the mixed batch (not in Co-Reg; 0 = off); unset = preset (paper 0; default 0, or 1 with the very weak annotator's vlm-net-soft warm-up, see --warmup-loss)", range=(0, None), from_warmup=True, panel=COREG)
    prior_shift: str = _f("", "em (after training, re-estimate the folder's class mix from the model's own predictions on the training images, each restricted to its candidate set, and shift the saved model's logits towards it: a long-tailed folder gets its common classes back; a folder that looks balanced is left alone, and every class keeps at least three quarters of its predictions on the training images; a class the model predicts for under a fifth of a fair share of the training images is taken as lost and raised to that; not in the paper) | off; unset = preset (default: em for coreg, off for the other methods; paper: off)", choices=("", "em", "off"), panel=COREG)
    prior: str = _f("uniform", "the class prior of --prior-penalty and --align-targets: uniform (DivideMix) | annotator (the annotator's probabilities inside the sets, averaged over the training rows: no balance assumed; not in any paper)", choices=("uniform", "annotator"), from_warmup=True, panel=COREG)
    class_floor: float = _f(0.0, "keep classes without assuming equal shares (not in any paper): the warm-up's class balancing (vlm-net, vlm-net-soft, vlm-hard-net's ties) and --prior-penalty only lift a class the network predicts for less than this fraction of a balanced share (a share of floor/C), instead of pulling every class to 1/C; 0 = off (equal shares)", range=(0, 1), only=("coreg",), panel=COREG)
    align_targets: bool = _f(False, "distribution alignment of the training targets to --prior: each network's own weak-view prediction (P and U rows) and the partner's U guess are scaled by prior / that network's mean prediction at the division pass, before sharpening (ReMixMatch-style; not in the paper)", from_warmup=True, panel=COREG)
    save_every: int = _f(1, "checkpoint every N epochs", range=(1, None), panel=SYSTEM)
    # --- baselines (pipeline/baselines/; each module's docstring cites its paper) ---
    kd_t: float = _f(1.0, "kd: distillation temperature (1 = the annotator's own distribution)", gt=0, only=("kd",), panel=BASELINES)
    cr_dpll_lambda: float = _f(1.0, "cr_dpll: consistency weight", range=(0, None), only=("cr_dpll",), panel=BASELINES)
    cr_dpll_rampup: int = _f(0, "cr_dpll: epochs of the linear consistency ramp; 0 = half the run", range=(0, None), only=("cr_dpll",), panel=BASELINES)
    pico_prot_start: int = _f(1, "pico/alim: epoch from which prototypes disambiguate labels", range=(0, None), only=("pico", "alim"), panel=BASELINES)
    pico_loss_weight: float = _f(0.5, "pico/alim: contrastive loss weight", range=(0, None), only=("pico", "alim"), panel=BASELINES)
    pico_proto_m: float = _f(0.99, "pico/alim: prototype momentum", range=(0, 1), only=("pico", "alim"), panel=BASELINES)
    pico_conf_ema_start: float = _f(0.95, "pico/alim: label-estimate momentum at the first epoch", range=(0, 1), only=("pico", "alim"), panel=BASELINES)
    pico_conf_ema_end: float = _f(0.8, "pico/alim: label-estimate momentum at the last epoch", range=(0, 1), only=("pico", "alim"), panel=BASELINES)
    alim_variant: str = _f("onehot", "alim: onehot | scale", choices=("onehot", "scale"), only=("alim",), panel=BASELINES)
    alim_noise_rate: float = _f(-1.0, "alim: noise rate for the adaptive lambda; < 0 = estimate it per epoch (GMM)", lt=1, only=("alim",), panel=BASELINES)
    alim_mixup_weight: float = _f(1.0, "alim: weight of the mixup term (0 = off)", range=(0, None), only=("alim",), panel=BASELINES)
    dividemix_lambda_u: float = _f(25.0, "dividemix: weight of the unlabeled MSE term", range=(0, None), only=("dividemix",), panel=BASELINES)
    dividemix_conf_penalty: bool = _f(True, "dividemix: negative-entropy penalty in warm-up (asymmetric noise)", only=("dividemix",), panel=BASELINES)


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = _arg("model folder (the OUT of `coreg train`)")
    annotated: str = _arg("annotated dataset folder whose --split is scored")
    split: str = _f("test", "the split to score, e.g. test | train (train labels are diagnostics only)", panel=DATA)
    out: str | None = _f(None, "default MODEL/eval-<split>", panel=DATA)
    batch_size: int = _f(256, "images per batch", range=(1, None), panel=SYSTEM)
    cpu: bool = _f(False, "evaluate on the CPU even when a GPU is available", panel=SYSTEM)
    measure_vlm: bool = _f(True, "time the annotating VLM on the same images when it can be loaded", panel=SYSTEM)
    overrule_sheet: int = _f(32, "images on the overrule contact sheet", range=(0, None), panel=DATA)


@dataclass(frozen=True)
class PredictConfig:
    model: str = _arg("model folder (the OUT of `coreg train`)")
    inputs: tuple[str, ...] = _arg("image files or folders (searched recursively)")
    out: str | None = _f(None, "CSV; default stdout", panel=DATA)
    batch_size: int = _f(256, "images per batch", range=(1, None), panel=SYSTEM)
    top_k: int = _f(3, "classes listed per image in the top_k column", range=(1, None), panel=DATA)
    cpu: bool = _f(False, "predict on the CPU even when a GPU is available", panel=SYSTEM)


def describe(f) -> str:
    """The declared values of a field as shown in --help, e.g. '(0 <= x <= 1)', '(x > 0)', '(one of: a, b)'.
    Parentheses, not brackets: rich would read '[x > 0]' as markup and drop it."""
    m = f.metadata
    parts = []
    if "choices" in m:
        parts.append("one of: " + ", ".join(map(str, m["choices"])))
    lo, hi = m.get("range", (None, None))
    low = f"{lo} <= x" if lo is not None else (f"x > {m['gt']}" if "gt" in m else "")
    high = f"x <= {hi}" if hi is not None else (f"x < {m['lt']}" if "lt" in m else "")
    if low and high:
        parts.append(low + high[1:])  # "0 <= x <= 1"
    elif low or high:
        parts.append((low or high).replace(f"{lo} <= x", f"x >= {lo}"))
    return f"({'; '.join(parts)})" if parts else ""


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad_value(f, value) -> str | None:
    """Why `value` is not a valid value of field `f`, or None."""
    m = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"  # NaN passes every comparison below unnoticed
    if "choices" in m and value not in m["choices"]:
        return f"is unknown; choose one of: {', '.join(map(str, m['choices']))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    lo, hi = m.get("range", (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi) or ("gt" in m and value <= m["gt"]) or (
        "lt" in m and value >= m["lt"]
    ):
        return f"must be {describe(f)[1:-1]}"
    return None


def check(cfg, names: dict[str, str] | None = None) -> None:
    """Refuse a config whose values mean nothing, before any work: every field's declaration (see `_f`), then
    the rules that relate two fields. Raises CoregError naming the option and its allowed values. `names`:
    the CLI name of a field where it differs from the field's (`coreg run --annotate-batch-size`)."""
    names = names or {}

    def opt(name: str) -> str:
        return _option(names.get(name, name))

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        why = _bad_value(f, value)
        if why:
            raise CoregError(f"{opt(f.name)} {value!r} {why}")
    if isinstance(cfg, TrainConfig) and None not in (cfg.warmup_epochs, cfg.epochs) and cfg.warmup_epochs > cfg.epochs:
        raise CoregError(
            f"{opt('warmup_epochs')} {cfg.warmup_epochs} is longer than the run ({opt('epochs')} {cfg.epochs}); "
            f"use {opt('warmup_epochs')} {cfg.epochs} or less, or more {opt('epochs')}"
        )


def to_dict(cfg) -> dict:
    return asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config from a dict, ignoring unknown keys (configs written by older versions)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
