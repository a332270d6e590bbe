"""Tiny diffusers pipelines and captioned image folders, built and saved by the tests (random weights; the
CLIP tokenizer written from a byte-level vocabulary and the T5 tokenizer from a `tokenizers` Unigram model
of single characters, since no hub is reachable)."""
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


def t5_tokenizer(folder: Path):
    """A T5 tokenizer (Unigram, SentencePiece-style word starts) over single characters: every text
    tokenizes, ending in </s>."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.printable if c.strip()] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def tiny_t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None):
    """An AutoencoderKL that halves each side into `latent_channels` (every tiny pipeline uses one; SD3's
    and Flux's VAEs also shift their latents)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=16,
                         shift_factor=shift_factor, scaling_factor=1.5)


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


def _clip_config(tokenizer, hidden_size: int = 32) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)


def save_tiny_sd3(folder: Path) -> Path:
    """A Stable Diffusion 3 pipeline (two CLIP encoders with projections and a T5 encoder; an
    SD3Transformer2DModel of 4 joint blocks, patch 2; flow matching with shift 3), small enough for a CPU
    test, saved with save_pretrained. Image sides: multiples of 4, up to 32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-source")
    t5_tok = t5_tokenizer(folder.parent / f"{folder.name}-t5-source")
    clip = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**_clip_config(tokenizer)))  # noqa: E731
    # the two CLIP encoders' states (32 + 32) are joined along channels and padded to T5's width (64)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=8)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(shift_factor=0.06), text_encoder=clip(), tokenizer=tokenizer,
                                    text_encoder_2=clip(), tokenizer_2=tokenizer,
                                    text_encoder_3=tiny_t5(t5_tok, 64), tokenizer_3=t5_tok)
    pipe.save_pretrained(str(folder))
    return folder


def save_tiny_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """A Flux pipeline (CLIP for the pooled projection, T5 for the token states; a FluxTransformer2DModel
    of 2 joint and 2 single blocks on packed latents, with a guidance embedding like FLUX.1-dev's; the
    scheduler's dynamic shifting as Flux's), small enough for a CPU test, saved with save_pretrained. Image
    sides: multiples of 4."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-source")
    t5_tok = t5_tokenizer(folder.parent / f"{folder.name}-t5-source")
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(shift_factor=0.1),
                        text_encoder=CLIPTextModel(CLIPTextConfig(**_clip_config(tokenizer))), tokenizer=tokenizer,
                        text_encoder_2=tiny_t5(t5_tok, 32), tokenizer_2=t5_tok)
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
