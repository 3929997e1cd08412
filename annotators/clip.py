"""CLIP (open_clip) as a multi-prompt annotator, following coreg-method.md §2.1.

For each template i: p_i = softmax(100 * cos(image, T_i(class))) over the classes; `probs` = mean_i p_i and
each template's top-1 is its vote (the union of votes is the paper's candidate set). The text classifier is
built once; images stream through in batches. Per image, only the PIL part of open_clip's own preprocessing
runs (resize, crop) and the result stays uint8; scaling and normalisation happen on the whole batch on the
device, which is both cheaper and bit-identical to torchvision's ToTensor + Normalize.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from annotators.base import Scores, count_parameters, resolve_device
from annotators.templates import fill
from pipeline.errors import CoregError

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-32", "openai"  # the paper's annotator
LOGIT_SCALE = 100.0  # fixed, = CLIP's trained logit scale (method §2.1, Co-Reg code)
TEXT_BATCH = 256  # prompts per text-encoder call: bounds memory for 80 templates x 1000 classes


def split_preprocess(preprocess):
    """open_clip's eval transform -> (PIL steps, mean, std), or (preprocess, None, None) if it is not the
    usual `Compose([... PIL steps ..., ToTensor(), Normalize(mean, std)])`."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if not steps or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return preprocess, None, None
    return T.Compose(steps[:-2]), list(steps[-1].mean), list(steps[-1].std)


class ClipAnnotator:
    name = "clip"

    def __init__(self, model, preprocess, tokenizer, *, classes: list[str], templates: list[str], device="cpu",
                 model_name: str = "", pretrained: str = "", text_cache: str | Path | None = None):
        import torch

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.eval().to(self.device)
        self.classes, self.prompts = list(classes), list(templates)
        self.model_name, self.pretrained = model_name, pretrained
        self.pil_steps, mean, std = split_preprocess(preprocess)
        self.batched_norm = mean is not None
        if self.batched_norm:
            self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.tokenizer = tokenizer
        # bf16 autocast on GPU (as open_clip's own eval); fp32 on CPU, where autocast is slower, not faster.
        on_gpu = self.device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu else None
        self.text = self._cached_text_classifier(text_cache)  # (P, C, D) unit vectors

    @classmethod
    def from_pretrained(cls, model: str = "", pretrained: str = "", *, classes: list[str], templates: list[str],
                        device: str = "auto", text_cache: str | Path | None = None) -> ClipAnnotator:
        """Load an open_clip model: a built-in name with a tag or a local weights file, `local-dir:PATH`, or
        `hf-hub:ORG/NAME` (which needs the hub or its cache; `HF_HUB_OFFLINE=1` for cache only)."""
        import open_clip

        model = model or DEFAULT_MODEL
        dev = resolve_device(device)
        schema = "local-dir" if model.startswith("local-dir:") else "hf-hub" if model.startswith("hf-hub:") else None
        if schema:
            if pretrained:
                raise CoregError(f"--pretrained {pretrained!r} has no effect with --model {model}: that model brings its own weights; drop --pretrained")
            if schema == "local-dir":
                path = Path(model.removeprefix("local-dir:"))
                if not (path / "open_clip_config.json").is_file():
                    raise CoregError(f"--model {model}: {path} has no open_clip_config.json; point local-dir: at an exported open_clip model folder")
        else:
            name = model.replace("/", "-")
            if name not in open_clip.list_models():
                raise CoregError(f"--model {model!r}: not an open_clip model name (e.g. ViT-B-32; see open_clip.list_models()), local-dir:PATH or hf-hub:ORG/NAME")
            tags = open_clip.list_pretrained_tags_by_model(name)
            if not pretrained:
                if DEFAULT_PRETRAINED not in tags:
                    raise CoregError(f"--model {model}: give --pretrained, one of {tags} or a local weights file")
                pretrained = DEFAULT_PRETRAINED
            if not Path(pretrained).is_file() and pretrained not in tags:
                raise CoregError(f"--pretrained {pretrained!r}: neither a file nor a tag of {model} ({', '.join(tags) or 'none'})")
        from annotators.hub import hub_load, one_line

        local = schema == "local-dir" or (schema is None and Path(pretrained).is_file())
        try:
            with hub_load() if not local else contextlib.nullcontext() as offline:
                net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None if schema else pretrained)
                tokenizer = open_clip.get_tokenizer(model)
        except Exception as e:  # noqa: BLE001 - downloads and loaders raise many types; all mean "cannot load"
            where = f"--model {model} --pretrained {pretrained or '-'}"
            if local:
                raise CoregError(f"{where}: cannot load ({one_line(e)})") from None
            why = f"the weights are not in the local cache and {offline}" if offline else one_line(e)
            raise CoregError(
                f"{where}: cannot load: {why}. Without network, download the weights once elsewhere and pass "
                f"--pretrained /path/to/weights-file (or --model local-dir:PATH), with HF_HUB_OFFLINE=1"
                + (f" (library error: {one_line(e)})" if offline else "")
            ) from None
        return cls(net, preprocess, tokenizer, classes=classes, templates=templates, device=dev,
                   model_name=model, pretrained=pretrained, text_cache=text_cache)

    def _autocast(self):
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _cached_text_classifier(self, path: str | Path | None):
        """The text classifier, read from `path` when a previous (interrupted) run of the SAME request saved it
        there, else computed and saved. The caller keys `path` by every input that changes it (coreg annotate
        puts it in the shard store, whose folder name is the request's digest). Encoding the P x C prompts
        takes tens of seconds on a CPU for a few hundred prompts."""
        if path is None:
            return self._text_classifier()
        import os

        from safetensors.torch import load_file, save_file

        path = Path(path)
        if path.is_file():
            text = load_file(str(path))["text"]
            if tuple(text.shape[:2]) == (len(self.prompts), len(self.classes)):
                return text.to(self.device)
        text = self._text_classifier()
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file({"text": text.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)  # atomic: a concurrent process or a kill never leaves half a file
        return text

    def _text_classifier(self):
        """(P, C, D): each template's class embeddings, L2-normalised per prompt (method §2.1)."""
        import torch
        import torch.nn.functional as F

        texts = [fill(t, c) for t in self.prompts for c in self.classes]  # template-major: row = p * C + c
        chunks = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), TEXT_BATCH):
                tokens = self.tokenizer(texts[i : i + TEXT_BATCH]).to(self.device)
                chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        emb = torch.cat(chunks)  # (P*C, D)
        return emb.view(len(self.prompts), len(self.classes), -1)

    def prepare(self, img):
        """RGB PIL -> (3, H, W) uint8 (or the full float transform when it is not the usual Compose)."""
        import torch

        if not self.batched_norm:
            return self.pil_steps(img)
        arr = np.asarray(self.pil_steps(img), dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def pixels(self, items: list):
        """A batch of prepared items -> the model's normalised float input on the device, (B, 3, H, W)."""
        import torch

        x = torch.stack(items)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if not self.batched_norm:
            return x.to(self.device)
        return (x.float().div_(255.0).sub_(self.mean).div_(self.std)).contiguous()

    def score(self, items: list) -> Scores:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = self.pixels(items)
            with self._autocast():
                feats = self.model.encode_image(x)
            feats = F.normalize(feats.float(), dim=-1)  # (B, D)
            logits = LOGIT_SCALE * torch.einsum("bd,pcd->bpc", feats, self.text)  # (B, P, C)
            probs = logits.softmax(-1).mean(1)  # (B, C): mean of the per-template distributions
            votes = logits.argmax(-1)  # (B, P)
            probs = probs / probs.sum(-1, keepdim=True)  # exact renormalisation against float drift
        return Scores(probs.cpu().numpy().astype(np.float32), votes.cpu().numpy().astype(np.int32))

    def spec(self) -> dict:
        params, nbytes = count_parameters(self.model)
        return {
            "annotator": self.name,
            "model": self.model_name,
            "pretrained": self.pretrained,
            "parameters": params,
            "weights_bytes": nbytes,
            "precision": f"{str(self.amp_dtype).removeprefix('torch.')}-autocast" if self.amp_dtype else "fp32",
            "device": str(self.device),
            "logit_scale": LOGIT_SCALE,
        }
