"""Flux.2 (dev, Klein) name table rows (diffusers module, original BFL module) and fused-tensor row parts; consumed
by loraport/names/dit.py. Read off diffusers' single-file converter convert_flux2_transformer_checkpoint_to_diffusers
(the LoRA converters _convert_non_diffusers_flux2_lora_to_diffusers / _convert_kohya_flux2_lora_to_diffusers use the
same names). Unlike Flux.1, the single block's linear1 stays fused in diffusers (attn.to_qkv_mlp_proj), the
modulations are shared by all blocks (double_stream_modulation_img / _txt, single_stream_modulation), and no
linear has a bias. Spec: formats/dit.md."""

from loraport.names.dit_flux import FLUX_DOUBLE_ATTN

# diffusers module (canonical)                            original (BFL) module
FLUX2_ROWS: tuple[tuple[str, str], ...] = FLUX_DOUBLE_ATTN + (  # the double blocks' attention: Flux.1's
    ("transformer_blocks.{i}.ff.linear_in",                   "double_blocks.{i}.img_mlp.0"),
    ("transformer_blocks.{i}.ff.linear_out",                  "double_blocks.{i}.img_mlp.2"),
    ("transformer_blocks.{i}.ff_context.linear_in",           "double_blocks.{i}.txt_mlp.0"),
    ("transformer_blocks.{i}.ff_context.linear_out",          "double_blocks.{i}.txt_mlp.2"),
    ("single_transformer_blocks.{s}.attn.to_qkv_mlp_proj",    "single_blocks.{s}.linear1"),
    ("single_transformer_blocks.{s}.attn.to_out",             "single_blocks.{s}.linear2"),
    ("double_stream_modulation_img.linear",                   "double_stream_modulation_img.lin"),
    ("double_stream_modulation_txt.linear",                   "double_stream_modulation_txt.lin"),
    ("single_stream_modulation.linear",                       "single_stream_modulation.lin"),
    ("x_embedder",                                            "img_in"),
    ("context_embedder",                                      "txt_in"),
    ("time_guidance_embed.timestep_embedder.linear_1",        "time_in.in_layer"),
    ("time_guidance_embed.timestep_embedder.linear_2",        "time_in.out_layer"),
    ("time_guidance_embed.guidance_embedder.linear_1",        "guidance_in.in_layer"),
    ("time_guidance_embed.guidance_embedder.linear_2",        "guidance_in.out_layer"),
    ("proj_out",                                              "final_layer.linear"),
    ("norm_out.linear[0]",                                    "final_layer.adaLN_modulation.1[1]"),  # scale, shift
    ("norm_out.linear[1]",                                    "final_layer.adaLN_modulation.1[0]"),  # swapped
)

# fused tensor → its parts' row counts, in row order ("h": the input width)
FLUX2_FUSED: dict[str, tuple[str, ...]] = {
    "double_blocks.{i}.img_attn.qkv":   ("h", "h", "h"),
    "double_blocks.{i}.txt_attn.qkv":   ("h", "h", "h"),
    "final_layer.adaLN_modulation.1":   ("h", "h"),
    "norm_out.linear":                  ("h", "h"),
}
