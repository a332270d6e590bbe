"""What the frozen teacher costs in memory, for real models, before renting GPUs.

SD 1.5, SDXL, SD3-medium and Flux-dev are built from their published configurations (written below:
no hub is reachable) on the meta device, so nothing is allocated. Per tap choice the table gives the
teacher's bytes held as a full copy and as a pruned copy (`FrozenTeacher`, which holds only what runs
up to the deepest tap), per rank if sharded N ways, the teacher's activations per branch at a batch and
resolution (from a meta-device trace: the tensors autograd saves on the fake branch, parameters left
out; the real branch runs without autograd and keeps only its taps), next to what the student takes
(fp32 weights, gradients and AdamW's two states: 16 bytes per parameter).

    python benchmarks/teacher_memory.py                 # the four models, the table in markdown
    python benchmarks/teacher_memory.py --batch 4       # activations at another batch
    python benchmarks/teacher_memory.py --models sd15   # one model

Attention on the meta device runs PyTorch's math attention, which saves the N x N attention weights;
flash / memory-efficient attention on a GPU saves O(N) per head instead. The "flash" column leaves out
the saved tensors shaped like attention weights (..., N, N), i.e. what a GPU with flash attention keeps.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastperc import FrozenTeacher  # noqa: E402

GiB = 2**30
TEACHER_DTYPE = torch.bfloat16
STUDENT_BYTES_PER_PARAM = 16  # fp32 weights 4 + gradients 4 + AdamW exp_avg 4 + exp_avg_sq 4
SHARDS = (1, 2, 4, 8)

# Published diffusers configurations (the model repos' unet/config.json and transformer/config.json).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))


@dataclass
class Spec:
    name: str
    build: Callable[[], torch.nn.Module]
    taps: dict[str, tuple[str, ...] | None]   # "default" (the teacher's own choice) or "shallow" -> layers
    inputs: Callable[[int], tuple]             # batch -> (sample, timestep, kwargs) on the meta device
    resolution: str
    published_params: int                      # the model card's count, to check the configuration


def _meta(*shape, dtype=TEACHER_DTYPE):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _sd15_inputs(b):
    return _meta(b, 4, 64, 64), torch.zeros(b, dtype=torch.long, device="meta"), {
        "encoder_hidden_states": _meta(b, 77, 768)}


def _sdxl_inputs(b):
    return _meta(b, 4, 128, 128), torch.zeros(b, dtype=torch.long, device="meta"), {
        "encoder_hidden_states": _meta(b, 77, 2048),
        "added_cond_kwargs": {"text_embeds": _meta(b, 1280), "time_ids": _meta(b, 6)}}


def _sd3_inputs(b):
    return _meta(b, 16, 128, 128), _meta(b, dtype=torch.float32), {
        "encoder_hidden_states": _meta(b, 333, 4096), "pooled_projections": _meta(b, 2048)}


def _flux_inputs(b):
    return _meta(b, 4096, 64), _meta(b, dtype=torch.float32), {
        "encoder_hidden_states": _meta(b, 512, 4096), "pooled_projections": _meta(b, 768),
        "img_ids": _meta(4096, 3, dtype=torch.float32), "txt_ids": _meta(512, 3, dtype=torch.float32),
        "guidance": _meta(b, dtype=torch.float32)}


def specs() -> dict[str, Spec]:
    import diffusers
    return {
        "sd15": Spec("SD 1.5 UNet", lambda: diffusers.UNet2DConditionModel(**SD15_UNET),
                     {"default": None, "shallow": ("down_blocks.1",)}, _sd15_inputs,
                     "512x512 (latents 64x64)", 859_520_964),
        "sdxl": Spec("SDXL UNet", lambda: diffusers.UNet2DConditionModel(**SDXL_UNET),
                     {"default": None, "shallow": ("down_blocks.1",)}, _sdxl_inputs,
                     "1024x1024 (latents 128x128)", 2_567_463_684),
        "sd3": Spec("SD3-medium transformer", lambda: diffusers.SD3Transformer2DModel(**SD3_MEDIUM),
                    {"default": None, "shallow": ("transformer_blocks.5",)},
                    _sd3_inputs, "1024x1024 (latents 128x128)", 2_028_328_000),
        "flux": Spec("Flux-dev transformer", lambda: diffusers.FluxTransformer2DModel(**FLUX_DEV),
                     {"default": None, "shallow": ("transformer_blocks.9",)},
                     _flux_inputs, "1024x1024 (packed latents 4096x64)", 11_901_408_320),
    }


def build_meta(spec: Spec) -> torch.nn.Module:
    with torch.device("meta"):
        return spec.build()


def fake_branch_activations(teacher: FrozenTeacher, inputs) -> tuple[int, int]:
    """(bytes autograd saves on the fake branch, the same without attention-weight-shaped tensors), from a
    meta-device trace; parameters are left out (the teacher holds them anyway)."""
    sample, timestep, kwargs = inputs
    params = {id(p) for p in teacher.parameters()}
    seen: set[int] = set()
    total = attention = 0

    def pack(t):
        nonlocal total, attention
        if id(t) not in params and id(t) not in seen:
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            total += nbytes
            if t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 64:
                attention += nbytes
        return t

    sample = sample.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        teacher(sample, timestep, **kwargs)
    return total, total - attention


def rows(spec: Spec, batch: int) -> list[dict]:
    model = build_meta(spec)
    params = sum(p.numel() for p in model.parameters())
    out = []
    for label, layers in spec.taps.items():
        full = FrozenTeacher(model, layers, dtype=TEACHER_DTYPE, prune=False)
        pruned = FrozenTeacher(model, layers, dtype=TEACHER_DTYPE)
        fp8 = FrozenTeacher(model, layers, fp8=True)  # the blocks' Linear layers in FP8, the rest bf16
        act, act_flash = fake_branch_activations(pruned, spec.inputs(batch))
        out.append(dict(model=spec.name, tap=pruned.layers[0] + (" (default)" if layers is None else ""),
                        params=params, published=spec.published_params,
                        full=full.held_bytes, pruned=pruned.held_bytes, fp8=fp8.held_bytes,
                        share=pruned.held_parameters / params, act=act, act_flash=act_flash,
                        student=params * STUDENT_BYTES_PER_PARAM, resolution=spec.resolution))
    return out


def markdown(table: list[dict], batch: int) -> str:
    head = ("| model | tap | teacher full copy | pruned copy (share of parameters) | pruned, FP8 Linear | pruned per "
            "rank, sharded "
            + " / ".join(f"{n}" for n in SHARDS) + f" ways | fake-branch activations, batch {batch} (math / flash "
            "attention) | student: weights + grads + AdamW |")
    lines = [head, "|" + " --- |" * 8]
    for r in table:
        shards = " / ".join(f"{r['pruned'] / n / GiB:.2f}" for n in SHARDS)
        lines.append(f"| {r['model']} ({r['params'] / 1e9:.2f} B params) | {r['tap']} | {r['full'] / GiB:.2f} GiB | "
                     f"{r['pruned'] / GiB:.2f} GiB ({r['share']:.2f}) | {r['fp8'] / GiB:.2f} GiB | {shards} GiB | "
                     f"{r['act'] / GiB:.2f} / {r['act_flash'] / GiB:.2f} GiB at {r['resolution']} | "
                     f"{r['student'] / GiB:.1f} GiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="per-GPU batch for the activation column")
    parser.add_argument("--models", nargs="*", default=["sd15", "sdxl", "sd3", "flux"],
                        choices=["sd15", "sdxl", "sd3", "flux"])
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # its note on casting with to() concerns loading, not a meta build
    all_specs = specs()
    table = [r for name in args.models for r in rows(all_specs[name], args.batch)]
    for r in table:
        if r["params"] != r["published"]:
            print(f"warning: {r['model']} has {r['params']:,} parameters, its card says {r['published']:,}")
    print(f"Teacher in {str(TEACHER_DTYPE).removeprefix('torch.')}; bytes in GiB (2^30).\n")
    print(markdown(table, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
