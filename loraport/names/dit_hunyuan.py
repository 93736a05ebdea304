"""HunyuanVideo name table rows (diffusers module, original Tencent module) and the fused-tensor row parts, read
off diffusers' `convert_hunyuan_video_transformer_to_diffusers` (the single-file layout) and
`_convert_hunyuan_video_lora_to_diffusers`; consumed by loraport/names/dit.py. Spec: formats/dit.md.

Several original names are Flux's (`single_blocks.N.linear1` / `linear2`, `final_layer.*`, `vector_in.*`), and the
kohya spelling of `double_blocks.N.img_attn_qkv` is Flux's `double_blocks.N.img_attn.qkv` flattened; the token
refiner (`txt_in.individual_token_refiner`) is HunyuanVideo's alone, so it is the anchor."""

# ------------------------------------------------------------------------------------------------- HunyuanVideo
_R = "context_embedder.token_refiner.refiner_blocks.{i}."  # diffusers' token refiner block
_O = "txt_in.individual_token_refiner.blocks.{i}."  # the original's
# diffusers module (canonical)                      original (Tencent HunyuanVideo) module
HUNYUAN_ROWS: tuple[tuple[str, str], ...] = (
    ("transformer_blocks.{i}.attn.to_q",                "double_blocks.{i}.img_attn_qkv[0]"),
    ("transformer_blocks.{i}.attn.to_k",                "double_blocks.{i}.img_attn_qkv[1]"),
    ("transformer_blocks.{i}.attn.to_v",                "double_blocks.{i}.img_attn_qkv[2]"),
    ("transformer_blocks.{i}.attn.to_out.0",            "double_blocks.{i}.img_attn_proj"),
    ("transformer_blocks.{i}.attn.add_q_proj",          "double_blocks.{i}.txt_attn_qkv[0]"),
    ("transformer_blocks.{i}.attn.add_k_proj",          "double_blocks.{i}.txt_attn_qkv[1]"),
    ("transformer_blocks.{i}.attn.add_v_proj",          "double_blocks.{i}.txt_attn_qkv[2]"),
    ("transformer_blocks.{i}.attn.to_add_out",          "double_blocks.{i}.txt_attn_proj"),
    ("transformer_blocks.{i}.ff.net.0.proj",            "double_blocks.{i}.img_mlp.fc1"),
    ("transformer_blocks.{i}.ff.net.2",                 "double_blocks.{i}.img_mlp.fc2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj",    "double_blocks.{i}.txt_mlp.fc1"),
    ("transformer_blocks.{i}.ff_context.net.2",         "double_blocks.{i}.txt_mlp.fc2"),
    ("transformer_blocks.{i}.norm1.linear",             "double_blocks.{i}.img_mod.linear"),
    ("transformer_blocks.{i}.norm1_context.linear",     "double_blocks.{i}.txt_mod.linear"),
    ("single_transformer_blocks.{s}.attn.to_q",         "single_blocks.{s}.linear1[0]"),
    ("single_transformer_blocks.{s}.attn.to_k",         "single_blocks.{s}.linear1[1]"),
    ("single_transformer_blocks.{s}.attn.to_v",         "single_blocks.{s}.linear1[2]"),
    ("single_transformer_blocks.{s}.proj_mlp",          "single_blocks.{s}.linear1[3]"),
    ("single_transformer_blocks.{s}.proj_out",          "single_blocks.{s}.linear2"),
    ("single_transformer_blocks.{s}.norm.linear",       "single_blocks.{s}.modulation.linear"),
    (_R + "attn.to_q",                                  _O + "self_attn_qkv[0]"),
    (_R + "attn.to_k",                                  _O + "self_attn_qkv[1]"),
    (_R + "attn.to_v",                                  _O + "self_attn_qkv[2]"),
    (_R + "attn.to_out.0",                              _O + "self_attn_proj"),
    (_R + "ff.net.0.proj",                              _O + "mlp.fc1"),
    (_R + "ff.net.2",                                   _O + "mlp.fc2"),
    (_R + "norm_out.linear",                            _O + "adaLN_modulation.1"),  # gates: not swapped
    ("context_embedder.proj_in",                        "txt_in.input_embedder"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2"),
    ("context_embedder.time_text_embed.text_embedder.linear_1",     "txt_in.c_embedder.linear_1"),
    ("context_embedder.time_text_embed.text_embedder.linear_2",     "txt_in.c_embedder.linear_2"),
    ("time_text_embed.timestep_embedder.linear_1",      "time_in.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2",      "time_in.mlp.2"),
    ("time_text_embed.text_embedder.linear_1",          "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2",          "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1",      "guidance_in.mlp.0"),
    ("time_text_embed.guidance_embedder.linear_2",      "guidance_in.mlp.2"),
    ("proj_out",                                        "final_layer.linear"),
    ("norm_out.linear[0]",                              "final_layer.adaLN_modulation.1[1]"),  # scale, shift
    ("norm_out.linear[1]",                              "final_layer.adaLN_modulation.1[0]"),  # swapped
)

# fused tensor → its parts' row counts, in row order ("h": the input width, "*": what is left)
HUNYUAN_FUSED: dict[str, tuple[str, ...]] = {
    "double_blocks.{i}.img_attn_qkv":   ("h", "h", "h"),
    "double_blocks.{i}.txt_attn_qkv":   ("h", "h", "h"),
    "single_blocks.{s}.linear1":        ("h", "h", "h", "*"),
    _O + "self_attn_qkv":               ("h", "h", "h"),
    "final_layer.adaLN_modulation.1":   ("h", "h"),
    "norm_out.linear":                  ("h", "h"),
}
# a tensor only HunyuanVideo's transformer has, per base layout
HUNYUAN_ANCHORS = {"diffusers": "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear.weight",
                   "original": "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.weight"}
