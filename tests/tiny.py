"""Tiny, offline stand-ins for the real inputs: an image folder, a random open_clip model, a random LLaVA.

Everything here is built locally in a second or two and never touches a model hub, so tests can drive the
real code paths (open_clip's `local-dir:` loader, transformers' `from_pretrained`) without any download.
The models are random: they exercise shapes, batching and I/O, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# Distinct base colours so a classifier (or a test) can tell the classes apart; cycles for >8 classes.
_PALETTE = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30), (170, 60, 200), (30, 200, 210), (240, 130, 20), (120, 120, 120)]


def make_image_folder(
    root: str | Path,
    classes: tuple[str, ...] | list[str] = ("cat", "dog", "bird"),
    n_per_class: int = 4,
    size: int = 32,
    split: tuple[str, ...] | None = None,
    seed: int = 0,
    fmt: str = "png",
) -> Path:
    """Write `root/<class>/<i>.<fmt>` (or `root/<split>/<class>/...` for each split) and return `root`.

    Each class has its own base colour and stripe period, plus per-image noise: the classes are separable by
    colour alone, the images are not identical. PNG by default so the colours survive exactly; `fmt="jpg"`
    for JPEG.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sp in split or (None,):
        base = root / sp if sp else root
        for k, name in enumerate(classes):
            d = base / name
            d.mkdir(parents=True, exist_ok=True)
            colour = np.array(_PALETTE[k % len(_PALETTE)], dtype=np.float32)
            period = 2 + k  # stripes: a second, shape-like cue
            stripes = ((np.arange(size) // period) % 2).astype(np.float32)[None, :, None] * 30.0  # (1, S, 1)
            for i in range(n_per_class):
                noise = rng.normal(0, 12, size=(size, size, 3)).astype(np.float32)
                px = np.clip(colour[None, None, :] + stripes + noise, 0, 255).astype(np.uint8)  # (S, S, 3)
                Image.fromarray(px, "RGB").save(d / f"{i:04d}.{fmt}")
    return root


def tiny_clip_config(image_size: int = 32) -> dict:
    """open_clip `open_clip_config.json` content for a ~1.6M-parameter CLIP.

    vocab_size must stay 49408 and context_length 77: without `hf_tokenizer_name` open_clip falls back to its
    built-in BPE SimpleTokenizer, whose ids go up to 49407 and whose sequences are 77 long.
    """
    return {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        # CLIP's own normalisation constants (open_clip.constants.OPENAI_DATASET_MEAN/STD)
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def make_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32) -> str:
    """Write a tiny random open_clip model (config + seeded weights) and return the `--model` value.

    The returned string is `local-dir:<abs path>`. open_clip ignores `pretrained` for `local-dir:` models (the
    weights come from the folder), so use the default `--pretrained ""` with it.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    cfg = tiny_clip_config(image_size)
    (d / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg["model_cfg"])  # the same class open_clip's factory builds from this config
    # Saved weights make every load identical (a folder without weights would be re-initialised randomly).
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return f"local-dir:{d}"


def _byte_tokenizer():
    """A byte-level BPE with no merges: every string is tokenizable with a ~260-entry vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Prepend BOS like Llama's tokenizer does, so prompts look like the real model's.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",  # batched generation needs left
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def make_tiny_llava(directory: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> str:
    """Write a tiny random LLaVA (model, byte-level tokenizer, CLIP image processor) and return its path.

    The folder loads with `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`
    like `llava-hf/llava-1.5-7b-hf`: same classes, same prompt format, same `<image>` expansion.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    tok = _byte_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_center_crop=True
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, as in llava-hf/llava-1.5-7b-hf; "default" then drops it
    )
    processor.save_pretrained(d)

    n_patches = (image_size // patch_size) ** 2  # 'default' strategy drops CLS: one token per patch
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
            patch_size=patch_size, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(d)
    return str(d)
