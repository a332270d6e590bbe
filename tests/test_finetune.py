"""`fastperc finetune` on tiny Stable Diffusion, SDXL, SD3 and Flux pipelines the tests build and save
(random weights, offline CLIP and T5 tokenizers) and a few captioned images. Fast: one fine-tune step,
the data, pipeline and option checks. Slow: several steps, exact resume, SIGTERM, validation grids, the
written pipeline loading and sampling, random crops, a saved `datasets` dataset, v-prediction, the
command line, two processes, LoRA, and each family end to end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastperc import InputError
from fastperc.recipes.config import FinetuneConfig
from fastperc.recipes.finetune import captioned_images, finetune, pipeline

from .helpers import log_rows
from .tiny_pipelines import CAPTIONS, save_tiny_sd, write_captioned_images

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("pipelines") / "sd")


@pytest.fixture(scope="session")
def captioned(tmp_path_factory) -> Path:
    return write_captioned_images(tmp_path_factory.mktemp("data") / "images")


def config(tiny_sd, captioned, out, **over) -> FinetuneConfig:
    base = dict(out=str(out), pretrained=str(tiny_sd), data=str(captioned), resolution=16, batch_size=2,
                max_steps=1, log_every=1, progress=False, validation_steps=2, warmup_steps=1)
    return FinetuneConfig(**{**base, **over})


def unet_weights(folder: Path, part: str = "unet") -> dict[str, torch.Tensor]:
    """The saved weights of a pipeline folder's denoiser (`part`: "unet" or "transformer")."""
    from safetensors.torch import load_file
    return load_file(str(next((folder / part).glob("*.safetensors"))))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from .tiny_pipelines import save_tiny_flux
    return save_tiny_flux(tmp_path_factory.mktemp("pipelines") / "flux")


# ---- fast ------------------------------------------------------------------------------------------

def test_one_fine_tune_step_learns_logs_checkpoints_and_writes_the_pipeline(tiny_sd, captioned, tmp_path):
    result = finetune(config(tiny_sd, captioned, tmp_path / "run"))
    assert result["finished"] and result["step"] == 1 and result["skipped_images"] == 0
    rows = log_rows(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 1 and losses[0] > 0 and torch.isfinite(torch.tensor(losses[0]))
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["config"]["layers"] == \
        ["mid_block"]  # the teacher's tap, kept with the run
    final = Path(result["pipeline"])
    assert (final / "model_index.json").is_file() and (final / "text_encoder").is_dir()
    before, after = unet_weights(tiny_sd), unet_weights(final)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_a_folder_that_is_not_a_pipeline_or_another_family_is_refused(tmp_path):
    with pytest.raises(InputError, match="pretrained: .* is not a diffusers pipeline folder"):
        pipeline.pipeline_family(tmp_path)
    with pytest.raises(InputError, match="pretrained: .* is not a folder"):
        pipeline.pipeline_family(tmp_path / "missing")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(InputError, match=r"holds a KandinskyPipeline; fastperc finetune supports "
                                         r"StableDiffusionPipeline \(Stable Diffusion 1.x / 2.x\), "
                                         r"StableDiffusionXLPipeline .*, FluxPipeline \(Flux\)"):
        pipeline.pipeline_family(tmp_path)


def test_images_without_captions_are_an_error_unless_unconditional(tmp_path):
    folder = write_captioned_images(tmp_path / "a", n=3)
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(InputError, match="data: .* has no metadata.jsonl .* or pass --unconditional"):
        captioned_images.load(folder)
    assert captioned_images.load(folder, unconditional=True).captions == ["", "", ""]
    folder = write_captioned_images(tmp_path / "b", n=3)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join(lines[:2]) + "\n")  # img_002 has no line
    with pytest.raises(InputError, match="data: 1 images in .* have no line in metadata.jsonl"):
        captioned_images.load(folder)
    (folder / "metadata.jsonl").write_text(lines[0] + "\n" + json.dumps({"file_name": "img_001.png", "text": " "}))
    with pytest.raises(InputError, match=r"data: .* line 2 \(img_001.png\) has no caption"):
        captioned_images.load(folder)


def test_an_unreadable_image_is_skipped_and_counted_or_an_error_with_strict(tmp_path):
    folder = write_captioned_images(tmp_path / "imgs", n=4)
    (folder / "img_002.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 image"):
        found = captioned_images.load(folder)
    assert len(found) == 3 and found.skipped == [str(folder / "img_002.png")]
    assert found.captions == [CAPTIONS[0], CAPTIONS[1], CAPTIONS[3]]
    with pytest.raises(InputError, match="data: .*img_002.png cannot be read .* drop --strict"):
        captioned_images.load(folder, strict=True)


def test_images_are_resized_on_their_shorter_side_cropped_and_mirrored(tmp_path):
    from PIL import Image
    pixels = torch.zeros(10, 20, 3, dtype=torch.uint8)
    pixels[:, :10] = 255  # left half white, right half black
    Image.fromarray(pixels.numpy()).save(tmp_path / "x.png")
    centre = captioned_images.prepared(tmp_path / "x.png", 8)
    assert centre.shape == (3, 8, 8) and centre.min() >= -1 and centre.max() <= 1
    assert centre[:, :, :3].mean() > 0.9 and centre[:, :, -3:].mean() < -0.9  # the centre: half and half
    mirrored = captioned_images.prepared(tmp_path / "x.png", 8, flip=True)
    assert torch.equal(mirrored, centre.flip(-1))
    left = captioned_images.prepared(tmp_path / "x.png", 8, crop=(0.0, 0.5))
    assert left.mean() > 0.9  # the left edge is all white


def test_a_resolution_the_vae_and_unet_cannot_take_is_refused(tiny_sd, captioned, tmp_path):
    with pytest.raises(InputError, match="resolution: this pipeline's VAE and UNet take sides that are multiples of "
                                         r"4, got 18 \(use 16 or 20\)"):
        finetune(config(tiny_sd, captioned, tmp_path / "run", resolution=18))


@pytest.mark.parametrize("density", ["logit_normal", "mode"])
def test_the_student_t_is_drawn_as_diffusers_scripts_draw_it(density):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from fastperc import NoiseSchedule
    from fastperc.recipes.objective import TimestepStrata
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = NoiseSchedule.from_diffusers(sched)
    cfg = FinetuneConfig(out="o", pretrained="p", data="d", t_density=density)
    ours = TimestepStrata.of(cfg, flow, 8, torch.device("cpu"), cfg.t_distribution()).draw(
        20000, torch.Generator().manual_seed(0))
    u = compute_density_for_timestep_sampling(density, 20000, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(1))
    theirs = sched.timesteps[(u * 1000).long()]  # train_dreambooth_sd3.py's indexing
    assert torch.isin(ours, sched.timesteps).all()
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # the same distribution: quantiles agree within sampling error
        assert abs(ours.quantile(q).item() - theirs.quantile(q).item()) < 15, q


def test_each_family_draws_t_with_its_diffusers_scripts_default_and_t_loc_moves_it():
    from fastperc import NoiseSchedule
    from fastperc.recipes.finetune.families import FAMILIES
    from fastperc.recipes.objective import TimestepStrata
    assert {k: f.t_density for k, f in FAMILIES.items()} == {
        "StableDiffusionPipeline": "uniform", "StableDiffusionXLPipeline": "uniform",
        "StableDiffusion3Pipeline": "logit_normal", "FluxPipeline": "uniform"}
    cfg = FinetuneConfig(out="o", pretrained="p", data="d")
    assert cfg.t_distribution("uniform") is None and cfg.t_distribution("logit_normal").density == "logit_normal"
    flow = NoiseSchedule.flow_matching(shift=3.0)
    draw = lambda c: TimestepStrata.of(c, flow, 8, torch.device("cpu"), c.t_distribution("logit_normal")).draw(  # noqa: E731
        4000, torch.Generator().manual_seed(0))
    rank = lambda t: torch.searchsorted(flow.timesteps_by_noise(), t).float() / 1000  # noqa: E731  noise rank
    assert rank(draw(FinetuneConfig(out="o", pretrained="p", data="d", t_loc=-1.5))).mean() < 0.3  # low noise
    with pytest.raises(InputError, match="objective_t_range: .*logit_normal density"):
        TimestepStrata.of(FinetuneConfig(out="o", pretrained="p", data="d", objective_t_range=(0, 400)), flow, 8,
                          torch.device("cpu"), cfg.t_distribution("logit_normal"))


@pytest.mark.parametrize("option, value, message", [
    ("t_density", "cosine", "t_density: expected one of"), ("t_scale", 0.0, "t_scale: expected a value > 0"),
    ("mode_scale", 3.0, "mode_scale: expected a number in"), ("flux_guidance", -1.0, "flux_guidance: expected a value >= 0")])
def test_bad_t_density_options_and_flux_guidance_are_refused(option, value, message):
    with pytest.raises(InputError, match=message):
        FinetuneConfig(out="o", pretrained="p", data="d", **{option: value}).validate()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharding_modes_of_accelerate_are_refused_with_a_clear_error(kind, monkeypatch, tiny_sd, captioned, tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fastperc.recipes.finetune import loop
    fake = SimpleNamespace(distributed_type=DistributedType[kind], num_processes=2, device=torch.device("cpu"))
    monkeypatch.setattr(loop, "_accelerator", lambda cfg: fake)
    with pytest.raises(InputError, match=f"accelerate: .* as DDP .*asks for {kind}, which it does not support"):
        finetune(config(tiny_sd, captioned, tmp_path / "run"))


def test_finetune_options_come_from_the_train_options_definitions():
    from dataclasses import fields

    from fastperc.recipes.config import TrainConfig
    train = {f.name: f.metadata for f in fields(TrainConfig)}
    shared = [f for f in fields(FinetuneConfig) if f.name in train]
    assert {f.name for f in shared} >= {"layers", "layer_weights", "feature_norm", "t_prime_range", "t_prime_density",
                                        "mse_weight", "sp_fraction", "lr", "lr_schedule", "ema_decay", "precision",
                                        "teacher_precision", "teacher_checkpoint", "grad_accum"}
    for f in shared:  # the same type, bounds and choices; only a default or help may differ
        for key in ("type", "bound", "choices", "resumable"):
            assert f.metadata[key] == train[f.name][key], (f.name, key)
    with pytest.raises(InputError, match="feature_norm: expected one of"):
        FinetuneConfig(out="o", pretrained="p", data="d", feature_norm="lpips").validate()


# ---- slow ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_resumed_fine_tune_repeats_the_uninterrupted_one(tiny_sd, captioned, tmp_path):
    straight = finetune(config(tiny_sd, captioned, tmp_path / "a", max_steps=4, save_every=2))
    assert straight["finished"]
    finetune(config(tiny_sd, captioned, tmp_path / "b", max_steps=2, save_every=2))
    resumed = finetune(config(tiny_sd, captioned, tmp_path / "b", max_steps=4, save_every=2, resume=True))
    assert resumed["steps_run"] == 2 and resumed["finished"]
    a, b = unet_weights(tmp_path / "a" / "final"), unet_weights(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [r["loss"] for r in log_rows(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    with pytest.raises(InputError, match="resume: .* other options .*lr"):
        finetune(config(tiny_sd, captioned, tmp_path / "b", max_steps=5, lr=1e-3, resume=True))
    with pytest.raises(InputError, match="out: .* holds a run"):
        finetune(config(tiny_sd, captioned, tmp_path / "b", max_steps=5))


@pytest.mark.slow
def test_validation_grids_every_n_steps_and_at_the_end_with_and_without_guidance(tiny_sd, captioned, tmp_path):
    from PIL import Image
    finetune(config(tiny_sd, captioned, tmp_path / "run", max_steps=4, validate_every=2, validation_cfg=3.0,
                    validation_prompt=("a red square", "a blue, small circle")))
    grids = sorted((tmp_path / "run" / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000002.png", "step_0000004.png"]
    assert Image.open(grids[0]).size == (2 * 16, 2 * 16)  # two guidance columns, two prompt rows
    events = [r for r in log_rows(tmp_path / "run") if r.get("event") == "validation"]
    assert [e["step"] for e in events] == [2, 4]


@pytest.mark.slow
def test_the_written_pipeline_loads_with_diffusers_and_samples(tiny_sd, captioned, tmp_path):
    from diffusers import DiffusionPipeline
    result = finetune(config(tiny_sd, captioned, tmp_path / "run", max_steps=2))
    pipe = DiffusionPipeline.from_pretrained(result["pipeline"], local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    image = pipe("a red square", height=16, width=16, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3) and 0 <= image.min() and image.max() <= 1
    source = DiffusionPipeline.from_pretrained(str(tiny_sd), local_files_only=True)
    for a, b in zip(source.text_encoder.parameters(), pipe.text_encoder.parameters()):
        assert torch.equal(a, b)  # only the UNet changed


@pytest.mark.slow
def test_the_mse_baseline_random_crops_with_an_fp8_teacher_and_unconditional_runs(tiny_sd, captioned, tmp_path):
    mse = finetune(config(tiny_sd, captioned, tmp_path / "mse", objective="mse", max_steps=2))
    crops = finetune(config(tiny_sd, captioned, tmp_path / "crops", max_steps=2, random_crop=True,
                            teacher_precision="fp8"))  # the UNet's attention Linear layers in FP8
    uncond = finetune(config(tiny_sd, captioned, tmp_path / "uncond", max_steps=2, unconditional=True,
                             teacher_precision="bf16"))
    assert mse["finished"] and crops["finished"] and uncond["finished"]
    held = torch.load(tmp_path / "crops" / "cache" / "encoded.pt", weights_only=True)
    assert held["latents"] is None and held["prompts"]["encoder_hidden_states"].shape[0] == 6  # per step: the crops


@pytest.mark.slow
def test_a_v_prediction_pipeline_trains_on_v(tmp_path, captioned):
    from fastperc.recipes.finetune.loop import build
    sd2 = save_tiny_sd(tmp_path / "sd2", prediction_type="v_prediction")
    job = build(config(sd2, captioned, tmp_path / "run"))
    assert job.schedule.prediction_type == "v_prediction"
    assert finetune(config(sd2, captioned, tmp_path / "run2"))["finished"]


@pytest.mark.slow
def test_a_saved_datasets_dataset_is_read_like_an_image_folder(tmp_path, captioned):
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    found = captioned_images.load(captioned)
    ds = datasets.Dataset.from_dict({"image": [Image.open(p) for p in found.images], "text": found.captions},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    loaded = captioned_images.load(tmp_path / "ds")
    assert loaded.captions == found.captions
    assert torch.equal(captioned_images.prepared(loaded.images[0], 16), captioned_images.prepared(found.images[0], 16))
    ds.remove_columns("text").save_to_disk(str(tmp_path / "nocap"))
    with pytest.raises(InputError, match="no `text` column"):
        captioned_images.load(tmp_path / "nocap")


@pytest.mark.slow
def test_the_command_stops_on_sigterm_with_a_checkpoint_and_resumes(tiny_sd, captioned, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fastperc.recipes.cli", "finetune", "--pretrained", str(tiny_sd), "--data",
            str(captioned), "--out", str(out), "--resolution", "16", "--batch-size", "2", "--max-steps", "100000",
            "--log-every", "1", "--no-progress", "--validation-steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "log.jsonl").exists() or \
            sum(1 for r in log_rows(out) if "loss" in r) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "continue with --resume" in err
    saved = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert saved >= 2
    r = subprocess.run(args[:args.index("100000")] + [str(saved + 1)] + args[args.index("100000") + 1:]
                       + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"done: {saved + 1} steps" in r.stdout and (out / "final" / "unet").is_dir()


@pytest.mark.slow
def test_the_command_gives_one_line_for_bad_input(tmp_path, captioned):
    r = subprocess.run([sys.executable, "-m", "fastperc.recipes.cli", "finetune", "--pretrained", str(tmp_path),
                        "--data", str(captioned), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("fastperc finetune: error: pretrained: ")


@pytest.mark.slow
def test_gradient_accumulation_sees_the_same_global_batch(tiny_sd, captioned, tmp_path):
    from safetensors.torch import load_file
    one = finetune(config(tiny_sd, captioned, tmp_path / "one", batch_size=4, max_steps=2, ema_decay=0.0))
    two = finetune(config(tiny_sd, captioned, tmp_path / "two", batch_size=4, grad_accum=2, max_steps=2,
                          ema_decay=0.0))
    assert one["finished"] and two["finished"]
    a, b = (load_file(str(tmp_path / run / "checkpoint" / "model.safetensors")) for run in ("one", "two"))
    changed = [k for k in a if not torch.equal(a[k], unet_weights(tiny_sd)[k])]
    assert changed  # it trained ...
    for k in a:  # ... and two micro-batches of 2 give the step of one batch of 4 (up to summation order)
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_the_final_pipeline_holds_the_ema_weights_or_without_ema_the_trained_ones(tiny_sd, captioned, tmp_path):
    from safetensors.torch import load_file
    finetune(config(tiny_sd, captioned, tmp_path / "ema", max_steps=3, ema_decay=0.5))
    finetune(config(tiny_sd, captioned, tmp_path / "raw", max_steps=3, ema_decay=0.0, gradient_checkpointing=True,
                    lr_schedule="cosine"))
    raw_state = load_file(str(tmp_path / "raw" / "checkpoint" / "model.safetensors"))
    raw_final = unet_weights(tmp_path / "raw" / "final")
    assert all(torch.equal(raw_final[k], raw_state[k]) for k in raw_state)
    ema_state = load_file(str(tmp_path / "ema" / "checkpoint" / "model.safetensors"))
    ema_final = unet_weights(tmp_path / "ema" / "final")
    assert any(not torch.equal(ema_final[k], ema_state[k]) for k in ema_state)  # the EMA, not the raw weights
    lrs = [r["lr"] for r in log_rows(tmp_path / "raw") if "lr" in r]
    assert lrs[-1] == 0.0 and lrs[0] > 0  # cosine to 0 at the last step


@pytest.mark.slow
def test_a_save_cut_between_its_renames_resumes_from_the_previous_checkpoint(tiny_sd, captioned, tmp_path):
    out = tmp_path / "run"
    finetune(config(tiny_sd, captioned, out, max_steps=2, save_every=2))
    (out / "checkpoint").rename(out / "checkpoint.prev")  # what a kill after moving the last one aside leaves
    (out / "checkpoint.tmp").mkdir()                      # ... with the new one half written
    result = finetune(config(tiny_sd, captioned, out, max_steps=3, save_every=2, resume=True))
    assert result["steps_run"] == 1 and result["finished"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not (out / "checkpoint.prev").exists() and not (out / "checkpoint.tmp").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "flux-lora"])
def test_two_processes_train_together_as_one_with_the_same_global_batch(family, tiny_sd, tiny_flux, captioned,
                                                                        tmp_path):
    from safetensors.torch import load_file
    folder, extra = (tiny_sd, []) if family == "sd" else (tiny_flux, ["--lora-rank", "4"])
    args = ["-m", "fastperc.recipes.cli", "finetune", "--pretrained", str(folder), "--data", str(captioned),
            "--resolution", "16", "--batch-size", "4", "--max-steps", "2", "--no-progress", "--validation-steps", "2",
            "--ema-decay", "0", "--log-every", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29563", *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    start = lambda run: next(r for r in log_rows(run) if r.get("event") == "start")  # noqa: E731
    assert start(tmp_path / "two")["processes"] == 2 and start(tmp_path / "one")["processes"] == 1
    a, b = (load_file(str(tmp_path / run / "checkpoint" / "model.safetensors")) for run in ("one", "two"))
    if extra:  # LoRA: its B matrices start at zero and only they (and A) train
        assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)
    else:
        base = unet_weights(tiny_sd)
        assert any(not torch.equal(a[k], base[k]) for k in a)
    for k in a:  # each process took half of each global batch; the all-reduced step is the one-process step
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    losses = lambda run: [r["loss"] for r in log_rows(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)


@pytest.mark.slow
def test_a_lora_fine_tune_trains_only_the_lora_weights_against_the_base_model_and_saves_them_for_diffusers(
        tiny_sd, captioned, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from fastperc.recipes.finetune.loop import build
    job = build(config(tiny_sd, captioned, tmp_path / "probe", lora_rank=4))
    assert job.teacher.adapters_off and job.teacher.model is job.accelerator.unwrap_model(job.denoiser)
    assert job.teacher.held_bytes == 0 and len(job.trained) == sum(p.requires_grad for p in job.denoiser.parameters())
    result = finetune(config(tiny_sd, captioned, tmp_path / "run", lora_rank=4, max_steps=3, lr=1e-3))
    state = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    base = unet_weights(tiny_sd)
    for name, value in state.items():  # the base weights never move; LoRA keys are the only new ones
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    final = Path(result["pipeline"])
    assert (final / "pytorch_lora_weights.safetensors").is_file() and not (final / "unet").exists()
    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd), local_files_only=True)
    sample = lambda: pipe("a red square", height=16, width=16, num_inference_steps=2, output_type="np",  # noqa: E731
                          generator=torch.Generator().manual_seed(0)).images[0]
    before = sample()
    pipe.load_lora_weights(str(final))
    assert not (sample() == before).all()
    with pytest.raises(InputError, match="lora_rank: .*--teacher-precision"):
        finetune(config(tiny_sd, captioned, tmp_path / "bad", lora_rank=4, teacher_precision="bf16"))


@pytest.mark.slow
def test_sdxl_fine_tunes_with_its_two_encoders_and_size_conditioning_and_the_result_loads(captioned, tmp_path):
    from diffusers import DiffusionPipeline

    from fastperc.recipes.finetune.loop import build
    from .tiny_pipelines import save_tiny_sdxl
    sdxl = save_tiny_sdxl(tmp_path / "sdxl")
    job = build(config(sdxl, captioned, tmp_path / "probe"))
    assert job.family.sizes and set(job.encoded.prompts) == {"encoder_hidden_states", "text_embeds"}
    # the images are 20 wide, 24 high: resized to 16 x 19, the centre crop starts 2 rows down; mirrored alike
    assert job.encoded.time_ids[0].tolist() == [[24, 20, 2, 0, 16, 16], [24, 20, 2, 0, 16, 16]]
    assert job.encoded.prompts["encoder_hidden_states"].shape[-1] == 64  # both encoders' states, concatenated
    finetune(config(sdxl, captioned, tmp_path / "run", max_steps=2))
    result = finetune(config(sdxl, captioned, tmp_path / "run", max_steps=3, resume=True))  # extends the run
    assert result["steps_run"] == 1 and (tmp_path / "run" / "validation" / "step_0000003.png").is_file()
    pipe = DiffusionPipeline.from_pretrained(result["pipeline"], local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    image = pipe("a red square", height=16, width=16, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (16, 16, 3)
    lora_run = finetune(config(sdxl, captioned, tmp_path / "lora", max_steps=2, lora_rank=4, random_crop=True))
    base = DiffusionPipeline.from_pretrained(str(sdxl), local_files_only=True)
    base.load_lora_weights(lora_run["pipeline"])
    assert base("a red square", height=16, width=16, num_inference_steps=2, output_type="np").images[0].shape == \
        (16, 16, 3)


def _sample(pipe, **options):
    return pipe("a red square", height=16, width=16, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **options).images[0]


@pytest.mark.slow
def test_sd3_fine_tunes_its_transformer_on_flow_matching_with_three_encoders_and_the_result_loads(captioned,
                                                                                                   tmp_path):
    from diffusers import DiffusionPipeline

    from fastperc.recipes.finetune.loop import build
    from .tiny_pipelines import save_tiny_sd3
    sd3 = save_tiny_sd3(tmp_path / "sd3")
    job = build(config(sd3, captioned, tmp_path / "probe"))
    assert job.family.denoiser == "transformer" and job.teacher.layers == ("transformer_blocks.1",)
    assert set(job.encoded.prompts) == {"encoder_hidden_states", "pooled_projections"}
    # two CLIP encoders' 77 tokens then T5's 256, each 64 wide; both pooled outputs (32 + 32)
    assert job.encoded.prompts["encoder_hidden_states"].shape[1:] == (77 + 256, 64)
    assert job.encoded.prompts["pooled_projections"].shape[1:] == (64,)
    assert job.strata.density.density == "logit_normal" and job.schedule.prediction_type == "flow_prediction"
    with pytest.raises(InputError, match="objective_t_range: .*logit_normal"):  # refused before any encoding
        build(config(sd3, captioned, tmp_path / "band", objective_t_range=(0, 300)))
    assert not (tmp_path / "band" / "cache").exists()
    with pytest.raises(InputError, match="resolution: this pipeline's transformer takes sides up to 32"):
        build(config(sd3, captioned, tmp_path / "big", resolution=36))
    straight = finetune(config(sd3, captioned, tmp_path / "a", max_steps=3, save_every=1))
    finetune(config(sd3, captioned, tmp_path / "b", max_steps=2, save_every=1))
    resumed = finetune(config(sd3, captioned, tmp_path / "b", max_steps=3, save_every=1, resume=True,
                              validation_cfg=2.0))
    assert straight["finished"] and resumed["steps_run"] == 1
    a, b = (unet_weights(tmp_path / run / "final", "transformer") for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the uninterrupted one
    base = unet_weights(sd3, "transformer")
    assert any(not torch.equal(a[k], base[k]) for k in a)
    pipe = DiffusionPipeline.from_pretrained(resumed["pipeline"], local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and _sample(pipe).shape == (16, 16, 3)
    from PIL import Image
    grid = Image.open(tmp_path / "b" / "validation" / "step_0000003.png")
    assert grid.size == (2 * 16, 2 * 16)  # no guidance and CFG 2, for the two distinct captions
    lora_run = finetune(config(sd3, captioned, tmp_path / "lora", max_steps=2, lora_rank=4, lr=1e-2))
    base_pipe = DiffusionPipeline.from_pretrained(str(sd3), local_files_only=True)
    before = _sample(base_pipe)
    base_pipe.load_lora_weights(lora_run["pipeline"])
    assert not (before == _sample(base_pipe)).all()
    # every adapted projection loads back: the image stream's and, in the joint blocks, the text stream's
    loaded = {n.rsplit(".lora_B", 1)[0].split(".")[-1] for n, _ in base_pipe.transformer.named_modules()
              if ".lora_B" in n}
    assert loaded == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}


@pytest.mark.slow
def test_flux_fine_tunes_on_packed_latents_with_ids_and_guidance_resumes_and_its_lora_teacher_is_the_base(
        tiny_flux, captioned, tmp_path):
    from diffusers import DiffusionPipeline

    from fastperc import FrozenTeacher
    from fastperc.recipes.finetune.loop import build
    from .tiny_pipelines import save_tiny_flux
    job = build(config(tiny_flux, captioned, tmp_path / "probe"))
    assert job.family.packed and job.teacher.layers == ("transformer_blocks.1",)  # mid-depth of 2 + 2 blocks
    assert job.strata.density is None  # uniform t, as diffusers' Flux scripts draw it
    latents = torch.randn(2, 4, 8, 8)
    tokens = job.family.model_input(job.pipe, latents)
    assert tokens.shape == (2, 16, 16)  # 2x2 patches of 4 channels as 16 tokens of 16
    assert torch.equal(tokens[0, 0], latents[0, :, :2, :2].reshape(-1))
    cond = {k: v[:2].float() for k, v in job.encoded.prompts.items()}
    kwargs = job.family.kwargs(job.pipe, cond, None, job.fixed, 3.5)
    assert kwargs["img_ids"].shape == (16, 3) and kwargs["txt_ids"].shape == (512, 3)
    assert kwargs["guidance"].tolist() == [3.5, 3.5]
    # the student's call is the pipeline's: Flux's forward takes sigma = t / 1000, as the teacher gives it
    assert job.model_timestep(torch.tensor([500.0])).item() == 0.5
    from fastperc.adapters.flux import FluxAdapter
    with pytest.MonkeyPatch.context() as mp:  # ... also when the adapter's probe fails (the hook path)
        mp.setattr(FluxAdapter, "probe", lambda self, model: ["a probe that fails"])
        with pytest.warns(RuntimeWarning, match="hook path"):
            hooked = build(config(tiny_flux, captioned, tmp_path / "hooked"))
        assert hooked.model_timestep(torch.tensor([500.0])).item() == 0.5
    # the guidance value reaches the student: another value, another loss on the same draws
    loss = lambda g: finetune(config(tiny_flux, captioned, tmp_path / f"g{g}", flux_guidance=g, ema_decay=0.0))["loss"]  # noqa: E731
    assert loss(1.0) != loss(3.5)
    straight = finetune(config(tiny_flux, captioned, tmp_path / "a", max_steps=3, save_every=1, flux_guidance=1.0))
    finetune(config(tiny_flux, captioned, tmp_path / "b", max_steps=2, save_every=1, flux_guidance=1.0))
    resumed = finetune(config(tiny_flux, captioned, tmp_path / "b", max_steps=3, save_every=1, resume=True,
                              flux_guidance=1.0, validation_cfg=2.0))
    a, b = (unet_weights(tmp_path / run / "final", "transformer") for run in ("a", "b"))
    assert straight["finished"] and all(torch.equal(a[k], b[k]) for k in a)
    pipe = DiffusionPipeline.from_pretrained(resumed["pipeline"], local_files_only=True)
    assert type(pipe).__name__ == "FluxPipeline" and _sample(pipe).shape == (16, 16, 3)
    # a Flux without the guidance embedding (FLUX.1-schnell's kind) gets no guidance value
    schnell = save_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    assert finetune(config(schnell, captioned, tmp_path / "schnell_run", max_steps=1))["finished"]

    lora_run = finetune(config(tiny_flux, captioned, tmp_path / "lora", max_steps=2, lora_rank=4, lr=1e-2))
    base_pipe = DiffusionPipeline.from_pretrained(str(tiny_flux), local_files_only=True)
    model = base_pipe.transformer
    base_teacher = FrozenTeacher(model)  # a frozen copy of the base weights, before the LoRA weights load
    base_pipe.load_lora_weights(lora_run["pipeline"])
    lora_teacher = FrozenTeacher(model, copy=False, adapters_off=True)
    sample, t = torch.randn(2, 16, 16), torch.tensor([700.0, 300.0])
    kwargs = job.family.kwargs(base_pipe, {k: v[:2].float() for k, v in job.encoded.prompts.items()}, None,
                               job.fixed, 3.5)
    with torch.no_grad():
        assert torch.equal(base_teacher(sample, t, **kwargs)[0], lora_teacher(sample, t, **kwargs)[0])
        with_lora = model(sample, timestep=t / 1000, **kwargs).sample
        model.disable_adapters()
        without = model(sample, timestep=t / 1000, **kwargs).sample
    assert not torch.allclose(with_lora, without)  # the adapters trained, and the teacher left them out
