"""The main job (`fastperc demo`): which stages it trains with which options, how it stops on a signal,
the spread over training seeds; end to end, the quick preset with the UNet and with a DiT on flow."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fastperc.recipes import checkpoint, demo
from fastperc.recipes.demo import PRESETS, SP_BEST, SP_BEST_UNCOND


def _record_stages(monkeypatch, stop_at: str | None = None) -> dict:
    """Replace the demo's training with a recorder; the stage named `stop_at` reports a SIGTERM."""
    stages = {}

    def fake_train(cfg):
        name = Path(cfg.out).name
        stages[name] = cfg
        signum = 15 if name == stop_at else 0
        return {"interrupted": signum, "step": 1, "steps_run": 1, "loss": 0.5, "finished": not signum}

    monkeypatch.setattr(demo, "train", fake_train)
    return stages


def test_the_fine_tunes_start_from_the_mse_stage_at_the_fine_tune_lr(tmp_path, monkeypatch):
    stages = _record_stages(monkeypatch, stop_at="uncond_sp")
    assert demo.run(str(tmp_path), "quick", progress=False) == {"interrupted": 15}
    assert list(stages) == ["mse", "sp", "sp_paper", "mse_cont", "uncond_mse", "uncond_sp"]
    quick = PRESETS["quick"]
    assert stages["mse"].objective == "mse" and stages["mse"].max_steps == quick.mse_steps
    assert stages["uncond_mse"].max_steps == quick.uncond_mse_steps and not stages["uncond_mse"].conditional
    for name in ("sp", "sp_paper", "mse_cont", "uncond_sp"):
        cfg, first = stages[name], stages["uncond_mse" if name.startswith("uncond") else "mse"]
        assert cfg.lr == quick.finetune_lr and cfg.max_steps == quick.finetune_steps, name
        assert cfg.init == first.out and cfg.seed == first.seed + 1, name
    for name, best in (("sp", SP_BEST), ("uncond_sp", SP_BEST_UNCOND)):  # the search's best, the raw stage-1 model as teacher
        cfg = stages[name]
        assert cfg.objective == "self_perceptual" and cfg.teacher == stages[name.replace("sp", "mse")].out
        assert {k: getattr(cfg, k) for k in best} == best, name
    # the unconditional model's taps stop before the midblock (batch L); the conditional model keeps it
    assert tuple(stages["uncond_sp"].layers) == ("conv_in", "down_blocks.0", "down_blocks.1")
    assert tuple(stages["sp"].layers)[-1] == "mid_block"
    assert tuple(stages["sp_paper"].layers) == ("mid_block",) and stages["sp_paper"].t_prime_range is None
    assert stages["mse_cont"].objective == "mse"


def test_a_stage_interrupted_by_a_signal_stops_the_demo_with_that_signal(tmp_path, monkeypatch):
    stages = _record_stages(monkeypatch, stop_at="sp")
    result = demo.run(str(tmp_path), "quick", 0, progress=False, resume=False)
    assert result == {"interrupted": 15} and list(stages) == ["mse", "sp"]  # nothing after the interrupted stage


def test_the_dit_setup_taps_the_mid_depth_block_with_t_prime_logit_normal_and_uniform_for_the_paper(tmp_path, monkeypatch):
    p = demo.arch_setup(PRESETS["quick"], "dit", "flow")
    depth = p.model["dit_depth"]
    assert p.model["prediction_type"] == "flow_prediction" and p.model["schedule"] == "flow"
    assert p.sp_best["layers"] == p.sp_paper["layers"] == (f"blocks.{max(depth // 2 - 1, 0)}",)
    assert p.sp_best["t_prime_density"] == "logit_normal" and "t_prime_density" not in p.sp_paper
    assert p.sp_best_uncond == p.sp_best and p.best_uncond_name == p.best_name  # no unconditional DiT search yet
    unet = demo.arch_setup(PRESETS["default"], "unet", "flow")
    dit = demo.arch_setup(PRESETS["default"], "dit", "flow")  # the testbed's training: docs/RESULTS.md
    assert (dit.lr, dit.finetune_lr, dit.mse_steps) == (2 * unet.lr, 2 * unet.finetune_lr, 1150)
    assert dit.model["t_density"] == "logit_normal" and "t_density" not in unet.model
    with pytest.raises(ValueError, match="arch: expected 'unet' or 'dit', got 'vit'"):
        demo.arch_setup(PRESETS["quick"], "vit", "flow")


def test_presets_are_typed_and_refuse_a_misspelled_field():
    assert all(isinstance(p, demo.Preset) for p in PRESETS.values())
    assert PRESETS["full"].training_seeds == (0, 1, 2) and PRESETS["quick"].training_seeds == ()
    with pytest.raises(TypeError, match="mse_stepz"):
        replace(PRESETS["quick"], mse_stepz=3)


def test_the_rows_and_their_sources(tmp_path):
    rows = [k for k, _ in demo.rows_of(demo.arch_setup(PRESETS["quick"], "unet", "ddpm"))]
    assert rows == ["mse", "mse_cfg", "sp", "sp_paper", "uncond_mse", "uncond_sp"]  # paper rows: conditional only
    assert "uncond_sp_paper" in [k for k, _ in demo.rows_of(demo.arch_setup(PRESETS["long"], "unet", "ddpm"))]
    # the MSE rows sample the equal-step continuation, the CFG row with guidance
    assert demo._source_of("mse") == ("mse_cont", 1.0) and demo._source_of("uncond_mse") == ("uncond_mse_cont", 1.0)
    assert demo._source_of("mse_cfg") == ("mse_cont", demo.CFG_SCALE) and demo._source_of("sp") == ("sp", 1.0)


def test_training_seeds_are_summarised_as_mean_and_half_range(tmp_path, monkeypatch):
    keys = [k for k, _ in demo.rows_of(demo.arch_setup(PRESETS["full"], "unet", "ddpm"))]
    seen = []

    def fake_run_one(out, preset, p, seed, progress, resume):
        seen.append((Path(out).name, seed, bool(p.training_seeds)))
        fd = {0: 2.0, 1: 4.0, 2: 3.0}[seed]
        Path(out).mkdir(parents=True)
        return {"summary": {k: {"fd": (fd + i, 0.1), "precision": (0.5, 0.0), "seeds": 2, "n": [5, 5]}
                            for i, k in enumerate(keys)}}

    monkeypatch.setattr(demo, "_run_one", fake_run_one)
    result = demo.run(str(tmp_path), "full", progress=False)
    assert seen == [("seed0", 0, False), ("seed1", 1, False), ("seed2", 2, False)]
    for i, k in enumerate(keys):
        s = result["summary"][k]
        assert s["fd"] == pytest.approx((3.0 + i, 1.0)) and s["precision"] == pytest.approx((0.5, 0.0))
        assert s["seeds"] == 3
    assert (tmp_path / "report.md").exists()


# ---- end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_quick_preset_writes_samples_report_and_pictures(tmp_path):
    result = demo.run(str(tmp_path), "quick", progress=False)
    rows = [k for k, _ in demo.rows_of(demo.arch_setup(PRESETS["quick"], "unet", "ddpm"))]
    for name in rows:
        with np.load(tmp_path / f"samples_{name}.npz") as f:
            assert f["images"].shape == (20, 32, 32)
        assert (tmp_path / f"samples_{name}.png").exists()
    assert not (tmp_path / "samples_uncond_sp_paper.npz").exists()  # the quick preset's paper_rows: conditional
    assert set(result["seconds"]) >= {"mse", "sp", "sp_paper", "mse_cont", "uncond_mse", "uncond_sp", "classifier"}
    configs = {k: checkpoint.load(tmp_path / k)["config"] for k in ("sp", "sp_paper", "mse_cont", "uncond_sp")}
    assert {k: c["lr"] for k, c in configs.items()} == dict.fromkeys(configs, PRESETS["quick"].finetune_lr)
    assert (tmp_path / "report.md").exists() and (tmp_path / "summary.json").exists()
    for png in ("grids.png", "fd_vs_cfg.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert set(result["summary"]) == set(rows)
    assert all(np.isfinite(result["summary"][k]["fd"][0]) for k in rows)


@pytest.mark.slow
def test_demo_quick_runs_the_recipe_with_a_dit_on_flow_matching(tmp_path):
    result = demo.run(str(tmp_path / "demo"), "quick", progress=False, arch="dit", schedule="flow")
    assert checkpoint.load(tmp_path / "demo" / "sp")["model_config"]["schedule"]["kind"] == "flow_matching"
    assert {"mse", "sp", "sp_paper", "uncond_sp"} <= set(result["summary"])
    assert all(np.isfinite(result["summary"][k]["fd"][0]) for k in result["summary"])


@pytest.mark.slow
def test_full_preset_runs_every_training_seed_and_reports_their_spread(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.PRESETS, "full", replace(demo.PRESETS["quick"], training_seeds=(0, 1)))
    result = demo.run(str(tmp_path), "full", progress=False)
    assert (tmp_path / "seed0" / "report.md").exists() and (tmp_path / "seed1" / "report.md").exists()
    assert (tmp_path / "report.md").exists()
    assert result["summary"]["sp"]["seeds"] == 2 and set(result["per_seed"]) == {0, 1}
