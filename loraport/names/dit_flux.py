"""Flux.1 name table rows (diffusers module, original BFL module), the XLabs column and the fused-tensor row
parts; consumed by loraport/names/dit.py. Spec: formats/dit.md."""

# ------------------------------------------------------------------------------------------------- Flux.1
# the double blocks' joint attention: BFL's fused img / txt qkv, the same in Flux.1 and Flux.2 (dit_flux2.py)
FLUX_DOUBLE_ATTN: tuple[tuple[str, str], ...] = (
    ("transformer_blocks.{i}.attn.to_q",                "double_blocks.{i}.img_attn.qkv[0]"),
    ("transformer_blocks.{i}.attn.to_k",                "double_blocks.{i}.img_attn.qkv[1]"),
    ("transformer_blocks.{i}.attn.to_v",                "double_blocks.{i}.img_attn.qkv[2]"),
    ("transformer_blocks.{i}.attn.to_out.0",            "double_blocks.{i}.img_attn.proj"),
    ("transformer_blocks.{i}.attn.add_q_proj",          "double_blocks.{i}.txt_attn.qkv[0]"),
    ("transformer_blocks.{i}.attn.add_k_proj",          "double_blocks.{i}.txt_attn.qkv[1]"),
    ("transformer_blocks.{i}.attn.add_v_proj",          "double_blocks.{i}.txt_attn.qkv[2]"),
    ("transformer_blocks.{i}.attn.to_add_out",          "double_blocks.{i}.txt_attn.proj"),
)

# diffusers module (canonical)                      original (BFL) module
FLUX_ROWS: tuple[tuple[str, str], ...] = FLUX_DOUBLE_ATTN + (
    ("transformer_blocks.{i}.ff.net.0.proj",            "double_blocks.{i}.img_mlp.0"),
    ("transformer_blocks.{i}.ff.net.2",                 "double_blocks.{i}.img_mlp.2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj",    "double_blocks.{i}.txt_mlp.0"),
    ("transformer_blocks.{i}.ff_context.net.2",         "double_blocks.{i}.txt_mlp.2"),
    ("transformer_blocks.{i}.norm1.linear",             "double_blocks.{i}.img_mod.lin"),
    ("transformer_blocks.{i}.norm1_context.linear",     "double_blocks.{i}.txt_mod.lin"),
    ("single_transformer_blocks.{s}.attn.to_q",         "single_blocks.{s}.linear1[0]"),
    ("single_transformer_blocks.{s}.attn.to_k",         "single_blocks.{s}.linear1[1]"),
    ("single_transformer_blocks.{s}.attn.to_v",         "single_blocks.{s}.linear1[2]"),
    ("single_transformer_blocks.{s}.proj_mlp",          "single_blocks.{s}.linear1[3]"),
    ("single_transformer_blocks.{s}.proj_out",          "single_blocks.{s}.linear2"),
    ("single_transformer_blocks.{s}.norm.linear",       "single_blocks.{s}.modulation.lin"),
    ("x_embedder",                                      "img_in"),
    ("context_embedder",                                "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1",      "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2",      "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1",          "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2",          "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1",      "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2",      "guidance_in.out_layer"),
    ("proj_out",                                        "final_layer.linear"),
    ("norm_out.linear[0]",                              "final_layer.adaLN_modulation.1[1]"),  # scale, shift
    ("norm_out.linear[1]",                              "final_layer.adaLN_modulation.1[0]"),  # swapped
)

# XLabs x-flux names the attention LoRAs by processor (`…processor.qkv_lora1.down.weight`): its column.
FLUX_XLABS: tuple[tuple[str, str], ...] = (
    ("transformer_blocks.{i}.attn.to_q",                "double_blocks.{i}.processor.qkv_lora1[0]"),
    ("transformer_blocks.{i}.attn.to_k",                "double_blocks.{i}.processor.qkv_lora1[1]"),
    ("transformer_blocks.{i}.attn.to_v",                "double_blocks.{i}.processor.qkv_lora1[2]"),
    ("transformer_blocks.{i}.attn.to_out.0",            "double_blocks.{i}.processor.proj_lora1"),
    ("transformer_blocks.{i}.attn.add_q_proj",          "double_blocks.{i}.processor.qkv_lora2[0]"),
    ("transformer_blocks.{i}.attn.add_k_proj",          "double_blocks.{i}.processor.qkv_lora2[1]"),
    ("transformer_blocks.{i}.attn.add_v_proj",          "double_blocks.{i}.processor.qkv_lora2[2]"),
    ("transformer_blocks.{i}.attn.to_add_out",          "double_blocks.{i}.processor.proj_lora2"),
    ("single_transformer_blocks.{s}.attn.to_q",         "single_blocks.{s}.processor.qkv_lora[0]"),
    ("single_transformer_blocks.{s}.attn.to_k",         "single_blocks.{s}.processor.qkv_lora[1]"),
    ("single_transformer_blocks.{s}.attn.to_v",         "single_blocks.{s}.processor.qkv_lora[2]"),
    ("single_transformer_blocks.{s}.proj_out",          "single_blocks.{s}.processor.proj_lora"),
)

# fused tensor → its parts' row counts, in row order ("h": the input width, "*": what is left)
FLUX_FUSED: dict[str, tuple[str, ...]] = {
    "double_blocks.{i}.img_attn.qkv":   ("h", "h", "h"),
    "double_blocks.{i}.txt_attn.qkv":   ("h", "h", "h"),
    "single_blocks.{s}.linear1":        ("h", "h", "h", "*"),
    "final_layer.adaLN_modulation.1":   ("h", "h"),
    "norm_out.linear":                  ("h", "h"),
    "double_blocks.{i}.processor.qkv_lora1": ("h", "h", "h"),
    "double_blocks.{i}.processor.qkv_lora2": ("h", "h", "h"),
    "single_blocks.{s}.processor.qkv_lora":  ("h", "h", "h"),  # XLabs: q, k, v of linear1, not its MLP part
}

# Full tensors a Flux Control LoRA (BFL Canny / Depth) carries whole, replacing the base's: the qk RMS-norm scales
# (diffusers tensor, original tensor), read off diffusers' _convert_bfl_flux_control_lora_to_diffusers.
FLUX_PARAMS: tuple[tuple[str, str], ...] = (
    ("transformer_blocks.{i}.attn.norm_q.weight",         "double_blocks.{i}.img_attn.norm.query_norm.scale"),
    ("transformer_blocks.{i}.attn.norm_k.weight",         "double_blocks.{i}.img_attn.norm.key_norm.scale"),
    ("transformer_blocks.{i}.attn.norm_added_q.weight",   "double_blocks.{i}.txt_attn.norm.query_norm.scale"),
    ("transformer_blocks.{i}.attn.norm_added_k.weight",   "double_blocks.{i}.txt_attn.norm.key_norm.scale"),
    ("single_transformer_blocks.{s}.attn.norm_q.weight",  "single_blocks.{s}.norm.query_norm.scale"),
    ("single_transformer_blocks.{s}.attn.norm_k.weight",  "single_blocks.{s}.norm.key_norm.scale"),
)

# The input projection a control LoRA widens (its A takes the control image's latents beside the noise's):
# diffusers module, original module, the transformer config key that states its width, and the key that
# defaulted to it (out_channels = in_channels when unset: it must keep the old width).
FLUX_INPUT: tuple[str, str, str, str] = ("x_embedder", "img_in", "in_channels", "out_channels")
