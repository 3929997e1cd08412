"""An instance-dependent annotator for the accuracy benchmark: errors that depend on the image, as a VLM's do.

A VLM's candidate set is the union of its prompts' top-1 answers (coreg-method.md §2.1): each prompt is a
classifier with its own biases, and they fail together on images that look like another class. Here each
"prompt" is a weak classifier trained on a few labelled images (a disjoint pool, never the student's images),
each on a different hand-made view of the image and its own few-shot draw:

    colour      joint RGB histogram (4 x 4 x 4 bins)
    gradient    histograms of gradient orientation (8 bins, magnitude-weighted) on a 4 x 4 grid of cells
    layout      the image average-pooled to 8 x 8 RGB
    conv_a/b    two banks of 48 random 5 x 5 filters, ReLU, average-pooled to 4 x 4 (a random-feature net)

Each is a multinomial logistic regression on standardised features. Then, like the CLIP annotator:
`vlm_probs` = the mean of the prompts' class probabilities, `vlm_pred` = its argmax, candidates = the union
of the prompts' top-1 labels, `votes` = those top-1 labels. Its mistakes are systematic (the same image fools
the same feature) rather than the label-independent coin flips of the synthetic generator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PROMPTS = ("colour", "gradient", "layout", "conv_a", "conv_b")


def _colour(x: torch.Tensor) -> torch.Tensor:
    q = (x.long() * 4) // 256  # (N, 3, H, W) 0..3 per channel
    code = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)  # (N, H*W) joint bin 0..63
    hist = F.one_hot(code, 64).sum(dim=1).float()  # (N, 64)
    return (hist / code.shape[1]).sqrt()  # sqrt: a Hellinger-style feature, less dominated by the background


def _gradient(x: torch.Tensor) -> torch.Tensor:
    g = x.float().mean(dim=1, keepdim=True)  # (N, 1, H, W) grey
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(g, kx, padding=1), F.conv2d(g, kx.transpose(2, 3), padding=1)  # Sobel
    mag = (gx**2 + gy**2).sqrt()  # (N, 1, H, W)
    ang = torch.atan2(gy, gx) % np.pi  # unsigned orientation in [0, π)
    bins = (ang / np.pi * 8).long().clamp(max=7)  # (N, 1, H, W)
    per_bin = F.one_hot(bins[:, 0], 8).permute(0, 3, 1, 2).float() * mag  # (N, 8, H, W)
    cells = F.adaptive_avg_pool2d(per_bin, 4).flatten(1)  # (N, 128)
    return cells / cells.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _layout(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1)  # (N, 192)


def _conv(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 3, 5, 5, generator=g)
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)  # zero-mean filters respond to structure, not brightness
    b = torch.randn(48, generator=g) * 0.1
    xn = (x.float() / 255 - 0.5) / 0.25
    out = []
    for chunk in xn.split(1024):
        out.append(F.adaptive_avg_pool2d(F.relu(F.conv2d(chunk, w, b, padding=2)), 4).flatten(1))  # (n, 768)
    return torch.cat(out)


def features(images: torch.Tensor, prompt: str, *, seed: int) -> np.ndarray:
    """(N, D) float64 features of uint8 images (N, 3, H, W) for one prompt."""
    f = {
        "colour": _colour,
        "gradient": _gradient,
        "layout": _layout,
        "conv_a": lambda x: _conv(x, seed * 2 + 1),
        "conv_b": lambda x: _conv(x, seed * 2 + 2),
    }[prompt](images)
    return f.double().numpy()


class InstanceAnnotator:
    """Fit on a labelled pool (few shots per class per prompt), then annotate any images."""

    def __init__(self, *, shots: int = 40, seed: int = 0, reg: float = 1.0, prompts: tuple[str, ...] = PROMPTS):
        unknown = sorted(set(prompts) - set(PROMPTS))
        if unknown or not prompts:
            raise SystemExit(f"instance annotator: unknown prompts {unknown}; choose from {'+'.join(PROMPTS)}")
        # fewer prompts = a smaller union: the low-coverage sets of a VLM whose templates fail together (GTSRB, SVHN)
        self.shots, self.seed, self.reg, self.prompts = shots, seed, reg, tuple(p for p in PROMPTS if p in prompts)
        self.models: dict = {}

    def fit(self, images: torch.Tensor, labels: np.ndarray) -> InstanceAnnotator:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        labels = np.asarray(labels)
        classes = np.unique(labels)
        for i, prompt in enumerate(PROMPTS):
            if prompt not in self.prompts:
                continue
            rng = np.random.default_rng([self.seed, i])  # each prompt sees its own few shots
            rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), self.shots, replace=False) for c in classes])
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=self.reg, max_iter=2000))
            clf.fit(features(images[torch.as_tensor(rows)], prompt, seed=self.seed), labels[rows])
            self.models[prompt] = clf
        self.num_classes = len(classes)
        return self

    def annotate(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """candidates (N, C) bool, vlm_probs (N, C) float32, vlm_pred (N,) int32, votes (N, P) int32."""
        probs = np.stack([self.models[p].predict_proba(features(images, p, seed=self.seed)) for p in self.prompts])  # (P, N, C)
        votes = probs.argmax(axis=2).T  # (N, P) each prompt's top-1
        cand = np.zeros((images.shape[0], self.num_classes), dtype=bool)
        cand[np.arange(images.shape[0])[:, None], votes] = True  # union of the prompts' top-1 (paper rule)
        mean = probs.mean(axis=0).astype(np.float32)  # (N, C) averaged like the 27 templates
        mean /= mean.sum(axis=1, keepdims=True)
        return {"candidates": cand, "vlm_probs": mean, "vlm_pred": mean.argmax(axis=1).astype(np.int32), "votes": votes.astype(np.int32)}
