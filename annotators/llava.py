"""LLaVA-1.5 (transformers) as a multi-question annotator (coreg-method.md §2.2, reconstructed).

Each image is asked every question wording; wording w lists the class names in its own order (as given,
reversed, then seeded shuffles), so position bias does not repeat. One prefill per (image, wording) serves
both outputs:
- the answer: greedy decoding from the prefill's cache, mapped to a class (annotators/answers.py) -> a vote;
- the class distribution: log P(name + end-of-answer | prompt) for every class name (as listed and with a
  capital first letter, summed), softmax over classes per wording, averaged over wordings -> `probs`.
Batches are left-padded with position ids from the attention mask (as `generate` does), so batched and
one-by-one answers agree.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import numpy as np

from annotators.answers import AnswerMapper
from annotators.base import Scores, count_parameters, resolve_device
from annotators.templates import prompt_name
from pipeline.errors import CoregError

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # the llava-1.5 conversation format
SCORE_SEQUENCES = 32  # (prompt, class-name) rows per scoring forward: each needs its own copy of the KV cache


def option_orders(n_classes: int, n_questions: int) -> list[list[int]]:
    """Class order listed in each wording: as given, reversed, then seeded shuffles (seed = wording index)."""
    orders = [list(range(n_classes)), list(range(n_classes))[::-1]]
    orders += [np.random.default_rng(w).permutation(n_classes).tolist() for w in range(2, n_questions)]
    return orders[:n_questions]


class LlavaAnnotator:
    name = "llava"

    def __init__(self, model, processor, *, classes: list[str], questions: list[str], device="cpu",
                 max_new_tokens: int = 12, model_name: str = ""):
        import torch

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.eval().to(self.device)
        self.processor, self.tok = processor, processor.tokenizer
        self.classes, self.questions, self.max_new_tokens, self.model_name = list(classes), list(questions), max_new_tokens, model_name
        self.mapper = AnswerMapper([prompt_name(c) for c in classes])
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.eos_id = self.tok.eos_token_id
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        self.input_size = crop.get("height") or (getattr(ip, "size", None) or {}).get("shortest_edge")
        names = [prompt_name(c) for c in classes]
        self.prompts = [PROMPT.format(question=q.replace("{options}", ", ".join(names[i] for i in order)))
                        for q, order in zip(questions, option_orders(len(classes), len(questions)), strict=True)]
        from PIL import Image

        blank = Image.new("RGB", (self.input_size or 336,) * 2)
        # Prompt ids with <image> already expanded to the vision tokens: tokenised once, reused for every batch.
        self.prompt_ids = [processor(images=[blank], text=[p], return_tensors="pt")["input_ids"][0].tolist() for p in self.prompts]
        self.name_ids = [[self._answer_ids(p, v) for v in self._variants(n)] for p in self.prompts for n in names]  # [w*C + c][variant]
        self.dtype = next(self.model.parameters()).dtype
        params = inspect.signature(self.model.forward).parameters  # argument names moved across transformers versions
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep" if "num_logits_to_keep" in params else None
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._torch = torch

    @classmethod
    def from_pretrained(cls, model: str = "", *, classes: list[str], questions: list[str], device: str = "auto",
                        max_new_tokens: int = 12) -> LlavaAnnotator:
        """A hub id (needs the hub or its cache) or a local folder saved with `save_pretrained`."""
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = model or DEFAULT_MODEL
        dev = resolve_device(device)
        dtype = torch.float16 if dev.type == "cuda" else torch.float32  # llava-hf ships fp16 weights
        if model.startswith(("local-dir:", "hf-hub:")):
            raise CoregError(f"--model {model}: the local-dir:/hf-hub: forms are open_clip's; give LLaVA as a hub id or a plain folder path")
        import contextlib

        from annotators.hub import hub_load, one_line

        local = Path(model).is_dir()
        try:
            with hub_load() if not local else contextlib.nullcontext() as offline:
                processor = AutoProcessor.from_pretrained(model)
                net = LlavaForConditionalGeneration.from_pretrained(model, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - hub, file and config errors all mean "cannot load"
            if local:
                raise CoregError(f"--model {model}: cannot load a LLaVA model ({one_line(e)})") from None
            why = f"it is not in the local cache and {offline}" if offline else one_line(e)
            raise CoregError(
                f"--model {model}: cannot load a LLaVA model: {why}. Without network, download it once elsewhere "
                "(save_pretrained folder) and pass --model /path/to/folder, with HF_HUB_OFFLINE=1"
                + (f" (library error: {one_line(e)})" if offline else "")
            ) from None
        return cls(net, processor, classes=classes, questions=questions, device=dev, max_new_tokens=max_new_tokens, model_name=model)

    @staticmethod
    def _variants(name: str) -> list[str]:
        cap = name[:1].upper() + name[1:]
        return [name] if cap == name else [name, cap]

    def _answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Token ids of `answer` (+ end of answer) as they follow `prompt`: tokenise both and take the tail, so
        word-boundary tokens come out exactly as in a real continuation."""
        base = self.tok(prompt)["input_ids"]
        full = self.tok(prompt + " " + answer)["input_ids"]
        tail = full[len(base):] if full[: len(base)] == base else self.tok(answer, add_special_tokens=False)["input_ids"]
        return tail + [self.eos_id]

    def prepare(self, img):
        return self.processor.image_processor(img, return_tensors="pt")["pixel_values"][0]  # (3, S, S)

    def _batch_inputs(self, n_images: int):
        torch = self._torch
        seqs = self.prompt_ids * n_images  # row r = image r // W, wording r % W
        length = max(map(len, seqs))
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding: every prompt ends at the last column
            ids[r, length - len(s):] = torch.tensor(s)
            mask[r, length - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, *, cache=None, keep_last=True, **kw):
        """Model forward returning (logits, cache); `keep_last`: only the last position's logits (the full
        (rows, L, V) of a 600-token prompt would be huge)."""
        if keep_last and self._keep_kw:
            kw[self._keep_kw] = 1
        if cache is not None:
            kw[self._cache_kw] = cache
        out = self.model(**kw, use_cache=True)
        return out.logits, (out["cache"] if "cache" in out.keys() else out["past_key_values"])

    def score(self, items: list) -> Scores:
        torch = self._torch
        n_img, n_q, n_cls = len(items), len(self.questions), len(self.classes)
        with torch.inference_mode():
            ids, mask = self._batch_inputs(n_img)
            pixels = torch.stack(items).to(self.device, self.dtype).repeat_interleave(n_q, dim=0)  # (B*W, 3, S, S)
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as `generate` computes them
            logits, cache = self._forward(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=pos)
            last = logits[:, -1].float()  # (B*W, V)
            ll = self._class_loglik(last, cache, mask)  # (B*W, C); leaves the prefill cache unchanged
            tokens = self._greedy(last, cache, mask)  # (B*W, T)
        texts = [t.strip() for t in self.tok.batch_decode(tokens.cpu(), skip_special_tokens=True)]
        votes = np.full((n_img, n_q), -1, dtype=np.int32)
        for r, text in enumerate(texts):
            idx, _ = self.mapper(text)
            votes[r // n_q, r % n_q] = -1 if idx is None else idx
        probs = ll.view(n_img, n_q, n_cls).softmax(-1).mean(1)  # (B, C): averaged over wordings
        probs = (probs / probs.sum(-1, keepdim=True)).cpu().numpy().astype(np.float32)
        answers = [texts[b * n_q : (b + 1) * n_q] for b in range(n_img)]
        return Scores(probs, votes, answers=answers, unparsed=int((votes < 0).sum()))

    def _greedy(self, last, cache, mask):
        """Greedy decoding continuing the prefill cache; finished rows emit padding. (B*W, T) new tokens."""
        torch = self._torch
        rows = last.shape[0]
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        pos = mask.sum(-1, keepdim=True)  # (rows, 1): next position of each row
        new = []
        for _ in range(self.max_new_tokens):
            nxt = last.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            new.append(nxt)
            done |= nxt == self.eos_id
            if bool(done.all()) or len(new) == self.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = self._forward(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache)
            last, pos = logits[:, -1].float(), pos + 1
        return torch.stack(new, dim=1)

    def _class_loglik(self, last, cache, mask):
        """(rows, C) log P(class name + end | prompt), variants (casings) summed in probability space."""
        torch = self._torch
        rows, n_cls = last.shape[0], len(self.classes)
        n_q = len(self.questions)
        first = last.log_softmax(-1)  # (rows, V): the first answer token comes from the prefill
        per_class = max(1, SCORE_SEQUENCES // rows)
        out = torch.full((rows, n_cls), float("-inf"), device=self.device)
        for c0 in range(0, n_cls, per_class):
            cls = list(range(c0, min(c0 + per_class, n_cls)))
            jobs = [(r, c, v) for r in range(rows) for c in cls for v in range(len(self.name_ids[(r % n_q) * n_cls + c]))]
            seqs = [self.name_ids[(r % n_q) * n_cls + c][v] for r, c, v in jobs]
            t = max(map(len, seqs))
            ids = torch.full((len(jobs), t), self.pad_id, dtype=torch.long, device=self.device)
            nmask = torch.zeros_like(ids)
            for j, s in enumerate(seqs):  # right padding: the continuation starts right after the prompt
                ids[j, : len(s)] = torch.tensor(s, device=self.device)
                nmask[j, : len(s)] = 1
            src = torch.tensor([r for r, _, _ in jobs], device=self.device)
            sub = self._select(cache, src)
            logits, _ = self._forward(
                input_ids=ids, attention_mask=torch.cat([mask[src], nmask], dim=1), cache=sub, keep_last=False,
                position_ids=mask[src].sum(-1, keepdim=True) + torch.arange(t, device=self.device),
            )
            logp = logits.float().log_softmax(-1)  # (J, t, V): position i predicts token i + 1
            tok_lp = torch.cat([first[src].gather(1, ids[:, :1]), logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]], dim=1)
            seq_lp = (tok_lp * nmask).sum(1)  # (J,)
            for j, (r, c, _) in enumerate(jobs):
                out[r, c] = torch.logaddexp(out[r, c], seq_lp[j])
        return out

    @staticmethod
    def _select(cache, rows):
        """A copy of the prefill cache holding the given rows (repeats allowed), for one scoring forward."""
        sub = copy.deepcopy(cache)
        sub.batch_select_indices(rows)
        return sub

    def spec(self) -> dict:
        params, nbytes = count_parameters(self.model)
        return {
            "annotator": self.name, "model": self.model_name, "pretrained": "", "parameters": params,
            "weights_bytes": nbytes, "precision": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "max_new_tokens": self.max_new_tokens, "questions_filled": self.prompts,
        }
