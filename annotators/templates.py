"""Prompt templates and LLaVA question wordings: built-in lists by name, or a user file; `{}` marks the class.

The built-in lists are plain text files shipped inside the package (`annotators/prompts/`) and read through
`importlib.resources`, so an installed wheel finds them as well as a checkout does. They can be read, diffed
and copied as a starting point for a user file (same format: one per line, `#` comments, blank lines ignored):
`python -c "from annotators.templates import builtin_text; print(builtin_text('paper27'))"`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pipeline.errors import CoregError

BUILTIN_TEMPLATES = {"paper27": "paper27.txt", "imagenet80": "imagenet80.txt"}
BUILTIN_QUESTIONS = {"default": "llava_questions.txt"}


def builtin_text(name: str) -> str:
    """The text of a built-in list ('paper27', 'imagenet80' or 'default' for the LLaVA questions)."""
    file = {**BUILTIN_TEMPLATES, **BUILTIN_QUESTIONS}[name]
    return resources.files("annotators").joinpath("prompts", file).read_text(encoding="utf-8")


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _read_lines(path: Path, option: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CoregError(f"{option} {path}: cannot read the file ({e.strerror})") from None
    return _lines(text)


def _resolve(value: str, builtin: dict[str, str], option: str) -> list[str]:
    if value in builtin:
        return _lines(builtin_text(value))
    path = Path(value)
    if not path.is_file():
        raise CoregError(f"{option} {value!r}: not a built-in ({' | '.join(builtin)}) and no such file")
    return _read_lines(path, option)


def load_templates(value: str) -> list[str]:
    """CLIP prompt templates: 'paper27' (default, the paper's), 'imagenet80', or a file path."""
    templates = _resolve(value, BUILTIN_TEMPLATES, "--templates")
    if not templates:
        raise CoregError(f"--templates {value}: the file holds no templates; write one per line with {{}} for the class")
    for t in templates:
        if t.count("{}") != 1:
            raise CoregError(f"--templates {value}: template {t!r} must contain exactly one {{}} where the class name goes")
    if len(set(templates)) != len(templates):
        raise CoregError(f"--templates {value}: a template is listed twice; each one should vote once")
    return templates


def load_questions(value: str) -> list[str]:
    """LLaVA question wordings: 'default' or a file; each must contain `{options}` (the listed class names)."""
    questions = _resolve(value, BUILTIN_QUESTIONS, "--questions")
    if not questions:
        raise CoregError(f"--questions {value}: the file holds no questions; write one per line with {{options}}")
    for q in questions:
        if "{options}" not in q:
            raise CoregError(f"--questions {value}: question {q!r} must contain {{options}} where the class names go")
    return questions


def prompt_name(name: str) -> str:
    """How a class name reads in a prompt: folder names use `_` for spaces (CIFAR-100's `aquarium_fish`)."""
    return name.replace("_", " ").strip()


def fill(template: str, name: str) -> str:
    return template.replace("{}", prompt_name(name))
