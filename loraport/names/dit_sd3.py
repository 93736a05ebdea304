"""SD3 / SD3.5 name table rows (diffusers module, original SAI module) and fused-tensor row parts; consumed by
loraport/names/dit.py. Spec: formats/dit.md."""

# ------------------------------------------------------------------------------------------------- SD3 / SD3.5
# diffusers module (canonical)                      original (SAI) module
SD3_ROWS: tuple[tuple[str, str], ...] = (
    ("transformer_blocks.{i}.attn.to_q",                "joint_blocks.{i}.x_block.attn.qkv[0]"),
    ("transformer_blocks.{i}.attn.to_k",                "joint_blocks.{i}.x_block.attn.qkv[1]"),
    ("transformer_blocks.{i}.attn.to_v",                "joint_blocks.{i}.x_block.attn.qkv[2]"),
    ("transformer_blocks.{i}.attn.to_out.0",            "joint_blocks.{i}.x_block.attn.proj"),
    ("transformer_blocks.{i}.attn.add_q_proj",          "joint_blocks.{i}.context_block.attn.qkv[0]"),
    ("transformer_blocks.{i}.attn.add_k_proj",          "joint_blocks.{i}.context_block.attn.qkv[1]"),
    ("transformer_blocks.{i}.attn.add_v_proj",          "joint_blocks.{i}.context_block.attn.qkv[2]"),
    ("transformer_blocks.{i}.attn.to_add_out",          "joint_blocks.{i}.context_block.attn.proj"),
    ("transformer_blocks.{i}.attn2.to_q",               "joint_blocks.{i}.x_block.attn2.qkv[0]"),  # SD3.5 medium
    ("transformer_blocks.{i}.attn2.to_k",               "joint_blocks.{i}.x_block.attn2.qkv[1]"),
    ("transformer_blocks.{i}.attn2.to_v",               "joint_blocks.{i}.x_block.attn2.qkv[2]"),
    ("transformer_blocks.{i}.attn2.to_out.0",           "joint_blocks.{i}.x_block.attn2.proj"),
    ("transformer_blocks.{i}.ff.net.0.proj",            "joint_blocks.{i}.x_block.mlp.fc1"),
    ("transformer_blocks.{i}.ff.net.2",                 "joint_blocks.{i}.x_block.mlp.fc2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj",    "joint_blocks.{i}.context_block.mlp.fc1"),
    ("transformer_blocks.{i}.ff_context.net.2",         "joint_blocks.{i}.context_block.mlp.fc2"),
    ("transformer_blocks.{i}.norm1.linear",             "joint_blocks.{i}.x_block.adaLN_modulation.1"),
    ("transformer_blocks.{i}.norm1_context.linear",     "joint_blocks.{i}.context_block.adaLN_modulation.1"),
    # the last block's context modulation has 2 parts (shift, scale), swapped in diffusers: parts win when the
    # tensor has exactly their rows
    ("transformer_blocks.{i}.norm1_context.linear[0]",  "joint_blocks.{i}.context_block.adaLN_modulation.1[1]"),
    ("transformer_blocks.{i}.norm1_context.linear[1]",  "joint_blocks.{i}.context_block.adaLN_modulation.1[0]"),
    ("pos_embed.proj",                                  "x_embedder.proj"),  # the patch embedding (a conv)
    ("context_embedder",                                "context_embedder"),
    ("time_text_embed.timestep_embedder.linear_1",      "t_embedder.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2",      "t_embedder.mlp.2"),
    ("time_text_embed.text_embedder.linear_1",          "y_embedder.mlp.0"),
    ("time_text_embed.text_embedder.linear_2",          "y_embedder.mlp.2"),
    ("proj_out",                                        "final_layer.linear"),
    ("norm_out.linear[0]",                              "final_layer.adaLN_modulation.1[1]"),  # scale, shift
    ("norm_out.linear[1]",                              "final_layer.adaLN_modulation.1[0]"),  # swapped
)
SD3_FUSED: dict[str, tuple[str, ...]] = {
    "joint_blocks.{i}.x_block.attn.qkv":                    ("h", "h", "h"),
    "joint_blocks.{i}.context_block.attn.qkv":              ("h", "h", "h"),
    "joint_blocks.{i}.x_block.attn2.qkv":                   ("h", "h", "h"),
    "joint_blocks.{i}.context_block.adaLN_modulation.1":    ("h", "h"),
    "transformer_blocks.{i}.norm1_context.linear":          ("h", "h"),
    "final_layer.adaLN_modulation.1":                       ("h", "h"),
    "norm_out.linear":                                      ("h", "h"),
}
