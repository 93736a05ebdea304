"""Wan 2.1 / 2.2 name table rows (diffusers module, original Wan-AI module), read off diffusers'
`convert_wan_transformer_to_diffusers`; consumed by loraport/names/dit.py. Spec: formats/dit.md."""

# ------------------------------------------------------------------------------------------------- Wan 2.1 / 2.2
# diffusers module (canonical)                      original (Wan-AI) module; no fused tensors
WAN_ROWS: tuple[tuple[str, str], ...] = (
    ("blocks.{i}.attn1.to_q",                           "blocks.{i}.self_attn.q"),
    ("blocks.{i}.attn1.to_k",                           "blocks.{i}.self_attn.k"),
    ("blocks.{i}.attn1.to_v",                           "blocks.{i}.self_attn.v"),
    ("blocks.{i}.attn1.to_out.0",                       "blocks.{i}.self_attn.o"),
    ("blocks.{i}.attn2.to_q",                           "blocks.{i}.cross_attn.q"),
    ("blocks.{i}.attn2.to_k",                           "blocks.{i}.cross_attn.k"),
    ("blocks.{i}.attn2.to_v",                           "blocks.{i}.cross_attn.v"),
    ("blocks.{i}.attn2.to_out.0",                       "blocks.{i}.cross_attn.o"),
    ("blocks.{i}.attn2.add_k_proj",                     "blocks.{i}.cross_attn.k_img"),  # I2V
    ("blocks.{i}.attn2.add_v_proj",                     "blocks.{i}.cross_attn.v_img"),  # I2V
    ("blocks.{i}.ffn.net.0.proj",                       "blocks.{i}.ffn.0"),
    ("blocks.{i}.ffn.net.2",                            "blocks.{i}.ffn.2"),
    ("condition_embedder.time_embedder.linear_1",       "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2",       "time_embedding.2"),
    ("condition_embedder.time_proj",                    "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1",       "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2",       "text_embedding.2"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),  # I2V
    ("condition_embedder.image_embedder.ff.net.2",      "img_emb.proj.3"),  # I2V
    ("proj_out",                                        "head.head"),
    ("patch_embedding",                                 "patch_embedding"),  # a Conv3d
)
