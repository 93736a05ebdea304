"""Tiny Stable Diffusion models (diffusers UNet + transformers CLIP, random init, fixed seeds) and the peer
oracles the SD tests compare against: diffusers `load_lora_weights` + `fuse_lora`, PEFT-made LoRAs,
diffusers' own PEFT→kohya converter and LDM checkpoint converter."""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from loraport.names.sd import (CLIP_TEXT_MODEL_PARTS, TEXT_ENCODERS, layout_from_diffusers, openclip_to_hf,
                               unet_name_maps)
from loraport.safetensors_io import save_file

warnings.filterwarnings("ignore")
for _n in ("diffusers", "transformers", "peft"):
    logging.getLogger(_n).setLevel(logging.ERROR)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv_in", "linear_1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def tiny_unet(xl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    if xl:  # SDXL shape: 3 levels, no attention in level 0, linear proj, text_time embedding, 2 layers per block
        return UNet2DConditionModel(
            block_out_channels=(16, 32, 32), layers_per_block=2, sample_size=8, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=(2, 4, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=4 * 6 + 32,
            transformer_layers_per_block=(1, 1, 2))
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)


def tiny_te(hidden: int = 32, proj: bool = False, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 2 + 3, num_attention_heads=4,
                         num_hidden_layers=2, vocab_size=99, projection_dim=hidden, max_position_embeddings=16)
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg)


def tiny_pipeline(xl: bool = False):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(3)
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    if xl:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_te(32), text_encoder_2=tiny_te(32, True, seed=4),
                                         tokenizer=None, tokenizer_2=None, unet=tiny_unet(True),
                                         scheduler=DDIMScheduler())
    return StableDiffusionPipeline(vae=vae, text_encoder=tiny_te(32), tokenizer=None, unet=tiny_unet(False),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_pipeline(folder: Path, xl: bool = False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if xl:
        return StableDiffusionXLPipeline.from_pretrained(folder, tokenizer=None, tokenizer_2=None)
    return StableDiffusionPipeline.from_pretrained(folder, tokenizer=None, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)


def components(pipe) -> dict[str, torch.nn.Module]:
    out = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = pipe.text_encoder_2
    return out


def flat_state(pipe) -> dict[str, torch.Tensor]:
    """{component.name: tensor} of the LoRA-relevant components (diffusers-folder naming)."""
    return {f"{c}.{k}": v.detach().clone() for c, m in components(pipe).items() for k, v in m.state_dict().items()}


def peft_lora(pipe, r: int = 4, alpha: float = 8, seed: int = 5, te: bool = True, rank_pattern=None,
              alpha_pattern=None, use_dora: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Inject a random (non-zero) PEFT LoRA into the pipeline's UNet and text encoders; returns the PEFT state
    dicts and the LoraConfigs per component (the pipeline modules keep the LoRA layers)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    sds, cfgs = {}, {}
    for comp, mod in components(pipe).items():
        if comp != "unet" and not te:
            continue
        tm = UNET_TARGETS if comp == "unet" else TE_TARGETS
        cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=tm, use_dora=use_dora,
                         rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
        m = inject_adapter_in_model(cfg, mod)
        with torch.no_grad():  # PEFT's init leaves B at zero-ish scale for convs; make every factor matter
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.2)
        setattr(pipe, comp, m)
        sds[comp] = get_peft_model_state_dict(m)
        cfgs[comp] = cfg
    return sds, cfgs


def to_kohya_with_diffusers(sds: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers' own PEFT → kohya converter (writes alpha = r)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    flat = {f"{c}.{k}": v for c, sd in sds.items() for k, v in sd.items()}
    return {k: v.contiguous() for k, v in convert_state_dict_to_kohya(flat).items()}


def oracle_fused(folder: Path, lora_file: Path, xl: bool = False, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """diffusers: load the base folder, load_lora_weights + fuse_lora, return the fused weights."""
    pipe = load_pipeline(folder, xl)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return flat_state(pipe)


# ------------------------------------------------------------------------------------------------ single file
def to_single_file(flat: dict[str, torch.Tensor], xl: bool, family: str | None = None) -> dict[str, torch.Tensor]:
    """Original-checkpoint naming of a diffusers-folder state (built with loraport.names.sd; the tests check
    this table against diffusers' own LDM converter separately)."""
    unet = {k[5:]: v for k, v in flat.items() if k.startswith("unet.")}
    to_ldm, _ = unet_name_maps(layout_from_diffusers(unet))
    out = {"model.diffusion_model." + to_ldm(k): v for k, v in unet.items()}
    fam = family or ("sdxl" if xl else "sd1")  # "sd2": OpenCLIP text encoder under cond_stage_model.model.
    for comp, single, layout, _, f in TEXT_ENCODERS:
        if f != fam:
            continue
        te = {k[len(comp) + 1:]: v for k, v in flat.items() if k.startswith(comp + ".")}
        if layout == "hf":
            out.update({single + k: v for k, v in te.items()})
            continue
        out.update(openclip_from_hf(te, single))
    return out


def openclip_from_hf(te: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model → OpenCLIP names (fused in_proj), by inverting OPENCLIP_PARTS on the HF names."""
    te = {("text_model." + k if k.split(".")[0] in CLIP_TEXT_MODEL_PARTS else k): v for k, v in te.items()}
    n_layers = 1 + max(int(k.split(".")[3]) for k in te if k.startswith("text_model.encoder.layers."))
    oc_names = ["text_projection", "token_embedding.weight", "ln_final.weight", "ln_final.bias"]
    for i in range(n_layers):
        b = f"transformer.resblocks.{i}."
        oc_names += [b + "attn.in_proj_weight", b + "attn.in_proj_bias"]
        oc_names += [b + p + s for p in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
                     for s in (".weight", ".bias")]
    out = {}
    for oc in oc_names:
        parts = openclip_to_hf(oc)
        if any(h not in te for h, _, _ in parts):
            continue
        if len(parts) == 3:
            out[prefix + oc] = torch.cat([te[h] for h, _, _ in parts], 0)
        else:
            h, _, tr = parts[0]
            out[prefix + oc] = te[h].t().contiguous() if tr else te[h]
    return out


def save_single(flat: dict[str, torch.Tensor], path: Path, xl: bool) -> dict[str, torch.Tensor]:
    sf = to_single_file(flat, xl)
    save_file({k: v.contiguous() for k, v in sf.items()}, path)
    return sf


def apply_adapter(adapter, base) -> dict[str, torch.Tensor]:
    """Merge by hand (resolve + apply_ on each base tensor), for reader tests independent of the engine."""
    out: dict[str, torch.Tensor] = {}
    for d in adapter.deltas:
        W = out.get(d.target)
        if W is None:
            W = base.get(d.target).float().clone()
        r = d.resolve(tuple(base.info(d.target).shape))
        r.apply_(W, 1.0, base=base.get(d.target).float())
        out[d.target] = W
    return out


def wrapped_module_errors(net, merged: dict[str, torch.Tensor], target: dict[str, str]) -> dict[str, float]:
    """For each module a LyCORIS network wraps (`net.loras`): the relative max error of the merged weight's
    output (`merged[target[lora_name]]` applied as the original layer: conv or linear, with the merged bias when
    `merged` has it: a full diff's `diff_b`) against the wrapped module's own forward, on random inputs."""
    import torch.nn.functional as F

    errs = {}
    for lo in net.loras:
        org = lo.org_module[0]
        W = merged[target[lo.lora_name]]
        bias = merged.get(target[lo.lora_name].removesuffix(".weight") + ".bias", getattr(org, "bias", None))
        if isinstance(org, (torch.nn.Conv2d, torch.nn.Conv3d)):
            conv = F.conv2d if isinstance(org, torch.nn.Conv2d) else F.conv3d
            x = torch.randn(1, org.in_channels, *[4] * (W.dim() - 2))
            got = conv(x, W, bias, org.stride, org.padding)
        else:
            x = torch.randn(2, org.in_features)
            got = F.linear(x, W, bias)
        with torch.no_grad():
            y = lo(x)
        errs[lo.lora_name] = ((got - y).abs().max() / y.abs().max()).item()
    return errs


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> float:
    keys = keys if keys is not None else a.keys()
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in keys), default=0.0)


# ------------------------------------------------------------------------------------------------ shared bases
@functools.cache
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="loraport-sd-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.cache
def sd_base(xl: bool = False) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(diffusers folder, original single file, flat base state) of the tiny pipeline, built once per process."""
    d = workdir() / ("sdxl" if xl else "sd1")
    d.mkdir()
    pipe = tiny_pipeline(xl)
    pipe.save_pretrained(d / "base", safe_serialization=True)
    base = flat_state(pipe)
    save_single(base, d / "single.safetensors", xl)
    return d / "base", d / "single.safetensors", base


def pipeline_on_base(xl: bool = False):
    """A fresh pipeline holding the shared base weights (for PEFT to inject a LoRA into)."""
    return load_pipeline(sd_base(xl)[0], xl)


def run_cli(*args):
    """`loraport ...` in-process (click's CliRunner): (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from loraport.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    return r.exit_code, r.stdout, r.stderr
