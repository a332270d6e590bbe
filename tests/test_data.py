"""Training data (`fastperc.recipes.data`): the embedded MNIST-5k, an .npz file and a folder of images
with one subfolder per class."""
from __future__ import annotations

import numpy as np
import torch

from fastperc.recipes import checkpoint
from fastperc.recipes.cli import main


def test_data_folder_with_class_subfolders_trains(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data", str(tmp_path / "imgs"), "--image-size", "16", "--conditional",
                 "--max-steps", "2", "--batch-size", "4", "--channels-per-level", "8,16", "--no-progress"]) == 0
    assert checkpoint.load(out)["model_config"]["num_classes"] == 2


def test_data_npz_is_read(tmp_path):
    from fastperc.recipes.data import load
    imgs = np.random.default_rng(0).integers(0, 255, (10, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(10) % 3)
    s = load(str(tmp_path / "d.npz"))
    assert s.images.shape == (10, 1, 32, 32) and s.num_classes == 3


def test_mnist5k_is_padded_scaled_and_split_deterministically():
    from fastperc.recipes.data import mnist5k, to_model_range
    d = mnist5k()
    assert d.images.shape == (5000, 1, 32, 32) and d.images.dtype == torch.uint8 and d.num_classes == 10
    x = to_model_range(d.images)
    assert x.min() == -1 and x.max() == 1
    a_train, a_held = d.split(500, seed=3)
    b_train, b_held = d.split(500, seed=3)
    assert len(a_train) == 4500 and torch.equal(a_held.images, b_held.images)


def test_missing_data_path_exits_2_with_message(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path), "--data", str(tmp_path / "nope"), "--max-steps", "1"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_mnist5k_gives_each_caller_its_own_tensors():
    """The parsed file is kept for the process; a caller that writes into its images changes no one else's."""
    from fastperc.recipes.data import mnist5k
    a = mnist5k()
    before = a.images.clone()
    a.images.zero_()
    a.labels.zero_()
    b = mnist5k()
    assert torch.equal(b.images, before) and b.labels.max() == 9
