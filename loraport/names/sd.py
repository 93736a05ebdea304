"""Stable Diffusion name tables: diffusers ⇄ original (LDM / SGM) checkpoint names, and the kohya module names
that LoRA files use for each base tensor.

Kohya names are built *forward* from the base's own keys, `(prefix + "." + module).replace(".", "_")`, and
looked up; an underscore name is never split back into a dotted path (module names contain "_").

The tables are data; the code under them only walks a base's names and applies them. Extend a table by
adding a line. Families: sd1 = SD 1.x (CLIP-L), sd2 = SD 2.x (OpenCLIP-H), sdxl = SDXL (CLIP-L + OpenCLIP-bigG).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------------------- UNet
# Top-level UNet modules: diffusers name → LDM/SGM name (under model.diffusion_model.)
UNET_TOP: tuple[tuple[str, str, str], ...] = (
    ("conv_in",                 "input_blocks.0.0",  "sd1 sd2 sdxl"),
    ("time_embedding.linear_1", "time_embed.0",      "sd1 sd2 sdxl"),
    ("time_embedding.linear_2", "time_embed.2",      "sd1 sd2 sdxl"),
    ("add_embedding.linear_1",  "label_emb.0.0",     "sdxl"),
    ("add_embedding.linear_2",  "label_emb.0.2",     "sdxl"),
    ("conv_norm_out",           "out.0",             "sd1 sd2 sdxl"),
    ("conv_out",                "out.2",             "sd1 sd2 sdxl"),
)

# Blocks: diffusers prefix → LDM prefix, for level i and layer j. A down level has n = layers_per_block
# layers then a downsampler; an up level n+1 layers then an upsampler, in slot 2 after an attention, else 1.
UNET_SLOTS = {
    "down":    lambda i, j, n: i * (n + 1) + j + 1,
    "down_op": lambda i, j, n: (i + 1) * (n + 1),
    "up":      lambda i, j, n: i * (n + 1) + j,
    "up_last": lambda i, j, n: i * (n + 1) + n,
}
UNET_BLOCKS: tuple[tuple[str, str], ...] = (
    ("down_blocks.{i}.resnets.{j}",         "input_blocks.{down}.0"),
    ("down_blocks.{i}.attentions.{j}",      "input_blocks.{down}.1"),
    ("down_blocks.{i}.downsamplers.0.conv", "input_blocks.{down_op}.0.op"),
    ("mid_block.resnets.0",                 "middle_block.0"),
    ("mid_block.attentions.0",              "middle_block.1"),
    ("mid_block.resnets.1",                 "middle_block.2"),
    ("up_blocks.{i}.resnets.{j}",           "output_blocks.{up}.0"),
    ("up_blocks.{i}.attentions.{j}",        "output_blocks.{up}.1"),
    ("up_blocks.{i}.upsamplers.0",          "output_blocks.{up_last}.{up_op}"),
)

# Inside a ResNet block (diffusers ResnetBlock2D → LDM ResBlock). Attention blocks keep their names
# (norm, proj_in, transformer_blocks.k.attn1.to_q, ff.net.0.proj, proj_out ...).
RESNET_PARTS: tuple[tuple[str, str], ...] = (
    ("norm1",         "in_layers.0"),
    ("conv1",         "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2",         "out_layers.0"),
    ("conv2",         "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)

# ------------------------------------------------------------------------------------------------ text encoders
# Where each text encoder lives: diffusers folder component, original single-file prefix, its layout
# ("hf" = transformers CLIPTextModel names, "openclip" = OpenCLIP names, see OPENCLIP_PARTS), the kohya
# prefixes (first = the one writers use), family.
TEXT_ENCODERS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    ("text_encoder",   "cond_stage_model.transformer.",        "hf",       ("lora_te", "lora_te1"), "sd1"),
    ("text_encoder",   "cond_stage_model.model.",              "openclip", ("lora_te", "lora_te1"), "sd2"),
    ("text_encoder",   "conditioner.embedders.0.transformer.", "hf",       ("lora_te1", "lora_te"), "sdxl"),
    ("text_encoder_2", "conditioner.embedders.1.model.",       "openclip", ("lora_te2",),           "sdxl"),
)

# Text encoders in a diffusers folder: (component, family) → kohya prefixes (first = the one writers use).
DIFFUSERS_TE_PREFIXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("text_encoder", "sd"):     ("lora_te", "lora_te1"),   # sd1 / sd2
    ("text_encoder", "sdxl"):   ("lora_te1", "lora_te"),
    ("text_encoder_2", "sdxl"): ("lora_te2",),
}

# OpenCLIP text tower → transformers CLIP names. A `{q,k,v}` target is a row third of the fused tensor;
# `ᵀ` marks a tensor stored transposed (a bare parameter used as x @ P).
OPENCLIP_PARTS: tuple[tuple[str, str], ...] = (
    ("transformer.resblocks.{n}.attn.in_proj_weight", "text_model.encoder.layers.{n}.self_attn.{q,k,v}_proj.weight"),
    ("transformer.resblocks.{n}.attn.in_proj_bias",   "text_model.encoder.layers.{n}.self_attn.{q,k,v}_proj.bias"),
    ("transformer.resblocks.{n}.attn.out_proj",       "text_model.encoder.layers.{n}.self_attn.out_proj"),
    ("transformer.resblocks.{n}.ln_1",                "text_model.encoder.layers.{n}.layer_norm1"),
    ("transformer.resblocks.{n}.ln_2",                "text_model.encoder.layers.{n}.layer_norm2"),
    ("transformer.resblocks.{n}.mlp.c_fc",            "text_model.encoder.layers.{n}.mlp.fc1"),
    ("transformer.resblocks.{n}.mlp.c_proj",          "text_model.encoder.layers.{n}.mlp.fc2"),
    ("token_embedding",                               "text_model.embeddings.token_embedding"),
    ("ln_final",                                      "text_model.final_layer_norm"),
    ("text_projection",                               "text_projection.weightᵀ"),
)

# ------------------------------------------------------------------------------------------------ kohya prefixes
# diffusers component → kohya/LyCORIS module-name prefixes (first = the one writers use).
COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "unet":        ("lora_unet", "lycoris"),        # kohya sd-scripts / LyCORIS standalone wrapper
    "transformer": ("lora_transformer", "lora_unet", "lycoris"),  # DiT pipelines (OneTrainer, SimpleTuner)
}
UNET_SINGLE_FILE_PREFIX = "model.diffusion_model."
KNOWN_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lycoris_")


# transformers ≥ 5 saves CLIPTextModel without its `text_model.` wrapper; LoRA files (and older checkpoints)
# name these modules with it. Both spellings are accepted, the wrapped one is written.
CLIP_TEXT_MODEL_PARTS = ("embeddings", "encoder", "final_layer_norm")


def te_spellings(module: str) -> list[str]:
    """[canonical (with text_model.), alternative] spellings of a CLIP text-model module path (a T5 encoder's
    `encoder.block.…` has no text_model. wrapper: sd-scripts writes `lora_te3_encoder_block_…`)."""
    if module.startswith("text_model."):
        return [module, module[len("text_model."):]]
    if module.split(".", 1)[0] in CLIP_TEXT_MODEL_PARTS and not module.startswith("encoder.block."):
        return ["text_model." + module, module]
    return [module]


def kohya_name(prefix: str, module: str) -> str:
    """The flattened module name sd-scripts builds: (prefix + "." + module).replace(".", "_")."""
    return f"{prefix}.{module}".replace(".", "_")


# ================================================================================================= code
@dataclass
class UnetLayout:
    """What the block arithmetic needs: layers per block, and which up levels have attention."""

    n: int
    levels: int
    up_attn: set[int] = field(default_factory=set)


def _ints(names: Iterable[str], pat: str) -> list[tuple[int, ...]]:
    rx = re.compile(pat)
    return sorted({tuple(int(g) for g in m.groups()) for s in names if (m := rx.match(s))})


def layout_from_diffusers(names: Iterable[str]) -> UnetLayout | None:
    names = list(names)
    res = _ints(names, r"down_blocks\.(\d+)\.resnets\.(\d+)\.")
    if not res:
        return None
    n = max(j for i, j in res if i == 0) + 1
    levels = max(i for i, _ in res) + 1
    up_attn = {i for (i,) in _ints(names, r"up_blocks\.(\d+)\.attentions\.")}
    return UnetLayout(n, levels, up_attn)


def layout_from_ldm(names: Iterable[str]) -> UnetLayout | None:
    names = list(names)
    ops = [k for (k,) in _ints(names, r"input_blocks\.(\d+)\.0\.op\.")]
    ins = [k for (k,) in _ints(names, r"input_blocks\.(\d+)\.")]
    if not ins:
        return None
    n = ops[0] - 1 if ops else max(ins)
    levels = len(ops) + 1
    outs = {k for (k,) in _ints(names, r"output_blocks\.(\d+)\.1\.(?:proj_in|transformer_blocks)\.")}
    up_attn = {i for i in range(levels) if i * (n + 1) in outs}
    return UnetLayout(n, levels, up_attn)


def unet_block_map(lay: UnetLayout) -> dict[str, str]:
    """diffusers module prefix → LDM prefix for every block of this layout (from UNET_BLOCKS)."""
    out: dict[str, str] = {}
    for dif, ldm in UNET_BLOCKS:
        for i in range(lay.levels) if "{i}" in dif else (0,):
            if dif.startswith("up_blocks.{i}.attentions") and i not in lay.up_attn:
                continue  # that slot holds the upsampler
            layers = lay.n + 1 if dif.startswith("up_blocks") else lay.n  # up levels have one layer more
            for j in range(layers) if "{j}" in dif else (0,):
                slots = {k: f(i, j, lay.n) for k, f in UNET_SLOTS.items()}
                out[dif.format(i=i, j=j)] = ldm.format(**slots, up_op=2 if i in lay.up_attn else 1)
    return out


def _rename(name: str, pairs: list[tuple[str, str]], inner: list[tuple[str, str]]) -> str | None:
    """Rename the longest matching prefix of `name` (pairs sorted longest first); inside a ResNet block the
    part as well (`inner`)."""
    for src, dst in pairs:
        if name.startswith(src + "."):
            rest = name[len(src) + 1:]
            if ".resnets." in src + dst or dst.startswith("mid_block.resnets") or src.startswith("mid_block.resnets"):
                for a, b in inner:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
            return f"{dst}.{rest}"
    return None


def unet_name_maps(lay: UnetLayout):
    """(diffusers→LDM, LDM→diffusers): functions on UNet tensor names without component prefix."""
    fwd = sorted([(d, m) for d, m, _ in UNET_TOP] + list(unet_block_map(lay).items()), key=lambda kv: -len(kv[0]))
    inv = sorted([(m, d) for d, m in fwd], key=lambda kv: -len(kv[0]))
    res_inv = [(m, d) for d, m in RESNET_PARTS]
    return (lambda n: _rename(n, fwd, list(RESNET_PARTS))), (lambda n: _rename(n, inv, res_inv))


def openclip_to_hf(name: str) -> list[tuple[str, int | None, bool]]:
    """OpenCLIP text-tower tensor name → [(HF name, row third (0/1/2) or None, stored transposed)]; [] if unknown."""
    for oc, hf in OPENCLIP_PARTS:
        rx = "^" + re.escape(oc).replace(re.escape("{n}"), r"(?P<n>\d+)") + r"(?P<rest>(?:\.weight|\.bias)?)$"
        m = re.match(rx, name)
        if not m:
            continue
        tgt = hf.replace("{n}", m.groupdict().get("n") or "")
        transposed = tgt.endswith("ᵀ")
        tgt = tgt.rstrip("ᵀ") + m.group("rest")
        if "{q,k,v}" in tgt:
            return [(tgt.replace("{q,k,v}", x), k, False) for k, x in enumerate("qkv")]
        return [(tgt, None, transposed)]
    return []


@dataclass(frozen=True)
class Entry:
    """One base tensor (or row slice) and how adapters name it."""

    target: str  # base tensor name
    rows: tuple[int, int] | None  # row slice of a fused tensor
    transpose: bool  # the base stores the transposed matrix
    module: str  # diffusers-style module path with component prefix ("unet.down_blocks.0...to_q")
    param: str  # "weight" | "bias"
    kohya: tuple[str, ...]  # kohya module names (first = preferred for writing)
    sgm: str | None = None  # the UNet's kohya name in SGM/LDM spelling (SDXL files), when known


class SDNames:
    """Name index of one base checkpoint: kohya / diffusers module names → base tensors."""

    def __init__(self, names: list[str], shape_of=None):
        self.entries: list[Entry] = []
        self.by_kohya: dict[str, dict[str, Entry]] = {}
        self.by_module: dict[str, dict[str, Entry]] = {}
        self.by_target: dict[tuple[str, tuple[int, int] | None], Entry] = {}
        self.family = "sdxl" if any(n.startswith(("text_encoder_2.", "conditioner.embedders.1.", "unet.add_embedding",
                                                  "model.diffusion_model.label_emb")) for n in names) else "sd"
        self.notes: list[str] = []
        unet_ldm = [n[len(UNET_SINGLE_FILE_PREFIX):] for n in names if n.startswith(UNET_SINGLE_FILE_PREFIX)]
        unet_dif = [n[len("unet."):] for n in names if n.startswith("unet.")]
        self._to_ldm = self._to_dif = None
        if unet_dif and (lay := layout_from_diffusers(unet_dif)):
            self._to_ldm = unet_name_maps(lay)[0]
        if unet_ldm and (lay := layout_from_ldm(unet_ldm)):
            self._to_dif = unet_name_maps(lay)[1]
        for name in names:
            self._add(name, shape_of)
        self.sgm_preferred = self.family == "sdxl"

    # ---------------------------------------------------------------------------------------------
    def _add(self, name: str, shape_of) -> None:
        if name.startswith(UNET_SINGLE_FILE_PREFIX):
            ldm = name[len(UNET_SINGLE_FILE_PREFIX):]
            ldm_mod, _, param = ldm.rpartition(".")
            dif = self._to_dif(ldm) if self._to_dif else None
            dif_mod = dif.rpartition(".")[0] if dif else None
            names = [kohya_name("lora_unet", ldm_mod)] + ([kohya_name("lora_unet", dif_mod)] if dif_mod else [])
            if self.family != "sdxl" and dif_mod:
                names.reverse()  # SD1/2 kohya files use diffusers names, SDXL files SGM names
            if dif_mod:
                names.append(kohya_name("lycoris", dif_mod))  # LyCORIS standalone wrapper on a diffusers UNet
            self._put(Entry(name, None, False, f"unet.{dif_mod or ldm_mod}", param, tuple(names), names[0 if
                            self.family == "sdxl" or not dif_mod else 1]))
            return
        comp, _, rest = name.partition(".")
        rest_mod, _, param = rest.rpartition(".")
        if comp == "unet":
            names = [kohya_name("lora_unet", rest_mod), kohya_name("lycoris", rest_mod)]
            sgm = None
            if self._to_ldm and (ldm := self._to_ldm(rest)):
                sgm = kohya_name("lora_unet", ldm.rpartition(".")[0])
                names.insert(0 if self.family == "sdxl" else 1, sgm)
            self._put(Entry(name, None, False, f"unet.{rest_mod}", param, tuple(names), sgm))
            return
        if comp in COMPONENT_PREFIXES:
            self._put(Entry(name, None, False, f"{comp}.{rest_mod}", param,
                            tuple(kohya_name(p, rest_mod) for p in COMPONENT_PREFIXES[comp])))
            return
        if (comp, self.family) in DIFFUSERS_TE_PREFIXES:  # a diffusers folder: transformers names
            pre = DIFFUSERS_TE_PREFIXES[comp, self.family]
            mods = te_spellings(rest_mod)
            self._put(Entry(name, None, False, f"{comp}.{mods[0]}", param,
                            tuple(kohya_name(p, m) for m in mods for p in pre)), [f"{comp}.{m}" for m in mods])
            return
        for dif_comp, single, layout, prefixes, _fam in TEXT_ENCODERS:
            if not name.startswith(single):
                continue
            inner = name[len(single):]
            if layout == "hf":
                hf = [(te_spellings(inner)[0], None, False)]
            else:
                hf = openclip_to_hf(inner)
            for hf_name, third, transposed in hf:
                hmod, _, hparam = hf_name.rpartition(".")
                rows = None
                if third is not None:
                    total = shape_of(name)[0] if shape_of else 0
                    if not total or total % 3:
                        continue
                    rows = (third * total // 3, (third + 1) * total // 3)
                mods = te_spellings(hmod)
                self._put(Entry(name, rows, transposed, f"{dif_comp}.{mods[0]}", hparam,
                                tuple(kohya_name(p, m) for m in mods for p in prefixes)),
                          [f"{dif_comp}.{m}" for m in mods])
            return

    def _put(self, e: Entry, modules: list[str] | None = None) -> None:
        self.entries.append(e)
        self.by_target.setdefault((e.target, e.rows), e)
        for k in e.kohya:
            self.by_kohya.setdefault(k, {}).setdefault(e.param, e)
        for m in modules or [e.module]:
            self.by_module.setdefault(m, {}).setdefault(e.param, e)

    # ---------------------------------------------------------------------------------------------
    def entry_for_target(self, target: str, rows: tuple[int, int] | None) -> Entry | None:
        return self.by_target.get((target, rows))
