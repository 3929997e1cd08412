"""The prior shift of the model `coreg train` saves (`--prior-shift em`): every network's logits on the training
images, the decision of pipeline/prior_shift.py, and the line that says what was done (split from
stages/train.py)."""

from __future__ import annotations

from stages.train_checks import prediction_nets


def prior_shift(method, ctx, model_config: dict, classes: list[str]):
    """({net: (C,) logit shift} or {}, what was decided) for the trained networks, in eval mode on the
    un-augmented training images; `save_checked` folds the shift into the saved last biases."""
    import torch

    from pipeline import prior_shift as ps

    nets, predict_with = prediction_nets(method.prediction_weights(), model_config["train_config"]["predict_with"])
    predict = nets if predict_with == "ensemble" else [predict_with]  # the networks whose logits predict
    with torch.no_grad():
        logits = {n: torch.cat([method.predict_logits(ctx.augment.normalize(ctx.images[r]), n).float().cpu()
                                for r in torch.arange(ctx.images.shape[0]).split(1024)]) for n in nets}
    shift, info = ps.estimate(logits, ctx.candidates.cpu(), predict)
    if info.get("applied"):
        mix = sorted(zip(info["prior"], classes, strict=True), reverse=True)
        print(f"prior shift: {info['why']}; estimated shares {mix[0][1]} {mix[0][0]:.0%} ... {mix[-1][1]} {mix[-1][0]:.0%}: "
              f"the saved model's logits lean towards that mix (strength {info['strength']:g}; --prior-shift off keeps the balanced model)")
    else:
        print(f"prior shift: none; {info['why']}")
    shift, raised = ps.keep_present(logits, ctx.candidates.cpu(), predict, shift)
    if raised:
        info["raised"] = {classes[j]: v for j, v in raised.items()}
        print(f"prior shift: raised {', '.join(f'{classes[j]} (+{v:.2f})' for j, v in raised.items())}, predicted for under "
              f"{ps.PRESENCE:.0%} of a fair share of the training images: a listed class is taken as present (--prior-shift off keeps the model as trained)")
    if shift:
        info["logit_shift"] = {k: [round(float(v), 6) for v in d] for k, d in shift.items()}
    return shift, info
