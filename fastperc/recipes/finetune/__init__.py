"""`fastperc finetune`: fine-tune your own diffusers pipeline (Stable Diffusion 1.x / 2.x, XL, 3 / 3.5, Flux)
on captioned images with the self-perceptual objective, the pretrained denoiser's frozen copy (or, with
LoRA, the denoiser itself with its adapters off) as the teacher.

    families.py          what differs per family: the denoiser, captions to conditioning, SDXL's size
                         conditioning, Flux's packed latents, ids and guidance
    pipeline.py          the pipeline folder: family, loading, encoding images, writing the result
    captioned_images.py  the images and captions (imagefolder + metadata.jsonl, or a saved dataset)
    latent_cache.py      latents and caption states encoded once under OUT/cache
    validation.py        PNG grids of validation prompts, with and without guidance
    lora.py              --lora-rank: peft adapters, the EMA of their weights, diffusers' LoRA file
    loop.py              the accelerate loop: steps, checkpoints, resume, logs, the final pipeline
"""
from .loop import finetune

__all__ = ["finetune"]
