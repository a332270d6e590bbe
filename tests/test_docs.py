"""The README's first example and every docstring example run as written."""
import doctest
import importlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["fastperc.schedule.base", "fastperc.schedule.variance_preserving", "fastperc.schedule.flow_matching",
           "fastperc.schedule.timestep_distribution", "fastperc.adapters.base", "fastperc.adapters.registry",
           "fastperc.teacher", "fastperc.teacher_fp8", "fastperc.loss", "fastperc.ops.feature_mse",
           "fastperc.ops.renoise", "fastperc.models.unet", "fastperc.models.dit", "fastperc.recipes.latent"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_readme_python_block_runs(index):
    """Each block is complete: it runs as written, in a fresh namespace, and computes a finite loss."""
    namespace = {}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["loss"].item() > 0


def test_readme_has_the_drop_in_blocks():
    assert len(BLOCKS) >= 3 and "added_cond_kwargs" in BLOCKS[2] and "autocast" in BLOCKS[1]


def test_readme_links_nothing_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text and "shared/" not in text


def test_the_bad_inputs_table_in_docs_is_current():
    """docs/BAD_INPUTS.md holds exactly what docs/bad_inputs.py prints today."""
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "bad_inputs.py")], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = (ROOT / "docs" / "BAD_INPUTS.md").read_text()
    assert r.stdout.strip() in doc, "regenerate with `PYTHONPATH=. python docs/bad_inputs.py`"
