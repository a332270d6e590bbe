"""Build a denoiser from a small, serialisable config (stored in checkpoints), and call it uniformly."""
from __future__ import annotations

import torch
from torch import nn

from ..models.dit import DiT
from ..models.unet import UNet
from . import checkpoint, latent
from ..errors import InputError

ARCHS = ("unet", "diffusers-unet2d", "dit")


def dit_patch_size(image_size: int, patch: int = 0) -> int:
    """`patch` when given (> 0); else patches of 4 pixels on 32x32 images (64 tokens), of 2 on smaller
    inputs such as 8x8 latents."""
    return patch if patch else 4 if image_size >= 32 else 2


def build_model(config: dict) -> nn.Module:
    """config: {"arch", "in_channels", "image_size", "block_channels", "num_classes"} (+ "dit": {"width",
    "depth", "patch" (optional)} for arch "dit")."""
    arch = config["arch"]
    if arch == "dit":
        dit = config.get("dit", {})
        return DiT(in_channels=config["in_channels"], image_size=config["image_size"],
                   patch_size=dit_patch_size(config["image_size"], dit.get("patch", 0)), hidden=dit.get("width", 128),
                   depth=dit.get("depth", 6), heads=4, num_classes=config.get("num_classes"))
    if arch == "unet":
        return UNet(in_channels=config["in_channels"], block_channels=tuple(config["block_channels"]),
                    num_classes=config.get("num_classes"))
    if arch == "diffusers-unet2d":
        from diffusers import UNet2DModel

        ch = tuple(config["block_channels"])
        down = tuple("AttnDownBlock2D" if i == len(ch) - 1 else "DownBlock2D" for i in range(len(ch)))
        up = tuple("AttnUpBlock2D" if i == 0 else "UpBlock2D" for i in range(len(ch)))
        ncls = config.get("num_classes")
        return UNet2DModel(sample_size=config["image_size"], in_channels=config["in_channels"],
                           out_channels=config["in_channels"], block_out_channels=ch, layers_per_block=1,
                           down_block_types=down, up_block_types=up, norm_num_groups=8,
                           num_class_embeds=None if ncls is None else ncls + 1)
    raise InputError(f"arch: expected one of {list(ARCHS)}, got {arch!r}")


SCHEDULE_KINDS = ("scaled_linear", "linear", "cosine", "flow_matching")


def schedule_config(prediction_type: str, shift: float = 1.0) -> dict:
    """The schedule a new model trains with, as stored in its checkpoint's model config: SD's
    scaled-linear betas rescaled to zero terminal SNR (the paper's), except for epsilon prediction,
    which cannot be converted where alpha = 0 and so trains on the plain SD 1.5 table; for
    "flow_prediction" diffusers' rectified-flow table (NoiseSchedule.flow_matching, with `shift`)."""
    if prediction_type == "flow_prediction":
        return {"kind": "flow_matching", "num_train_timesteps": 1000, "shift": float(shift),
                "prediction_type": prediction_type}
    return {"kind": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "rescale_zero_terminal_snr": prediction_type != "epsilon", "prediction_type": prediction_type}


def schedule_of(config: dict):
    """The noise schedule a model was trained with, rebuilt from its model config (`schedule`: the
    NoiseSchedule constructor's name and arguments, e.g. {"kind": "flow_matching",
    "num_train_timesteps": 1000, "shift": 3.0, "prediction_type": "flow_prediction"}); training,
    sampling and evaluation all read it from here. Checkpoints written before the schedule was stored
    hold only `prediction_type` and `zero_terminal_snr`, which described the same scaled-linear table."""
    from ..schedule import NoiseSchedule

    stored = config.get("schedule")
    if stored is None:
        prediction_type = config.get("prediction_type", "v_prediction")
        stored = schedule_config(prediction_type) | {
            "rescale_zero_terminal_snr": config.get("zero_terminal_snr", prediction_type != "epsilon")}
    kind = stored.get("kind")
    if kind not in SCHEDULE_KINDS:
        raise InputError(f"schedule: expected a kind in {list(SCHEDULE_KINDS)}, got {kind!r}")
    return getattr(NoiseSchedule, kind)(**{k: v for k, v in stored.items() if k != "kind"})


def model_options_of(config: dict) -> dict:
    """The training options that describe a stored model (TrainConfig's `model` options), read back
    from its model config: what `--init` sets."""
    kind = (config.get("schedule") or {}).get("kind", "scaled_linear")
    dit = config.get("dit", {})
    return {"arch": config.get("arch", "unet"), "conditional": config.get("num_classes") is not None, "block_channels": tuple(config["block_channels"]),
            "prediction_type": config["prediction_type"], "schedule": "flow" if kind == "flow_matching" else "ddpm",
            "dit_width": dit.get("width", 128), "dit_depth": dit.get("depth", 6), "dit_patch": dit.get("patch", 0)}


def null_class(config: dict) -> int | None:
    """The label meaning "no class" (classifier-free guidance), or None for unconditional models."""
    return config.get("num_classes")


def predict(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """model(x, t, class_labels) as a tensor, for fastperc and diffusers models alike."""
    out = model(x, t, class_labels=labels) if labels is not None else model(x, t)
    return out.sample if hasattr(out, "sample") else out


def model_config_of(cfg, num_classes: int | None) -> dict:
    """The serialisable description of the model a TrainConfig trains (stored in its checkpoints)."""
    model_config = {"arch": cfg.arch, "in_channels": cfg.channels, "image_size": cfg.image_size,
                    "block_channels": list(cfg.block_channels),
                    "num_classes": num_classes if cfg.conditional else None,
                    "prediction_type": cfg.prediction_type, "schedule": schedule_config(cfg.prediction_type)}
    if cfg.arch == "dit":
        model_config["dit"] = {"width": cfg.dit_width, "depth": cfg.dit_depth} | (
            {"patch": cfg.dit_patch} if cfg.dit_patch else {})  # absent: the size's default (older checkpoints)
    if cfg.latent:
        # The autoencoder travels inside the model config: samples decode with exactly these weights.
        ae = latent.load_autoencoder(cfg.latent)
        channels, size, _ = ae.latent_shape(cfg.image_size)
        if ae.config["in_channels"] != cfg.channels:
            raise InputError(f"latent: {cfg.latent} encodes {ae.config['in_channels']}-channel images, the data "
                             f"has {cfg.channels} (--channels)")
        model_config |= {"in_channels": channels, "image_size": size,
                         "autoencoder": {"autoencoder": ae.state_dict(), "config": ae.config}}
    return model_config


def load_model(path: str, use_ema: bool = False) -> tuple[nn.Module, dict]:
    """The model (or its EMA) stored in a checkpoint, and its model config."""
    ckpt = checkpoint.load(path)
    model = build_model(ckpt["model_config"])
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as e:  # torch's size-mismatch report: the weights are not this model's
        raise InputError(f"checkpoint: the weights in {path} do not fit the model its config describes "
                         f"({str(e).strip().splitlines()[0]})") from e
    return model, ckpt["model_config"]
