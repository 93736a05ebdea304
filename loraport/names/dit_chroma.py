"""Chroma name table rows (diffusers module, original module), read off diffusers'
`convert_chroma_transformer_checkpoint_to_diffusers`; consumed by loraport/names/dit.py. Spec: formats/dit.md.

Chroma is Flux.1-schnell with the modulation pruned: its double / single blocks, img_in / txt_in and
final_layer.linear are Flux's modules (same names in both layouts, same fused qkv / linear1), but every
per-block modulation (img_mod / txt_mod / modulation.lin), the final adaLN and the time / vector / guidance
embedders are gone, replaced by one `distilled_guidance_layer` that computes all modulations. So its rows are
Flux's rows less those, plus the guidance layer's."""

from loraport.names.dit_flux import FLUX_FUSED, FLUX_ROWS

# Flux.1 diffusers modules that a Chroma model does not have (a Flux LoRA on them has nothing to land on)
NOT_IN_CHROMA: frozenset[str] = frozenset({
    "transformer_blocks.{i}.norm1.linear", "transformer_blocks.{i}.norm1_context.linear",
    "single_transformer_blocks.{s}.norm.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
    "norm_out.linear[0]", "norm_out.linear[1]",
})

# diffusers module (canonical)                      original module
CHROMA_ROWS: tuple[tuple[str, str], ...] = tuple(r for r in FLUX_ROWS if r[0] not in NOT_IN_CHROMA) + (
    ("distilled_guidance_layer.in_proj",                "distilled_guidance_layer.in_proj"),
    ("distilled_guidance_layer.layers.{i}.linear_1",    "distilled_guidance_layer.layers.{i}.in_layer"),
    ("distilled_guidance_layer.layers.{i}.linear_2",    "distilled_guidance_layer.layers.{i}.out_layer"),
    ("distilled_guidance_layer.out_proj",               "distilled_guidance_layer.out_proj"),
)
CHROMA_FUSED: dict[str, tuple[str, ...]] = {k: v for k, v in FLUX_FUSED.items()  # qkv, linear1, XLabs' qkv
                                            if k.startswith(("double_blocks.", "single_blocks."))}
# a tensor only a Chroma base has, per layout (the guidance layer's in_proj is spelled alike in both)
CHROMA_ANCHORS = {"diffusers": "distilled_guidance_layer.layers.0.linear_1.weight",
                  "original": "distilled_guidance_layer.layers.0.in_layer.weight"}
