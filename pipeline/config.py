"""One flat, frozen dataclass per stage: each knob has one default here; typer options read these defaults;
every run writes its resolved config beside its output (DESIGN.md habit 2).

Defaults of `TrainConfig` are the published Co-Reg values (shared/docs/coreg-method.md §4) unless a comment
says otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def _f(default, help: str = ""):
    """A field with its CLI help text (the CLI builds its options from these)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AnnotateConfig:
    images: str
    out: str
    classes: str | None = _f(None, "'a,b,c'; default: class sub-folder names")
    classes_file: str | None = _f(None, "one class name per line")
    test_dir: str | None = _f(None, "a labeled test split from another folder")
    annotator: str = _f("clip", "clip | llava | synthetic (research tool: noisy sets drawn from the true labels)")
    model: str = _f("", "'' = the annotator's default (CLIP ViT-B-32, llava-hf/llava-1.5-7b-hf)")
    pretrained: str = _f("", "'' = the annotator's default (CLIP: openai); a tag or a local weights file")
    templates: str = _f("paper27", "paper27 | imagenet80 | a file with one template per line, {} = class name")
    questions: str = _f("default", "LLaVA question wordings: default | a file, one per line")
    candidates: str = _f("union", "union | topk:K | ratio:R | mass:M")
    noise: str = _f("q=0.03,eta=0.2", "synthetic annotator: each wrong class enters with prob. q; the label leaves with prob. eta")
    seed: int = _f(0, "random seed (the synthetic annotator's draws)")
    batch_size: int = _f(64, "images per CLIP batch")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    num_workers: int = _f(2, "image decoding threads")
    shard_size: int = _f(1024, "rows per resumable shard")
    max_new_tokens: int = _f(12, "LLaVA answer length")
    llava_batch_size: int = _f(4, "images per LLaVA batch (each image is asked every question)")


@dataclass(frozen=True)
class TrainConfig:
    annotated: str
    out: str
    method: str = _f("coreg", "")
    # `preset` fills every option left at None/"" below (pipeline/presets.py): `default` derives the schedule
    # and time constants from the data size and device (measured: bench/results/ablation.md); `paper` is
    # every published constant (coreg-method.md §4). An option given explicitly always wins.
    preset: str = _f("default", "default (derived from data size and device; bench/results/ablation.md) | paper (the published constants)")
    arch: str = _f("", "preact_resnet18 | small_cnn | timm:NAME; '' = preset (paper: preact_resnet18; default: small_cnn on CPU, preact_resnet18 on GPU)")
    timm_pretrained: bool = _f(False, "load pretrained timm weights (must be available locally)")
    epochs: int | None = _f(None, "the loop runs epochs 0..epochs-1; unset = preset (paper 800; default: about 1,200 steps on CPU, 40,000 on GPU)")
    warmup_epochs: int | None = _f(None, "unset = preset (paper 50; default 20% of the epochs)")
    batch_size: int | None = _f(None, "per step, labeled and unlabeled each (warm-up uses 2x); unset = preset (paper 256; default: 256 halved until an epoch has >= 30 steps, at least 32)")
    image_size: int = _f(0, "0 = the training images' size (max side, capped at 224)")
    lr: float = _f(0.01, "")
    lr_min_ratio: float = _f(1e-3, "eta_min = lr * 0.1**3")
    lr_period: int | None = _f(None, "cosine period in epochs, hard-coded to 800 in the paper's code; 0 = run length; unset = preset (paper 800, default 0)")
    momentum: float = _f(0.9, "")
    weight_decay: float = _f(5e-4, "")
    hflip: bool = _f(True, "random horizontal flips; turn off where a flip changes the class (digits, signs)")
    seed: int = _f(0, "")
    cpu: bool = _f(False, "")
    mixed_precision: str = _f("auto", "auto (bf16 on GPU, no on CPU) | no | bf16 | fp16")
    compile: bool = _f(False, "")
    num_workers: int = _f(2, "")
    resume: bool = _f(False, "")
    tensorboard: bool = _f(False, "")
    # --- Co-Reg (method §3) ---
    p_threshold: float = _f(0.5, "tau, GMM clean-probability threshold")
    gmm_history: int | None = _f(None, "epochs of normalised division losses averaged before the GMM; unset = preset (paper 5; default 5 x epochs/800, at least 1)")
    division: str = _f("", "global (one GMM over all rows, paper) | class (one GMM per class the network picks inside the set: every class keeps its share of P); '' = preset (default: class)")
    epoch_steps: str = _f("", "p (an epoch = one pass over P, paper) | all (an epoch = N/batch steps, P and U loaders both cycle); '' = preset (default: all)")
    warmup_loss: str = _f("", "paper (partial CE + negative entropy) | vlm (soft CE to the annotator's probabilities inside the set: a warm-up that ranks the candidates; not in the paper); '' = preset (default: vlm)")
    dist_align: bool = _f(True, "distribution alignment of division scores (code-only)")
    k_views: int = _f(2, "weak views averaged for the self-prediction")
    sharpen_t: float = _f(0.5, "")
    mixup_alpha: float = _f(4.0, "")
    lambda_u: float = _f(1.0, "")
    rampup_epochs: int | None = _f(None, "linear ramp of lambda_u after warm-up; unset = preset (paper 16; default 10% of the epochs)")
    proto_m: float | None = _f(None, "prototype momentum; unset = preset (paper 0.999 for 50k rows; default: 1 - 0.001 x 50000/N, so prototypes refresh per epoch as in the paper)")
    proto_t: float = _f(0.3, "")
    cont_t: float = _f(0.07, "")
    queue_size: int | None = _f(None, "contrast queue; unset = preset (paper 8192; default: the paper's 16% of the rows, at least 2 batches)")
    moco_m: float | None = _f(None, "key-encoder momentum; unset = preset (paper 0.999; default: 0.999^(195/steps per epoch), the paper's drift per epoch)")
    proj_dim: int = _f(128, "")
    lambda_proto: float = _f(0.1, "")
    lambda_cont: float = _f(0.1, "")
    start_cont: int | None = _f(None, "representation losses start at warmup_epochs + start_cont; unset = preset (paper 10; default 10% of the epochs)")
    # ablations (paper Table 4)
    co_pseudo_labels: bool = _f(True, "False: each network labels itself ('w/o Co-PL')")
    use_unlabeled: bool = _f(True, "False: discard U ('w/o U')")
    prototypes: bool = _f(True, "False: no prototype loss ('w/o proto')")
    contrast: str = _f("noisy", "noisy (unconfident selection) | supcon ('w/ SupCont')")
    predict_with: str = _f("ensemble", "ensemble (sum of both networks' logits) | net1 | net2")
    # not in the paper (off by default): a guard against class collapse on weak students
    prior_penalty: float = _f(0.0, "weight of DivideMix's uniform-prior penalty on the mixed batch (not in Co-Reg; 0 = off)")
    save_every: int = _f(1, "checkpoint every N epochs")
    # --- baselines (pipeline/baselines/; each module's docstring cites its paper) ---
    kd_t: float = _f(1.0, "kd: distillation temperature (1 = the annotator's own distribution)")
    cr_dpll_lambda: float = _f(1.0, "cr_dpll: consistency weight")
    cr_dpll_rampup: int = _f(0, "cr_dpll: epochs of the linear consistency ramp; 0 = half the run")
    pico_prot_start: int = _f(1, "pico/alim: epoch from which prototypes disambiguate labels")
    pico_loss_weight: float = _f(0.5, "pico/alim: contrastive loss weight")
    pico_proto_m: float = _f(0.99, "pico/alim: prototype momentum")
    pico_conf_ema_start: float = _f(0.95, "pico/alim: label-estimate momentum at the first epoch")
    pico_conf_ema_end: float = _f(0.8, "pico/alim: label-estimate momentum at the last epoch")
    alim_variant: str = _f("onehot", "alim: onehot | scale")
    alim_noise_rate: float = _f(-1.0, "alim: noise rate for the adaptive lambda; < 0 = estimate it per epoch (GMM)")
    alim_mixup_weight: float = _f(1.0, "alim: weight of the mixup term (0 = off)")
    dividemix_lambda_u: float = _f(25.0, "dividemix: weight of the unlabeled MSE term")
    dividemix_conf_penalty: bool = _f(True, "dividemix: negative-entropy penalty in warm-up (asymmetric noise)")


@dataclass(frozen=True)
class EvaluateConfig:
    model: str
    annotated: str
    split: str = _f("test", "")
    out: str | None = _f(None, "default MODEL/eval-<split>")
    batch_size: int = _f(256, "")
    cpu: bool = _f(False, "")
    measure_vlm: bool = _f(True, "time the annotating VLM on the same images when it can be loaded")
    overrule_sheet: int = _f(32, "images on the overrule contact sheet")


@dataclass(frozen=True)
class PredictConfig:
    model: str
    inputs: tuple[str, ...]
    out: str | None = _f(None, "CSV; default stdout")
    batch_size: int = _f(256, "")
    top_k: int = _f(3, "")
    cpu: bool = _f(False, "")


def to_dict(cfg) -> dict:
    return asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config from a dict, ignoring unknown keys (configs written by older versions)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
