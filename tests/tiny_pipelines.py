"""Tiny diffusers pipelines and captioned image folders, built and saved by the tests (random weights; the
CLIP tokenizer written from a byte-level vocabulary, since no hub is reachable)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CAPTIONS = ["a red square", "a blue circle, small", "a green triangle", "two yellow stripes", "a black dot",
            "a white cross on grey"]


def _byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE (CLIP, GPT-2) maps bytes to."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_tokenizer(folder: Path):
    """A CLIP tokenizer over single bytes (no merges): every text tokenizes, one token per character."""
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return CLIPTokenizer.from_pretrained(str(folder))


def tiny_vae():
    """An AutoencoderKL that halves each side into 4 latent channels (both tiny pipelines use it)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=16)


def save_tiny_sd(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A Stable Diffusion pipeline (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP text
    encoder, DDIM scheduler) small enough for a CPU test, saved with save_pretrained. The VAE halves,
    the UNet has two levels: image sides must be multiples of 4 (16 px -> 8x8 latents)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-source")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                                projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = tiny_vae()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def save_tiny_sdxl(folder: Path) -> Path:
    """A Stable Diffusion XL pipeline (two CLIP text encoders, the second with a projection; a UNet with
    SDXL's text_time added conditioning), small enough for a CPU test, saved with save_pretrained. Image
    sides: multiples of 4."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-source")
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0,
                  eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    vae = tiny_vae()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                                use_linear_projection=True)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(folder))
    return folder


def write_captioned_images(folder: Path, n: int = 6, size: tuple[int, int] = (20, 24), seed: int = 0,
                           captions: list[str] | None = None) -> Path:
    """`n` small RGB PNGs (a coloured rectangle on noise) with metadata.jsonl (file_name, text)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = captions or CAPTIONS
    lines = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        pixels[4:12, 5:15] = rng.integers(0, 256, 3, dtype=np.uint8)
        name = f"img_{i:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": captions[i % len(captions)]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
