"""benchmarks/quality_per_compute.py: each variant of the cheaper-forms study gets the step case that
times its training step, a variant no case times is a clear error, and the front keeps the points no
other beats on both cost and FD."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality_per_compute import case_of, cost_over_rounds, fd_cell, flop_blind, front  # noqa: E402

from fastperc.recipes.study import load_spec  # noqa: E402


def test_each_cheaper_form_maps_to_the_step_case_that_times_it():
    spec = load_spec(ROOT / "docs" / "studies" / "k_cheaper.toml", out="unused")
    cases = {name: case_of(name, {**spec.base, **opts}) for name, opts in spec.variants}
    assert cases == {"MSE continued": "mse", "SP 4 taps, channel RMS, t' in [0, 100]": "4tap",
                     "SP on a quarter of the batch": "4tap-quarter", "SP on half the batch": "4tap-half",
                     "SP 3 taps before the midblock": "3tap", "SP bf16 teacher": "4tap-bf16"}


SEARCHED = dict(objective="self_perceptual", layers=("conv_in", "down_blocks.0", "down_blocks.1", "mid_block"),
                feature_norm="channel_rms", t_prime_range=(0, 100))


def test_options_that_do_not_change_the_work_do_not_change_the_case():
    assert case_of("v", {**SEARCHED, "t_prime_range": (0, 50), "mse_weight": 0.2, "feature_norm": "none"}) == "4tap"
    assert case_of("v", {"objective": "mse", "lr": 1e-4, "guidance_scale": 1.5}) == "mse"


@pytest.mark.parametrize("options, message", [
    ({**SEARCHED, "layers": ("mid_block",)}, "no step case for layers \\['mid_block'\\]"),
    ({**SEARCHED, "sp_fraction": 0.3}, "no step case for sp_fraction 0.3"),
    ({**SEARCHED, "layers": SEARCHED["layers"][:3], "teacher_precision": "bf16"}, "teacher_precision 'bf16' and 3tap"),
    ({**SEARCHED, "teacher_precision": "fp8"}, "teacher_precision 'fp8'"),
])
def test_a_variant_no_step_case_times_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=f"variant 'v': .*{message}"):
        case_of("v", options)


def test_the_front_keeps_the_points_no_other_beats_on_both_cost_and_fd():
    points = [("mse", 1.0, 3.0), ("full", 1.3, 2.3), ("quarter", 1.1, 2.6), ("dominated", 1.2, 2.7),
              ("tie in cost, worse fd", 1.3, 2.4)]
    assert front(points) == {"mse", "full", "quarter"}


def test_the_cost_is_the_median_over_rounds_of_each_rounds_ratio_to_mse():
    rounds = [{"mse": 100.0, "4tap": 125.0, "3tap": 108.0},
              {"mse": 80.0, "4tap": 96.0, "3tap": 80.0},     # a faster round: its ratios count, not its times
              {"mse": 120.0, "4tap": 150.0, "3tap": 132.0}]
    costs = cost_over_rounds(rounds)
    assert costs["mse"] == (1.0, 1.0, 1.0)
    assert costs["4tap"] == pytest.approx((1.25, 1.2, 1.25))
    assert costs["3tap"] == pytest.approx((1.08, 1.0, 1.1))


@pytest.mark.parametrize("rounds", [[], [{"4tap": 1.0}], [{"mse": 0.0, "4tap": 1.0}]])
def test_rounds_without_an_mse_time_are_a_clear_error(rounds):
    with pytest.raises(ValueError, match="rounds: expected each round to cost 'mse' more than 0"):
        cost_over_rounds(rounds)


def test_a_flop_count_prices_every_case_but_a_bf16_teacher():
    from step_cases import OBJECTIVES
    blind = {case: flop_blind(case) for case in OBJECTIVES}
    assert "the bf16 teacher" in blind["4tap-bf16"] and "--cost time" in blind["4tap-bf16"]
    assert sorted(c for c, why in blind.items() if why is not None) == ["4tap-bf16", "fastperc-bf16"]


def test_a_row_of_one_training_seed_names_its_seed_instead_of_a_zero_spread():
    assert fd_cell({"fd": (2.0961, 0.0), "training_seeds": [1]}) == "2.096 (training seed 1 only)"
    assert fd_cell({"fd": (2.0391, 0.0562), "training_seeds": [1, 2, 3]}) == "2.039 ± 0.056"


def test_a_study_whose_every_row_is_left_out_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import json

    import quality_per_compute

    spec = tmp_path / "spec.toml"
    spec.write_text('[study]\nteacher = "unused"\n[study.base]\nobjective = "self_perceptual"\n'
                    'layers = ["mid_block"]\n[[variant]]\nname = "midblock only"\n')
    row = {"variant": "midblock only", "training_seed": 1, "sampling_seed": 0, "fd": 2.5, "precision": 0.6,
           "recall": 0.6, "n": 10}
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setattr(sys, "argv", ["quality_per_compute.py", str(spec), "--study", str(tmp_path), "--cost", "flops"])
    with pytest.raises(SystemExit):
        quality_per_compute.main()
    err = capsys.readouterr().err
    assert "--study: every row of" in err and "no step case for layers ['mid_block']" in err
