"""Sample-quality metrics on a feature network trained here (no Inception weights can be downloaded):

- a small CNN classifier for the embedded dataset (`fastperc train-classifier`);
- FD-MNIST: the Frechet distance between Gaussian fits of its penultimate features for generated and
  held-out real images (the FID recipe on another network; not comparable to FID numbers);
- classifier score: exp(E_x KL(p(y|x) || p(y))), the Inception-Score recipe on this classifier;
- precision / recall: the k-NN manifold estimate of Kynkaanniemi et al. 2019 (realism / diversity);
- label accuracy: how often the classifier agrees with the class a conditional sample was drawn for;
- class balance: the share of samples the classifier puts in each class, and its total-variation
  distance to the same shares of the held-out real images ("class TV": 0 the same balance, 1 disjoint
  classes); for unconditional models the one number that says whether some digits are over-drawn.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from . import checkpoint, data
from ..errors import InputError


class Classifier(nn.Module):
    """Conv net for 1-channel 32x32 digits; `features` gives the 128-d penultimate embedding."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(4 * w, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to max_shift pixels (the only augmentation digits need)."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(out: str, *, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     split_seed: int = 0, held_out: int = 500, progress: bool = True) -> dict:
    """Train on the MNIST-5k train split; report held-out accuracy; save `out`/classifier.pt."""
    torch.manual_seed(seed)
    full = data.mnist5k()
    train_set, test_set = full.split(held_out, split_seed)
    x, y = data.to_model_range(train_set.images), train_set.labels
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            print(f"classifier epoch {epoch + 1}/{epochs}: held-out accuracy {accuracy(model, test_set):.4f}")
    acc = accuracy(model, test_set)
    path = checkpoint.save({"classifier": model.state_dict(), "held_out_accuracy": acc, "split_seed": split_seed,
                            "held_out": held_out, "seconds": round(time.time() - t0, 1)},
                           Path(out) / "classifier.pt")
    return {"accuracy": acc, "checkpoint": str(path)}


@torch.no_grad()
def accuracy(model: Classifier, images: data.ImageSet) -> float:
    model.eval()
    logits = torch.cat([model(data.to_model_range(b)) for b in images.images.split(500)])
    return float((logits.argmax(1) == images.labels).float().mean())


def load_classifier(path: str) -> Classifier:
    p = Path(path)
    state = checkpoint.load(p / "classifier.pt" if p.is_dir() else p)
    if "classifier" not in state:
        raise InputError(f"classifier: {path} is not a classifier checkpoint (make one with "
                         "`fastperc train-classifier`)")
    model = Classifier()
    model.load_state_dict(state["classifier"])
    return model.eval()


@torch.no_grad()
def embed(model: Classifier, images_uint8: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features float64 (N, 128), class probabilities (N, 10)) of uint8 (N, 1, H, W) images."""
    model.eval()
    feats, probs = [], []
    for b in images_uint8.split(batch):
        f = model.features(data.to_model_range(b))
        feats.append(f.double())
        probs.append(F.softmax(model.head(f), dim=1).double())
    return torch.cat(feats), torch.cat(probs)


def class_shares(probs: torch.Tensor) -> torch.Tensor:
    """(classes,) float64: the share of images whose most probable class is each class."""
    return torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double() / len(probs)


def class_tv(shares: torch.Tensor, reference_shares: torch.Tensor) -> float:
    """Total-variation distance between two class histograms: half the summed absolute difference
    (0: the same balance; 1: no class in common)."""
    return float((shares - reference_shares).abs().sum() / 2)


@dataclass(frozen=True)
class Reference:
    """The held-out real images as the metrics compare with them: their features, the share of them
    the classifier puts in each class (the data's class balance, measured with the same classifier) and
    their ink (mean intensity)."""
    features: torch.Tensor
    shares: torch.Tensor
    ink: float


def ink(images_uint8: torch.Tensor) -> float:
    """Mean intensity in [0, 1]: how much stroke the images carry (bolder or more strokes, more ink)."""
    return float(images_uint8.float().mean() / 255)


def reference_of(classifier: "Classifier", images_uint8: torch.Tensor) -> Reference:
    features, probs = embed(classifier, images_uint8)
    return Reference(features, class_shares(probs), ink(images_uint8))


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with scipy's matrix square root."""
    with warnings.catch_warnings():  # near-singular products (few samples) are handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: nudge both diagonals, as the FID recipe does
        eps = 1e-6 * np.eye(s1.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def gaussian(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def classifier_score(probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))): high when samples are confidently classified and classes are balanced."""
    p_y = probs.mean(0, keepdim=True)
    kl = (probs * (probs.clamp_min(1e-12).log() - p_y.clamp_min(1e-12).log())).sum(1)
    return float(kl.mean().exp())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019: precision = share of fakes inside the real k-NN manifold; recall the reverse."""
    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    def inside(points, ref, ref_radii):
        return (torch.cdist(points, ref) <= ref_radii[None]).any(1).double().mean()

    return float(inside(fake, real, radii(real))), float(inside(real, fake, radii(fake)))


def reference_set(split_seed: int = 0, held_out: int = 500) -> data.ImageSet:
    """The held-out real images that no demo model trained on."""
    return data.mnist5k().split(held_out, split_seed)[1]


def load_samples(path: str) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 (N, 1, 32, 32) images and labels from a `fastperc sample` .npz, with clear errors."""
    s = data.from_npz(Path(path))
    if s.images.shape[1:] != (1, 32, 32):
        raise InputError(f"samples: {path}: expected 1-channel 32x32 images, got {tuple(s.images.shape[1:])}")
    labels = s.labels.numpy() if s.labels is not None else np.full(len(s), -1)
    return s.images, labels


def evaluate(images_uint8: torch.Tensor, labels: np.ndarray, classifier: Classifier,
             reference: data.ImageSet | Reference | torch.Tensor, k: int = 3) -> dict:
    """FD-MNIST, classifier score, precision, recall, class balance (`class_shares`, `class_tv`), ink
    against the real images' (`ink_ratio`) and label accuracy of one sample set vs `reference`: real
    images, or a `reference_of` them to skip recomputing it (or their features alone from `embed`,
    which leaves out the class balance and the ink)."""
    if isinstance(reference, data.ImageSet):
        reference = reference_of(classifier, reference.images)
    rf = reference.features if isinstance(reference, Reference) else reference
    ff, probs = embed(classifier, images_uint8)
    out = {"n": len(images_uint8), "fd": frechet_distance(*gaussian(ff), *gaussian(rf)),
           "classifier_score": classifier_score(probs)}
    if isinstance(reference, Reference):
        shares = class_shares(probs)
        out["class_shares"] = [round(float(x), 4) for x in shares]
        out["class_tv"] = class_tv(shares, reference.shares)
        out["ink_ratio"] = ink(images_uint8) / reference.ink
    out["precision"], out["recall"] = precision_recall(rf.float(), ff.float(), k)
    if (labels >= 0).all():
        out["label_accuracy"] = float((probs.argmax(1).numpy() == labels).mean())
    return out
