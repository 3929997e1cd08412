"""The synthetic annotator: the paper's generator's statistics, seed-determinism, and the CLI path."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from typer.testing import CliRunner

from annotators.synthetic import draw_candidates, expected_size, parse_noise, uniform_probs
from pipeline.errors import CoregError
from pipeline.schema import load_annotated
from stages.cli import app
from tests.tiny import make_image_folder

runner = CliRunner()


@pytest.mark.parametrize("q, eta, c", [(0.03, 0.2, 10), (0.3, 0.5, 4), (0.0, 0.0, 5), (1.0, 0.3, 3)])
def test_generator_statistics_match_expectation(q, eta, c):
    n = 40_000
    labels = np.arange(n) % c
    mask, pred = draw_candidates(labels, c, q=q, eta=eta, seed=1)
    missed = ~mask[np.arange(n), labels]
    sizes = mask.sum(1)
    # 4 standard errors of a binomial share / of the mean size: fails only if the generator is wrong
    assert abs(missed.mean() - eta) <= 4 * np.sqrt(eta * (1 - eta) / n) + 1e-12
    assert abs(sizes.mean() - expected_size(c, q, eta)) <= 4 * sizes.std() / np.sqrt(n) + 1e-12
    wrong = mask.copy()
    wrong[np.arange(n), labels] = False
    kept = ~missed  # rows that kept the label: each wrong class entered with probability q
    if kept.any():
        share = wrong[kept].sum() / (kept.sum() * (c - 1))
        assert abs(share - q) <= 4 * np.sqrt(q * (1 - q) / (kept.sum() * (c - 1))) + 1e-12
    assert (sizes >= 1).all() and mask[np.arange(n), pred].all()  # vlm_pred is always in the set
    probs = uniform_probs(mask)
    assert np.allclose(probs.sum(1), 1) and np.allclose(probs[mask], np.repeat(1 / sizes, sizes))


def test_generator_edge_cases_and_seed():
    labels = np.array([0, 1, 2, 1])
    mask, _ = draw_candidates(labels, 3, q=1.0, eta=1.0, seed=0)  # everything in, then the label out
    assert (mask == ~np.eye(3, dtype=bool)[labels]).all()
    mask, pred = draw_candidates(labels, 3, q=0.0, eta=0.0, seed=0)  # clean singleton labels
    assert (mask == np.eye(3, dtype=bool)[labels]).all() and (pred == labels).all()
    a = draw_candidates(np.arange(500) % 7, 7, q=0.2, eta=0.3, seed=5)
    b = draw_candidates(np.arange(500) % 7, 7, q=0.2, eta=0.3, seed=5)
    c = draw_candidates(np.arange(500) % 7, 7, q=0.2, eta=0.3, seed=6)
    assert all((x == y).all() for x, y in zip(a, b, strict=True)) and not (a[0] == c[0]).all()


@pytest.mark.parametrize("text", ["q=0.1", "eta=0.1", "q=0.1,eta=2", "q=x,eta=0.1", "q=0.1,eta=0.1,q=0.2", "p=0.1,eta=0", "q0.1,eta=0"])
def test_parse_noise_rejects(text):
    with pytest.raises(CoregError, match="--noise"):
        parse_noise(text)
    assert parse_noise("eta=0.2, q=0.03") == (0.03, 0.2)


def test_cli_synthetic(tmp_path):
    img = make_image_folder(tmp_path / "img", classes=("a", "b", "c", "d"), n_per_class=6, split=("train", "test"))
    args = ["annotate", str(img), "", "--annotator", "synthetic", "--noise", "q=0.3,eta=0.25", "--seed", "3", "--shard-size", "7"]
    outs = []
    for name in ("one", "two"):
        args[2] = str(tmp_path / name)
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        outs.append(load_annotated(tmp_path / name, stage="test")[0])
    one, two = outs
    assert one["train"]["candidates"] == two["train"]["candidates"] and one["test"]["vlm_pred"] == two["test"]["vlm_pred"]
    labels = np.array(one["train"]["label"])
    mask, pred = draw_candidates(labels, 4, q=0.3, eta=0.25, seed=np.random.SeedSequence([3, 0]))
    assert one["train"]["candidates"] == [np.flatnonzero(m).tolist() for m in mask] and one["train"]["vlm_pred"] == pred.tolist()
    info = json.loads((tmp_path / "one" / "annotation.json").read_text())
    assert info["annotator"] == "synthetic" and info["noise"] == {"q": 0.3, "eta": 0.25, "seed": 3}
    assert info["stats"]["train"]["coverage"] == pytest.approx(mask[np.arange(len(labels)), labels].mean())
    r = runner.invoke(app, args[:-4] + ["--seed", "4"])  # another seed: other sets, never the cached ones
    assert r.exit_code == 0 and datasets.load_from_disk(args[2])["train"]["candidates"] != one["train"]["candidates"]


def test_cli_synthetic_needs_labels(tmp_path):
    img = make_image_folder(tmp_path / "img", classes=("a", "b"), n_per_class=2)
    r = runner.invoke(app, ["annotate", str(img / "a"), str(tmp_path / "o"), "--annotator", "synthetic", "--classes", "x,y"])
    assert r.exit_code == 2 and "needs labeled images" in r.output
    r = runner.invoke(app, ["annotate", str(img), str(tmp_path / "o"), "--annotator", "synthetic", "--model", "ViT-B-32"])
    assert r.exit_code == 2 and "drop --candidates" in r.output
    r = runner.invoke(app, ["annotate", str(img), str(tmp_path / "o"), "--annotator", "synthetic", "--noise", "q=2,eta=0"])
    assert r.exit_code == 2 and "--noise" in r.output
