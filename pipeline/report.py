"""The evaluation report: report.json (the contract), report.md (one readable page) and the terminal table.

Everything here formats a finished report dict; nothing is computed from images (stages/evaluate.py does
that), so a report can be re-rendered from its report.json alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.model_io import atomic_write_text


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} pts"


def human_count(n: int | None) -> str:
    if n is None:
        return "n/a"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


def times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}×" if x >= 10 else f"{x:.1f}×"


def headline(r: dict) -> str:
    """One sentence a user can quote: "N× smaller, M× faster, K points more accurate"."""
    cost = r["cost"]
    parts = []
    for key, more, less in (("smaller_x", "smaller", "larger"), ("faster_x", "faster", "slower")):
        x = cost.get(key)
        if x:
            parts.append(f"{times(x)} {more}" if x >= 1 else f"{times(1 / x)} {less}")
    gain = r.get("gain_over_zero_shot")
    if gain is not None:
        word = "more" if gain >= 0 else "less"
        parts.append(f"{abs(100 * gain):.1f} points {word} accurate")
    vlm = cost["vlm"].get("model") or cost["vlm"].get("annotator")
    if not parts:
        return "The student's size, speed and accuracy could not be compared with the VLM's (see the notes)."
    if cost["vlm"].get("annotator") == "synthetic":
        return f"The student is {', '.join(parts)} than the top-1 of its synthetic annotation."
    return f"The student is {', '.join(parts)} than the VLM{f' ({vlm})' if vlm else ''} that annotated its data."


def summary_rows(r: dict) -> list[tuple[str, str, str]]:
    """(metric, student, VLM) rows shared by report.md and the terminal table."""
    s, v = r["cost"]["student"], r["cost"]["vlm"]
    rows = []
    if r["labels_known"]:
        rows += [
            ("accuracy", pct(r["student_accuracy"]), pct(r["zero_shot_accuracy"])),
            ("balanced accuracy", pct(r["student_balanced_accuracy"]), pct(r["zero_shot_balanced_accuracy"])),
        ]
        for name, m in r["variants"].items():
            rows.append((f"accuracy, {name} only" if name != "ensemble" else "accuracy, ensemble", pct(m["accuracy"]), ""))
    rows += [
        ("agreement with VLM top-1", pct(r["agreement_with_vlm"]), ""),
        ("parameters (used to predict)", human_count(s["parameters"]), human_count(v.get("parameters"))),
        ("weights", human_bytes(s["weights_bytes"]), human_bytes(v.get("weights_bytes"))),
        ("images/s", rate(s.get("images_per_second")), rate(v.get("images_per_second"))),
    ]
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _label_section(r: dict) -> str:
    out, dis = r["outside_candidates"], r["disagree_with_vlm"]
    lines = [
        f"- Candidate sets: {r['mean_candidates']:.2f} classes on average, {pct(r['singleton_share'])} singletons"
        + (f", {pct(r['empty_share'])} empty" if r.get("empty_share") else "")
        + (f"; the true class is in the set on {pct(r['candidate_coverage'])} of labeled rows." if r["labels_known"] else "."),
        f"- The student picks a class **outside** the candidate set on {out['count']} rows ({pct(out['share'])}).",
        f"- The student **disagrees with the VLM's top-1** on {dis['count']} rows ({pct(dis['share'])}).",
    ]
    if r["labels_known"]:
        lines[1] += f" Of the {out['labeled']} labeled ones it is right on {out['student_correct']}" + (
            f" ({pct(out['student_accuracy'])}); the VLM top-1 on {out['vlm_correct']}." if out["labeled"] else "."
        )
        lines[2] += f" Of the {dis['labeled']} labeled ones the student is right on {dis['student_correct']}, the VLM on {dis['vlm_correct']}."
        err = r.get("vlm_errors")  # absent from reports written before it existed
        if err and err["count"]:
            lines.append(
                f"- Where the VLM's top-1 is wrong ({err['count']} labeled rows) the student repeats its class on "
                f"{err['copied']} ({pct(err['copied_share'])}) and is right on {err['student_correct']} "
                f"({pct(err['student_accuracy'])}): a student that repeats most of them has learned the VLM's mistakes."
            )
    return "\n".join(lines)


def render_markdown(r: dict) -> str:
    title = f"# coreg evaluation: split `{r['split']}`, {r['n']} images"
    parts = [title, ""]
    if r["labels_known"]:
        parts += [f"**{headline(r)}**", ""]
    else:
        parts += [
            f"**Accuracy cannot be measured: no image of the `{r['split']}` split has a known label.** "
            "Shown instead: agreement with the VLM, the prediction distribution and the images where the student "
            "overrules the VLM, for a quick check by eye.",
            "",
        ]
    parts += [f"- model: `{r['model']}` ({r['cost']['student']['arch']}, {r['method']}, predicts with {r['predict_with']})"]
    parts += [f"- data: `{r['annotated']}` ({r['labeled']} of {r['n']} rows labeled)", ""]
    parts += ["## Summary", "", _md_table(["", "student", "VLM zero-shot"], [list(x) for x in summary_rows(r)]), ""]
    parts += [_speed_note(r), ""]
    parts += ["## Labels: what the student changed", "", _label_section(r), ""]
    if r["labels_known"]:
        rows = [
            [name, str(m["count"]), pct(m["student_accuracy"]), pct(m["zero_shot_accuracy"]), _delta(m)]
            for name, m in r["per_class"].items()
        ]
        parts += ["## Per class", "", _md_table(["class", "images", "student", "VLM", "gain"], rows), ""]
    else:
        rows = [[name, str(r["prediction_counts"][name]), str(r["vlm_prediction_counts"][name])] for name in r["per_class"]]
        parts += ["## Predictions per class", "", _md_table(["class", "student", "VLM"], rows), ""]
    figs = r["figures"]
    parts += ["## Figures", ""]
    for key, caption in (
        ("confusion_student", "Student confusion matrix"),
        ("confusion_vlm", "VLM zero-shot confusion matrix"),
        ("distribution", "Predicted class distribution"),
    ):
        if key in figs:
            parts += [f"![{caption}]({figs[key]})", ""]
    if "overrules" in figs:
        parts += [
            "## Where the student overrules the VLM",
            "",
            f"![Overrules]({figs['overrules']})",
            "",
            "Each image: `S` the student's class, `V` the VLM's top-1, `cand` the candidate set, `true` the label "
            "when known (green: student right, red: student wrong, black: unknown). `[outside]` marks a class "
            "outside the candidate set; those rows come first.",
            "",
        ]
    if r["notes"]:
        parts += ["## Notes", "", *[f"- {n}" for n in r["notes"]], ""]
    return "\n".join(parts)


def _delta(m: dict) -> str:
    if m["student_accuracy"] is None:
        return "n/a"
    return points(m["student_accuracy"] - m["zero_shot_accuracy"])


def _speed_note(r: dict) -> str:
    s, v = r["cost"]["student"], r["cost"]["vlm"]
    text = (
        f"Student speed: {s.get('timed_images', 0)} images of this split on {s['device']}, batch {s['batch_size']}, "
        "from decoded images to class probabilities (preprocessing included)."
    )
    if v.get("source") == "measured":
        text += f" VLM speed: the same images, same device and process ({v.get('device')})."
    elif v.get("source") == "annotation.json":
        text += " VLM speed: from annotation.json (the annotate run's throughput, possibly on other hardware)."
    else:
        text += " VLM speed: unknown."
    return text


def print_summary(r: dict, out_dir: Path) -> None:
    """A short table on the terminal (rich), then where the full report is."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"coreg evaluate: {r['split']} split, {r['n']} images", title_justify="left")
    table.add_column("")
    table.add_column("student", justify="right")
    table.add_column("VLM zero-shot", justify="right")
    for row in summary_rows(r):
        table.add_row(*row)
    console = Console(width=100)
    console.print(table)
    console.print(headline(r) if r["labels_known"] else "Accuracy cannot be measured: the split has no labels.")
    console.print(f"report: {out_dir / 'report.md'}")


def write_report(out_dir: Path, r: dict) -> None:
    atomic_write_text(out_dir / "report.json", json.dumps(r, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(r))
