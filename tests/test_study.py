"""`fastperc study`: a tiny study end to end (train, sample, evaluate, table, plots, grids), resuming
without redoing work, and clear errors for bad specs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastperc.recipes.cli import main
from fastperc.recipes.study import BASELINE, aggregate, load_spec, samples_name, slug, verdict
from fastperc.recipes.study import table as study_table
from fastperc.recipes.train import TrainConfig, train

SPEC = """
[study]
teacher = "{teacher}"
steps = 2
training_seeds = [1, 2]
sampling_seeds = [0]
samples = 20
sample_steps = 2
classifier_epochs = 1
base = {{ lr = 1e-4, batch_size = 8, conditional = true }}

[[variant]]
name = "sp mid"
objective = "self_perceptual"

[[variant]]
name = "sp mid, lr 3e-4, rms, low t'"
objective = "self_perceptual"
lr = 3e-4
feature_norm = "channel_rms"
t_prime_range = [0, 300]

[[variant]]
name = "MSE continued + CFG 2"
objective = "mse"
guidance_scale = 2.0
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train(TrainConfig(out=str(out), conditional=True, block_channels=(8, 16), batch_size=8, max_steps=2, save_every=2,
                      log_every=1, progress=False))
    return out


@pytest.mark.slow
def test_tiny_study_writes_table_plots_grids_and_resumes(teacher, tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(teacher=teacher))
    out = tmp_path / "study"
    assert main(["study", str(spec), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    names = {BASELINE, "sp mid", "sp mid, lr 3e-4, rms, low t'", "MSE continued + CFG 2"}
    assert len(rows) == 4 * 2  # (baseline + 3 variants) x 2 training seeds x 1 sampling seed
    assert {r["variant"] for r in rows} == names
    table = _table_rows((out / "table.md").read_text())
    assert set(table) == names
    assert table[BASELINE]["vs MSE"] == "baseline" and table["sp mid"]["vs MSE"] == "2 seeds: no verdict"
    # the guided row samples the baseline's own run with guidance: no second training, other images
    assert not (out / "runs" / slug("MSE continued + CFG 2")).exists() and (out / "runs" / slug(BASELINE)).exists()
    import numpy as np
    plain, guided = (np.load(out / "runs" / "MSE_continued" / "seed1" / f"{samples_name(0, g)}.npz")["images"]
                     for g in (1.0, 2.0))
    assert plain.shape == guided.shape and not np.array_equal(plain, guided)
    assert "feature_norm=channel_rms" in table["sp mid, lr 3e-4, rms, low t'"]["options"]
    text = (out / "table.md").read_text()
    assert " DDIM steps" in text  # the teacher's schedule names the sampler
    balance = _table_rows(text[text.index("Class balance"):], key="samples of")
    assert set(balance) == names | {"held-out digits"}
    for row in balance.values():  # shares of each class, summing to one
        assert abs(sum(float(row[str(c)]) for c in range(10)) - 1) < 0.01
    assert (out / "fd_by_variant.png").exists() and (out / "fd_vs_lr.png").exists() and (out / "grids.png").exists()
    run_log = out / "runs" / "sp_mid" / "seed1" / "log.jsonl"
    before = run_log.read_text()
    capsys.readouterr()
    assert main(["study", str(spec), "--out", str(out), "--no-progress"]) == 0  # everything found on disk
    assert "FD-MNIST" not in capsys.readouterr().out.replace("table", "")
    assert len((out / "results.jsonl").read_text().splitlines()) == 8 and run_log.read_text() == before


@pytest.mark.parametrize("body, message", [
    ("[study]\nsteps = 2\n", "has no \\[study\\] teacher"),
    ('[study]\nteacher = "x"\n[[variant]]\nname = "a"\nlearning_rate = 1\n', "unknown training options \\['learning_rate'\\]"),
    ('[study]\nteacher = "x"\n[[variant]]\nobjective = "mse"\n', "variant 0: expected a name"),
    ('[study]\nteacher = "x"\nsteps = 0\n', "steps: expected a positive integer"),
    ('[study]\nteacher = "x"\nwhat = 1\n', "study: unknown keys \\['what'\\]"),
    ('[study]\nteacher = "x"\n[[variant]]\nname = "a"\noptimizer = "lion"\n', "optimizer: expected one of \\['adamw', 'sgd'\\]"),
    ("[study\n", "not valid TOML"),
    ('[study]\nteacher = "x"\n[[variant]]\nname = "a"\nguidance_scale = 0\n', "guidance_scale: expected a number > 0, got 0"),
    ('[study]\nteacher = "x"\n[[variant]]\nname = "a"\nguidance_scale = "high"\n', "guidance_scale: expected a number > 0"),
    ('[study]\nteacher = "x"\nbase = { conditional = false }\n[[variant]]\nname = "a"\nguidance_scale = 1.5\n',
     "guidance_scale: classifier-free guidance needs conditional = true, got conditional = False"),
])
def test_bad_specs_are_clear_errors(tmp_path, body, message):
    spec = tmp_path / "bad.toml"
    spec.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_spec(spec)


def test_variants_with_equal_training_options_share_one_run_and_differ_in_samples(tmp_path):
    spec = load_spec(_write(tmp_path, '[study]\nteacher = "x"\nbase = { conditional = true }\n'
                                      '[[variant]]\nname = "mse + cfg 1.5"\nguidance_scale = 1.5\n'
                                      '[[variant]]\nname = "sp"\nobjective = "self_perceptual"\n'
                                      '[[variant]]\nname = "sp + cfg 3"\nobjective = "self_perceptual"\nguidance_scale = 3\n'))
    dirs = spec.run_dirs()
    assert [n for n, _ in spec.variants][0] == BASELINE  # a guided MSE row is no baseline: one is added
    assert dirs["mse + cfg 1.5"] == dirs[BASELINE] and dirs["sp + cfg 3"] == dirs["sp"] != dirs[BASELINE]
    assert samples_name(0, 1.0) == "samples_seed0" and samples_name(2, 3) == "samples_seed2_cfg3"
    assert samples_name(0, 1.25) == "samples_seed0_cfg1.25" and samples_name(0, 2.0) == samples_name(0, 2)
    assert spec.effective(dict(spec.variants)["sp + cfg 3"])["guidance_scale"] == 3


def test_a_guided_row_listed_before_its_twin_still_trains_in_the_unguided_twins_folder(tmp_path):
    spec = load_spec(_write(tmp_path, '[study]\nteacher = "x"\nbase = { conditional = true }\n'
                                      '[[variant]]\nname = "sp + cfg 3"\nobjective = "self_perceptual"\nguidance_scale = 3\n'
                                      '[[variant]]\nname = "sp"\nobjective = "self_perceptual"\n'
                                      '[[variant]]\nname = "sp, guided only"\nobjective = "self_perceptual"\nlr = 1e-3\n'
                                      'guidance_scale = 2\n'))
    dirs = spec.run_dirs()
    assert dirs["sp + cfg 3"] == dirs["sp"] == tmp_path / "spec" / "runs" / "sp"
    assert dirs["sp, guided only"].name == slug("sp, guided only")  # no unguided twin: its own folder


def test_verdict_needs_a_margin_larger_than_the_seed_spread():
    base = {"fd": (3.0, 0.2, 0.0), "precision": (0.55, 0.01, 0.0), "training_seeds": [1, 2, 3]}
    row = lambda fd, sd, p: {"fd": (fd, sd, 0.0), "precision": (p, 0.01, 0.0), "training_seeds": [1, 2, 3]}  # noqa: E731
    assert verdict(row(2.5, 0.1, 0.56), base) == "beats"
    assert verdict(row(2.9, 0.1, 0.56), base) == "tie"       # inside the spread
    assert verdict(row(2.5, 0.1, 0.40), base) == "tie"       # lower FD bought with precision
    assert verdict(row(3.5, 0.1, 0.56), base) == "worse"
    assert verdict({**row(2.0, 0.1, 0.6), "training_seeds": [1]}, base) == "1 seed: no verdict"
    assert verdict({**row(2.0, 0.1, 0.6), "training_seeds": [1, 2]}, base) == "2 seeds: no verdict"


def test_aggregate_averages_sampling_seeds_then_spreads_over_training_seeds(tmp_path):
    spec = load_spec(_write(tmp_path, '[study]\nteacher = "x"\n'))
    results = [{"variant": BASELINE, "training_seed": s, "sampling_seed": ss, "fd": fd, "precision": 0.5, "n": 10,
                "train_seconds": 1.0} for s, ss, fd in [(1, 0, 2.0), (1, 1, 4.0), (2, 0, 4.0), (2, 1, 6.0)]]
    spec.training_seeds, spec.sampling_seeds = [1, 2], [0, 1]
    (row,) = aggregate(spec, results)
    mean, sd, sampling_spread = row["fd"]
    assert mean == 4.0 and abs(sd - 2 ** 0.5) < 1e-12 and sampling_spread == 1.0  # seeds: 3.0 and 5.0


def _table_rows(markdown: str, key: str = "variant") -> dict[str, dict[str, str]]:
    """The first table's cells by its `key` column and column header."""
    block = []
    for ln in markdown.splitlines():
        if ln.startswith("|"):
            block.append(ln)
        elif block:
            break
    head = [c.strip() for c in block[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in block[1:] if ln.startswith("| ")]
    return {r[key]: r for r in rows}


def test_the_table_gives_each_variant_its_options_seeds_metrics_and_verdict(tmp_path):
    spec = load_spec(_write(tmp_path, '[study]\nteacher = "x"\n[[variant]]\nname = "sp"\n'
                                      'objective = "self_perceptual"\nlr = 3e-4\n'))
    spec.training_seeds = [1, 2, 3]
    results = [{"variant": v, "training_seed": s, "sampling_seed": 0, "fd": fd + s / 10, "precision": 0.6, "n": 10,
                "train_seconds": 2.0} for v, fd in [(BASELINE, 3.0), ("sp", 2.0)] for s in (1, 2, 3)]
    table = _table_rows(study_table(spec, aggregate(spec, results)))
    assert set(table) == {BASELINE, "sp"}
    assert table[BASELINE]["vs MSE"] == "baseline" and table["sp"]["vs MSE"] == "beats"
    assert table["sp"]["options"] == "objective=self_perceptual, lr=0.0003" and table["sp"]["seeds"] == "3 x 1"
    assert table["sp"]["FD-MNIST ↓"] == "2.200 ± 0.100" and table[BASELINE]["FD-MNIST ↓"] == "3.200 ± 0.100"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


def test_every_committed_spec_loads_and_the_confirmation_reuses_the_screens_runs():
    studies = Path(__file__).resolve().parents[1] / "docs" / "studies"
    specs = {p.stem: load_spec(p, out="runs/x") for p in sorted(studies.glob("*.toml"))}
    assert len(specs) >= 18 and all(s.variants for s in specs.values())
    # batch M's confirmation trains only runs of the screen (same folders), so its seed-1 runs are found on disk
    for screen_name, confirm_name in (("m_guidance", "m_confirm"), ("m_guidance_teacher", "m_teacher_confirm")):
        screen, confirm = specs[screen_name].run_dirs(), specs[confirm_name].run_dirs()
        assert set(confirm.values()) <= set(screen.values()), set(confirm.values()) - set(screen.values())
        assert specs[confirm_name].teacher == specs[screen_name].teacher
        # ... and the guided rows sample their unguided twins' runs
        assert confirm["MSE continued + CFG 1.5"] == confirm["MSE continued"]
        assert confirm["MSE continued, lr 1e-4, + CFG 2"] == confirm["MSE continued, lr 1e-4"]
