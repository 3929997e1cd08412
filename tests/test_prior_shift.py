"""The final model's prior shift (pipeline/prior_shift.py, `--prior-shift em`): EM recovers a folder's class mix
from posteriors alone, the guards leave balanced and tiny folders alone and keep at least three quarters (rounded up) of
every class's training-image predictions, and `coreg train` folds the shift into the saved last bias without touching the
checkpoint or reading the labels."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline import prior_shift as ps


def gaussian_rows(counts, *, seed=0, sep=1.5, extra=0.3):
    """1-D Gaussian classes at 0, sep, 2 sep ...: rows drawn with `counts` per class, their exact posteriors under
    a uniform prior (as logits), candidate sets = the true class plus each other class with probability `extra`."""
    g = torch.Generator().manual_seed(seed)
    c = len(counts)
    y = torch.cat([torch.full((k,), i) for i, k in enumerate(counts)])
    x = y * sep + torch.randn(len(y), generator=g)
    means = torch.arange(c) * sep
    logits = -0.5 * (x[:, None] - means[None]) ** 2
    mask = torch.rand(len(y), c, generator=g) < extra
    mask[torch.arange(len(y)), y] = True
    return logits, mask, y


def test_em_recovers_the_class_mix_of_the_rows_with_and_without_candidate_sets():
    counts = [600, 300, 100]
    logits, mask, y = gaussian_rows(counts)
    truth = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    for m in (None, mask):
        prior = ps.em_prior(torch.softmax(logits, 1), m)
        assert prior.sum().item() == pytest.approx(1.0)
        assert torch.allclose(prior, truth, atol=0.04), (m is None, prior)
    assert ps.effective_share(torch.full((4,), 0.25)) == pytest.approx(1.0)
    assert ps.effective_share(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(0.25)


def test_a_long_tail_is_shifted_towards_its_mix_and_gains_accuracy_keeping_every_class():
    logits, mask, y = gaussian_rows([600, 300, 100])
    shift, info = ps.estimate({"net1": logits, "net2": logits}, mask, ["net1", "net2"])
    assert info["applied"] and info["effective_classes"] < 0.9 * 3 and "imbalanced" in info["why"]
    d = shift["net1"]
    assert d[0] > 0 > d[2] and d.min() >= np.log(ps.FLOOR) * info["strength"] - 1e-6  # the floor: odds at most halved
    assert info["logit_shift"]["net1"] == pytest.approx(d.tolist(), abs=1e-5)
    before = (2 * logits).argmax(1)
    after = (2 * logits + shift["net1"] + shift["net2"]).argmax(1)
    assert (after == y).float().mean() > (before == y).float().mean()
    kept = torch.bincount(after, minlength=3) >= torch.ceil(ps.KEEP * torch.bincount(before, minlength=3))
    assert bool(kept.all())


def test_a_balanced_folder_and_too_few_rows_are_left_as_trained():
    logits, mask, _ = gaussian_rows([300, 300, 300])
    shift, info = ps.estimate({"net1": logits}, mask, ["net1"])
    assert shift == {} and not info["applied"] and "balanced" in info["why"]
    logits, mask, _ = gaussian_rows([40, 20, 10])  # 70 rows, under 30 per class
    shift, info = ps.estimate({"net1": logits}, mask, ["net1"])
    assert shift == {} and "too few" in info["why"]


def test_the_shift_is_weakened_until_every_class_keeps_three_quarters_of_its_predictions():
    # a rare class the model barely separates: the full shift would take most of its predictions away
    logits, mask, y = gaussian_rows([900, 90, 60], sep=0.8, extra=0.6)
    shift, info = ps.estimate({"net1": logits}, mask, ["net1"])
    assert info["applied"] and info["strength"] < 1
    full = (logits + torch.tensor(info["prior"]).mul(3).clamp_min(ps.FLOOR).log().float()).argmax(1)  # strength 1
    base = torch.bincount(logits.argmax(1), minlength=3)
    assert not bool((torch.bincount(full, minlength=3) >= torch.ceil(ps.KEEP * base)).all())  # why it was weakened
    kept = torch.bincount((logits + shift["net1"]).argmax(1), minlength=3)
    assert bool((kept >= torch.ceil(ps.KEEP * base)).all())


def test_a_class_predicted_twice_keeps_both_predictions():
    # 80 rows of class 0, 38 of class 1, and 2 the model gives class 2: one of them by a margin of 0.3 only, which
    # the full shift (+0.69 for class 0, -0.69 for class 2) would flip; three quarters of 2, rounded up, is 2
    logits = torch.zeros(120, 3)
    logits[:80, 0] = 4.0
    logits[80:118, 1] = 4.0
    logits[118, 2] = 4.0
    logits[119, 2] = 0.3
    shift, info = ps.estimate({"net1": logits}, torch.ones(120, 3), ["net1"])
    assert info["applied"] and info["strength"] == 0.125  # the strongest halving under which row 119 stays class 2
    assert torch.bincount((logits + shift["net1"]).argmax(1), minlength=3)[2] == 2
    _, weaker = ps.estimate({"net1": logits}, torch.ones(120, 3), ["net1"], keep=0.5)  # keeps 1 of 2: no halving
    assert weaker["strength"] == 1.0


def test_a_lost_class_is_raised_to_a_fifth_of_a_fair_share_on_the_rows_it_comes_closest_on():
    # class 2 (60 of 660 rows) is out-voted everywhere: its logit sits 16 below the truth's, so nobody predicts it
    logits, mask, y = gaussian_rows([300, 300, 60], sep=3.0)
    logits[:, 2] -= 16.0
    two = {"net1": logits, "net2": logits}
    assert int(((2 * logits).argmax(1) == 2).sum()) == 0
    shift, raised = ps.keep_present(two, mask, ["net1", "net2"], {})
    need = int(np.ceil(ps.PRESENCE * 660 / 3))  # 44 rows
    after = (2 * logits + shift["net1"] + shift["net2"]).argmax(1)
    assert list(raised) == [2] and int((after == 2).sum()) == need
    assert shift["net1"][2] == pytest.approx(raised[2] / 2) and shift["net1"][:2].abs().max() == 0  # half per network
    assert (y[after == 2] == 2).float().mean() > 0.75  # the rows it gets back are mostly its own (9 % of all rows)
    assert bool((after[(2 * logits).argmax(1) != after] == 2).all())  # no row moves between the other classes
    # an EM shift passed in is kept and the raise added to it; a net outside the prediction gets no raise
    base = {"net1": torch.tensor([0.1, 0.0, -0.1]), "net2": torch.tensor([0.2, 0.0, 0.0])}
    shift1, raised1 = ps.keep_present(two, mask, ["net1"], base)
    assert raised1 and torch.equal(shift1["net2"], base["net2"])
    assert shift1["net1"][2] == pytest.approx(-0.1 + raised1[2]) and shift1["net1"][0] == pytest.approx(0.1)


def test_present_classes_and_classes_the_annotation_leaves_out_are_not_raised():
    logits, mask, _ = gaussian_rows([300, 300, 60], sep=3.0)
    assert ps.keep_present({"net1": logits}, mask, ["net1"], {}) == ({}, {})  # every class predicted often enough
    logits[:, 2] -= 6.0
    mask[:, 2] = False
    mask[:5, 2] = True  # class 2 is a candidate of 5 rows only, under the floor of 44
    assert ps.keep_present({"net1": logits}, mask, ["net1"], {}) == ({}, {})


def _long_tailed(path, *, shuffle_labels=False):
    from tests.annotated import make_annotated

    src = make_annotated(path.parent / (path.name + "_src"), n_train=300, n_test=30, q=0.3, eta=0.05)
    dsd = datasets.load_from_disk(str(src))
    rows = [i for i, lab in enumerate(dsd["train"]["label"]) if (lab == 0) or (lab == 1 and i % 4 == 1) or (lab == 2 and i % 10 == 2)]
    train = dsd["train"].select(rows)  # 100 / 25 / 10 rows
    if shuffle_labels:
        labels = np.random.default_rng(1).permutation(train["label"]).tolist()
        train = train.remove_columns("label").add_column("label", labels).cast(train.features)
    datasets.DatasetDict({"train": train, "test": dsd["test"]}).save_to_disk(str(path))
    return path


def test_coreg_train_folds_the_shift_into_the_saved_bias_only_and_never_reads_the_labels(tmp_path):
    from stages.cli import app

    runner = CliRunner()
    args = ["--arch", "small_cnn", "--batch-size", "16", "--epochs", "6", "--warmup-epochs", "3", "--queue-size", "32",
            "--num-workers", "0", "--cpu"]
    outs = {}
    runs = (("em", False, []), ("shuffled", True, []), ("off", False, ["--prior-shift", "off"]),
            ("ce", False, ["--method", "ce", "--prior-shift", "em"]))  # a one-network method, asked explicitly
    anns = {shuffled: _long_tailed(tmp_path / f"ann_{shuffled}", shuffle_labels=shuffled) for shuffled in (False, True)}
    for name, shuffled, extra in runs:
        ann = anns[shuffled]
        out = tmp_path / name
        r = runner.invoke(app, ["train", str(ann), str(out), *args, *extra])
        assert r.exit_code == 0, r.output
        outs[name] = (out, r.output)
    out, printed = outs["em"]
    info = json.loads((out / "config.json").read_text())["prior_shift"]
    assert info["applied"] and "prior shift:" in printed and "--prior-shift off" in printed
    saved = load_file(str(out / "model.safetensors"))
    trained = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["modules"]
    for n in ("net1", "net2"):
        diff = saved[f"{n}.fc.bias"] - trained[n]["fc.bias"]
        assert torch.allclose(diff, torch.tensor(info["logit_shift"][n]), atol=1e-5)
        assert torch.equal(saved[f"{n}.fc.weight"], trained[n]["fc.weight"])
    shuffled = load_file(str(outs["shuffled"][0] / "model.safetensors"))
    assert all(torch.equal(saved[k], shuffled[k]) for k in saved)  # the labels are diagnostics only
    off = outs["off"][0]
    assert "prior_shift" not in json.loads((off / "config.json").read_text())
    plain = load_file(str(off / "model.safetensors"))
    assert torch.equal(plain["net1.fc.bias"], trained["net1"]["fc.bias"])
    ce = outs["ce"][0]
    ce_info = json.loads((ce / "config.json").read_text())["prior_shift"]
    ce_saved = load_file(str(ce / "model.safetensors"))
    ce_trained = torch.load(ce / "checkpoint.pt", map_location="cpu", weights_only=True)["modules"]
    ce_diff = ce_saved["net1.fc.bias"] - ce_trained["net1"]["fc.bias"]
    expected = torch.tensor(ce_info["logit_shift"]["net1"]) if "logit_shift" in ce_info else torch.zeros(3)
    assert torch.allclose(ce_diff, expected, atol=1e-5)
    # bench/prior_shift_probe.py re-scores saved models: its logits, with the recorded shift taken off, give the
    # shift that training saved (so comparing guards on saved dev models is exact), and its table runs
    from bench import prior_shift_probe

    d = prior_shift_probe.logits_of(str(out))
    logits = {k: torch.from_numpy(v) for k, v in d["train"].items()}
    again, again_info = ps.estimate(logits, torch.from_numpy(d["mask"]), d["predict"])
    again, raised = ps.keep_present(logits, torch.from_numpy(d["mask"]), d["predict"], again)
    assert again_info["strength"] == info["strength"] and len(raised) == len(info.get("raised", {}))
    for n in ("net1", "net2"):
        assert torch.allclose(again[n], torch.tensor(info["logit_shift"][n]), atol=1e-4)
    table = tmp_path / "probe.md"
    prior_shift_probe.main(["--group", f"tiny={out}", "--keep", "0.5f,0.75", "--out", str(table)])
    rows = [r for r in table.read_text().splitlines() if r.startswith("| tiny |")]
    assert len(rows) == 2 and "| 0.5f |" in rows[0] and "| 0.75 |" in rows[1]


def test_coreg_train_says_which_lost_class_it_raised_and_records_it(capsys):
    # stages/train_shift.py on stand-in networks whose logits are the rows' own (the class-2 column 16 below the
    # truth's, so nobody predicts class 2): the raise is printed, recorded and folded into the shift it returns
    from types import SimpleNamespace

    from stages.train_shift import prior_shift

    logits, mask, _ = gaussian_rows([300, 300, 60], sep=3.0)
    logits[:, 2] -= 16.0
    method = SimpleNamespace(prediction_weights=lambda: {"net1.fc.bias": torch.zeros(3), "net2.fc.bias": torch.zeros(3)},
                             predict_logits=lambda x, n: x)
    ctx = SimpleNamespace(images=logits, candidates=mask, augment=SimpleNamespace(normalize=lambda x: x))
    shift, info = prior_shift(method, ctx, {"train_config": {"predict_with": "ensemble"}}, ["zero", "one", "two"])
    printed = capsys.readouterr().out
    assert list(info["raised"]) == ["two"] and "raised two (+" in printed and "--prior-shift off" in printed
    after = (2 * logits + shift["net1"] + shift["net2"]).argmax(1)
    assert int((after == 2).sum()) == int(np.ceil(ps.PRESENCE * 660 / 3))
    assert info["logit_shift"]["net2"] == pytest.approx(shift["net2"].tolist(), abs=1e-5)
