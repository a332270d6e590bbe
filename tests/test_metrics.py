"""Metrics: closed-form checks, the feature classifier, and `fastperc eval` with its bad inputs."""
import numpy as np
import pytest
import torch

from fastperc.recipes import checkpoint, metrics
from fastperc.recipes.cli import main
from fastperc.recipes.data import mnist5k


def test_frechet_distance_matches_closed_form_for_commuting_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    f = torch.randn(2000, 16, dtype=torch.float64)
    g = metrics.gaussian(f)
    assert abs(metrics.frechet_distance(*g, *g)) < 1e-6
    shifted = [metrics.frechet_distance(*g, *metrics.gaussian(f + s)) for s in (0.1, 0.5, 1.0)]
    assert shifted == sorted(shifted) and shifted[0] > 0
    assert shifted[2] == pytest.approx(16 * 1.0, rel=1e-6)  # a pure mean shift of 1 in 16 dims


def test_precision_and_recall_of_identical_sets_are_one():
    x = torch.randn(300, 8)
    assert metrics.precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_drops_for_far_away_fakes_and_recall_for_collapsed_fakes():
    real = torch.randn(400, 4)
    p, _ = metrics.precision_recall(real, real + 50)
    _, r = metrics.precision_recall(real, real[:1].repeat(400, 1) + 1e-3 * torch.randn(400, 4))
    assert p == 0.0 and r < 0.1


def test_classifier_score_is_number_of_classes_for_confident_balanced_and_one_for_collapse():
    eye = torch.eye(10, dtype=torch.float64).repeat(20, 1)
    assert metrics.classifier_score(eye) == pytest.approx(10.0, rel=1e-6)
    assert metrics.classifier_score(torch.eye(10, dtype=torch.float64)[[3] * 50]) == pytest.approx(1.0)


def test_class_balance_is_the_predicted_class_histogram_and_its_total_variation_to_the_data():
    probs = torch.eye(10, dtype=torch.float64)[[0, 0, 1, 3]] * 0.9 + 0.01
    assert metrics.class_shares(probs).tolist() == [0.5, 0.25, 0, 0.25, 0, 0, 0, 0, 0, 0]
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    assert metrics.class_tv(uniform, uniform) == 0.0
    assert metrics.class_tv(metrics.class_shares(probs), uniform) == pytest.approx(0.7)  # 0.4 + 0.15 + 0.15
    one, other = torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    one[2], other[7] = 1.0, 1.0
    assert metrics.class_tv(one, other) == 1.0  # no class in common


def test_evaluate_reports_class_balance_against_the_reference_images():
    clf = metrics.Classifier()
    torch.manual_seed(0)
    real = mnist5k().images[:200]
    ref = metrics.reference_of(clf, real)
    same = metrics.evaluate(real, np.full(200, -1), clf, ref)
    assert same["class_tv"] == 0.0 and sum(same["class_shares"]) == pytest.approx(1.0)
    assert same["ink_ratio"] == pytest.approx(1.0)
    bold = (real.float() * 1.5).clamp(max=255).to(torch.uint8)  # bolder strokes carry more ink
    ratio = metrics.evaluate(bold, np.full(200, -1), clf, ref)["ink_ratio"]
    assert ratio == pytest.approx(metrics.ink(bold) / metrics.ink(real)) and ratio > 1.1
    _, probs = metrics.embed(clf, real)
    top = int(probs.argmax(1).mode().values)
    skewed = real[probs.argmax(1) == top]  # only the images of the most predicted class
    out = metrics.evaluate(skewed, np.full(len(skewed), -1), clf, ref)
    assert out["class_tv"] == pytest.approx(1 - float(ref.shares[top]))
    assert "class_tv" not in metrics.evaluate(real, np.full(200, -1), clf, ref.features)  # features alone


@pytest.fixture(scope="module")
def random_classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    torch.manual_seed(0)
    checkpoint.save({"classifier": metrics.Classifier().state_dict()}, path)
    return path


def test_eval_cli_prints_metrics_for_each_file(random_classifier, tmp_path, capsys):
    real = mnist5k().images[:64, 0].numpy()
    np.savez(tmp_path / "a.npz", images=real, labels=np.arange(64) % 10)
    np.savez(tmp_path / "b.npz", images=np.random.default_rng(0).integers(0, 255, (64, 32, 32), dtype=np.uint8))
    assert main(["eval", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--classifier", str(random_classifier)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(str(tmp_path))]
    assert len(rows) == 2
    fd_real, fd_noise = float(rows[0].split()[2]), float(rows[1].split()[2])
    assert fd_real < fd_noise  # even a random network tells digits from uniform noise
    assert 0 <= float(rows[0].split()[6]) <= 1  # class TV


@pytest.mark.parametrize("make, message", [
    (lambda: {"images": np.zeros((4, 32, 32), dtype=np.float32)}, "expected 'images' uint8"),
    (lambda: {"images": np.zeros((0, 32, 32), dtype=np.uint8)}, "with N > 0"),
    (lambda: {"images": np.zeros((4, 28, 28), dtype=np.uint8)}, "expected 1-channel 32x32"),
    (lambda: {"pixels": np.zeros((4, 32, 32), dtype=np.uint8)}, "expected an 'images' array"),
])
def test_eval_rejects_bad_npz(make, message, random_classifier, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", **make())
    assert main(["eval", str(tmp_path / "bad.npz"), "--classifier", str(random_classifier)]) == 2
    assert message in capsys.readouterr().err


def test_eval_rejects_a_non_classifier_checkpoint(tmp_path, capsys):
    checkpoint.save({"model": {}}, tmp_path / "m.pt")
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 32, 32), dtype=np.uint8))
    assert main(["eval", str(tmp_path / "a.npz"), "--classifier", str(tmp_path / "m.pt")]) == 2
    assert "not a classifier checkpoint" in capsys.readouterr().err


def test_one_epoch_of_the_classifier_is_far_above_chance_and_saved_with_its_accuracy(one_epoch_classifier):
    result = one_epoch_classifier
    assert result["accuracy"] >= 0.5  # chance is 0.1
    assert checkpoint.load(result["checkpoint"])["held_out_accuracy"] == result["accuracy"]


@pytest.mark.slow
def test_trained_classifier_reaches_98_percent_on_held_out(tmp_path):
    result = metrics.train_classifier(str(tmp_path), progress=False)
    assert result["accuracy"] >= 0.98
    assert checkpoint.load(result["checkpoint"])["held_out_accuracy"] == result["accuracy"]
