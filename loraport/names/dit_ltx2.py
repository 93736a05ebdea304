"""LTX-2 name table rows (diffusers module, original Lightricks module), read off diffusers'
`convert_ltx2_transformer_to_diffusers` and `_convert_non_diffusers_ltx2_lora_to_diffusers`: a video and an audio
stream with cross-attention both ways; the original names are diffusers' but for the input projections
(`patchify_proj`, `audio_patchify_proj`) and the timestep modulations (`adaln_single`, `audio_adaln_single`,
`av_ca_*_adaln_single`). No fused tensors. Consumed by loraport/names/dit.py. Spec: formats/dit.md."""

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_BLOCK = (*(f"{a}.{p}" for a in ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn",
                                 "video_to_audio_attn") for p in _ATTN),
          "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2")
_EMB = ("linear", "emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2")
# diffusers top-level module            original (Lightricks LTX-2) module
_TOP = (
    ("proj_in",                           "patchify_proj"),
    ("audio_proj_in",                     "audio_patchify_proj"),
    ("proj_out",                          "proj_out"),
    ("audio_proj_out",                    "audio_proj_out"),
    ("caption_projection.linear_1",       "caption_projection.linear_1"),
    ("caption_projection.linear_2",       "caption_projection.linear_2"),
    ("audio_caption_projection.linear_1", "audio_caption_projection.linear_1"),
    ("audio_caption_projection.linear_2", "audio_caption_projection.linear_2"),
)
# diffusers timestep modulation         original
_MOD = (
    ("time_embed",                        "adaln_single"),
    ("audio_time_embed",                  "audio_adaln_single"),
    ("av_cross_attn_video_scale_shift",   "av_ca_video_scale_shift_adaln_single"),
    ("av_cross_attn_video_a2v_gate",      "av_ca_a2v_gate_adaln_single"),
    ("av_cross_attn_audio_scale_shift",   "av_ca_audio_scale_shift_adaln_single"),
    ("av_cross_attn_audio_v2a_gate",      "av_ca_v2a_gate_adaln_single"),
)
LTX2_ROWS: tuple[tuple[str, str], ...] = (
    *((f"transformer_blocks.{{i}}.{m}", f"transformer_blocks.{{i}}.{m}") for m in _BLOCK),
    *_TOP,
    *((f"{d}.{e}", f"{o}.{e}") for d, o in _MOD for e in _EMB),
)
# a tensor only LTX-2's transformer has, per base layout (LTX-Video's are a subset: LTX-2 is tried first)
LTX2_ANCHORS = {"diffusers": "audio_time_embed.linear.weight", "original": "audio_adaln_single.linear.weight"}
