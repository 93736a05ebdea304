"""LTX-Video name table rows (diffusers module, original Lightricks module), read off diffusers'
`convert_ltx_transformer_checkpoint_to_diffusers`: the original names are diffusers' but for `patchify_proj`
(`proj_in`) and `adaln_single` (`time_embed`). Consumed by loraport/names/dit.py. Spec: formats/dit.md."""

_BLOCK = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
          "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
# diffusers module (canonical)                      original (Lightricks LTX-Video) module; no fused tensors
LTX_ROWS: tuple[tuple[str, str], ...] = (
    *((f"transformer_blocks.{{i}}.{m}", f"transformer_blocks.{{i}}.{m}") for m in _BLOCK),
    ("proj_in",                                         "patchify_proj"),
    ("time_embed.linear",                               "adaln_single.linear"),
    ("time_embed.emb.timestep_embedder.linear_1",       "adaln_single.emb.timestep_embedder.linear_1"),
    ("time_embed.emb.timestep_embedder.linear_2",       "adaln_single.emb.timestep_embedder.linear_2"),
    ("caption_projection.linear_1",                     "caption_projection.linear_1"),
    ("caption_projection.linear_2",                     "caption_projection.linear_2"),
    ("proj_out",                                        "proj_out"),
)
# a tensor only LTX-Video's transformer has, per base layout (diffusers' own single-file key for the original)
LTX_ANCHORS = {"diffusers": "time_embed.emb.timestep_embedder.linear_1.weight", "original": "patchify_proj.weight"}
