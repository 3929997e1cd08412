"""An annotator by name (`--annotator clip|llava`), e.g. from annotation.json to re-time it (`coreg evaluate`).

Kept out of `annotators/base.py`: the concrete annotators import the base, so a factory there would make the
base import them back (a cycle). Here it sits above both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import CoregError

if TYPE_CHECKING:
    from annotators.base import Annotator


def load_annotator(annotator: str, *, classes: list[str], model: str = "", pretrained: str = "",
                   templates: str = "paper27", questions: str = "default", device: str = "auto",
                   max_new_tokens: int = 12, text_cache=None) -> Annotator:
    """Build an annotator by name with its `from_pretrained` (models load here, so this can take a while)."""
    if annotator == "clip":
        from annotators.clip import ClipAnnotator
        from annotators.templates import load_templates

        return ClipAnnotator.from_pretrained(model, pretrained, classes=classes, templates=load_templates(templates),
                                             device=device, text_cache=text_cache)
    if annotator == "llava":
        from annotators.llava import LlavaAnnotator
        from annotators.templates import load_questions

        if pretrained:
            raise CoregError("--pretrained is for CLIP; give LLaVA weights as --model (a hub id or a local folder)")
        return LlavaAnnotator.from_pretrained(
            model, classes=classes, questions=load_questions(questions), device=device, max_new_tokens=max_new_tokens
        )
    raise CoregError(f"--annotator {annotator!r}: unknown; use clip | llava | synthetic")
