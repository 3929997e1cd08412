"""Issue 10: bad input and failures end in one actionable line (or a correct result), nothing lost."""

from __future__ import annotations

import datasets
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.annotated import make_rows

runner = CliRunner()
TINY = ["--arch", "small_cnn", "--batch-size", "8", "--warmup-epochs", "1", "--queue-size", "32", "--num-workers", "0"]
CLASSES = ["red", "green", "blue"]


def write(path, rows):
    from pipeline.schema import features

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features(CLASSES))}).save_to_disk(str(path))
    return path


def train(ann, out, *extra):
    return runner.invoke(app, ["train", str(ann), str(out), *TINY, *extra])


def one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1, r.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


# --- contract: vlm_probs finite and non-negative; empty candidate sets ------------------------------------


@pytest.mark.parametrize("bad, needle", [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (-0.5, "negative")])
def test_non_finite_or_negative_vlm_probs_are_refused(tmp_path, bad, needle):
    rows = make_rows(12, CLASSES, seed=0)
    p = rows["vlm_probs"][3]
    p[0], p[1] = bad, (1.5 if bad == -0.5 else p[1])  # -0.5 + 1.5 + p[2]: still sums near 1 on purpose
    p[2] = 1 - p[0] - p[1] if bad == -0.5 else p[2]
    ann = write(tmp_path / "ann", rows)
    r = train(ann, tmp_path / "m", "--method", "kd", "--epochs", "1")
    one_line_error(r, "'vlm_probs'", "row 3", needle)
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_all_empty_candidate_sets_are_refused_some_empty_warned(tmp_path):
    rows = make_rows(12, CLASSES, seed=0)
    rows["candidates"] = [[] for _ in rows["candidates"]]
    r = train(write(tmp_path / "empty", rows), tmp_path / "m", "--method", "cc", "--epochs", "1")
    one_line_error(r, "'candidates'", "all 12 candidate sets are empty")

    rows = make_rows(12, CLASSES, seed=0)
    rows["candidates"][0] = []
    rows["candidates"][5] = []
    r = train(write(tmp_path / "some", rows), tmp_path / "m2", "--method", "cc", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "2 of 12 rows have an empty candidate set" in r.output
