"""Lumina-Image 2.0 name table rows (diffusers module, original Alpha-VLLM module), read off diffusers'
`convert_lumina2_to_diffusers` and `_convert_non_diffusers_lumina2_lora_to_diffusers`; consumed by
loraport/names/dit.py. Spec: formats/dit.md.

The original fuses q, k, v in `attention.qkv` with grouped-query attention: q is the hidden width, k and v the
(smaller, equal) rest — diffusers hard-codes 2304 / 768 / 768; here ("h", "*", "*")."""

BLOCKS = ("noise_refiner", "context_refiner", "layers")  # context_refiner blocks have no adaLN modulation


def _block_rows(b: str) -> tuple[tuple[str, str], ...]:
    rows = ((f"{b}.{{i}}.attn.to_q",                   f"{b}.{{i}}.attention.qkv[0]"),
            (f"{b}.{{i}}.attn.to_k",                   f"{b}.{{i}}.attention.qkv[1]"),
            (f"{b}.{{i}}.attn.to_v",                   f"{b}.{{i}}.attention.qkv[2]"),
            (f"{b}.{{i}}.attn.to_out.0",               f"{b}.{{i}}.attention.out"),
            (f"{b}.{{i}}.feed_forward.linear_1",       f"{b}.{{i}}.feed_forward.w1"),
            (f"{b}.{{i}}.feed_forward.linear_2",       f"{b}.{{i}}.feed_forward.w2"),
            (f"{b}.{{i}}.feed_forward.linear_3",       f"{b}.{{i}}.feed_forward.w3"))
    return rows + (() if b == "context_refiner" else ((f"{b}.{{i}}.norm1.linear", f"{b}.{{i}}.adaLN_modulation.1"),))


# diffusers module (canonical)                              original module
LUMINA2_ROWS: tuple[tuple[str, str], ...] = sum((_block_rows(b) for b in BLOCKS), ()) + (
    ("x_embedder",                                          "x_embedder"),
    ("time_caption_embed.timestep_embedder.linear_1",       "t_embedder.mlp.0"),
    ("time_caption_embed.timestep_embedder.linear_2",       "t_embedder.mlp.2"),
    ("time_caption_embed.caption_embedder.1",               "cap_embedder.1"),
    ("norm_out.linear_1",                                   "final_layer.adaLN_modulation.1"),
    ("norm_out.linear_2",                                   "final_layer.linear"),
)
LUMINA2_FUSED: dict[str, tuple[str, ...]] = {f"{b}.{{i}}.attention.qkv": ("h", "*", "*") for b in BLOCKS}
# Z-Image's bases have cap_embedder.1 too: the original's anchor is the block modulation (Z-Image's is .0)
LUMINA2_ANCHORS = {"diffusers": "time_caption_embed.caption_embedder.1.weight",
                   "original": "layers.0.adaLN_modulation.1.weight"}
