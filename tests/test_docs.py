"""The README's first example and every docstring example run as written."""
import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["fastperc.schedule", "fastperc.teacher", "fastperc.loss", "fastperc.ops.feature_mse",
           "fastperc.ops.renoise", "fastperc.models.unet"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


def test_readme_training_step_example_runs():
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["loss"].item() > 0
