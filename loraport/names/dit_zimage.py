"""Z-Image (Tongyi-MAI's Z-Image / Z-Image-Turbo / Omni) name table rows (diffusers module, original module), read
off diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` and `_convert_non_diffusers_z_image_lora_to_
diffusers`; consumed by loraport/names/dit.py. Spec: formats/dit.md.

Z-Image is Lumina2's architecture family (noise / context refiners, `layers`, `feed_forward.w1/w2/w3`,
`cap_embedder`, `t_embedder`), but its diffusers port keeps the original module names almost everywhere: only the
attention (`attention.qkv` fused ↔ `attention.to_q/to_k/to_v`, `attention.out` ↔ `attention.to_out.0`) and the
patch-size-keyed embedder / final layer (`x_embedder` ↔ `all_x_embedder.2-1`, `final_layer` ↔
`all_final_layer.2-1`) differ. q, k and v are each the hidden width (diffusers' converter cuts qkv in thirds), so
the fused qkv is ("h", "h", "h"). The modulation is `adaLN_modulation.0` in both layouts (Lumina2's is `.1`)."""

BLOCKS = ("noise_refiner", "context_refiner", "layers", "siglip_refiner")  # siglip_refiner: Omni only
MODULATED = ("noise_refiner", "layers")  # the refiners of captions and SigLIP features have no adaLN modulation


def _block_rows(b: str) -> tuple[tuple[str, str], ...]:
    rows = ((f"{b}.{{i}}.attention.to_q",              f"{b}.{{i}}.attention.qkv[0]"),
            (f"{b}.{{i}}.attention.to_k",              f"{b}.{{i}}.attention.qkv[1]"),
            (f"{b}.{{i}}.attention.to_v",              f"{b}.{{i}}.attention.qkv[2]"),
            (f"{b}.{{i}}.attention.to_out.0",          f"{b}.{{i}}.attention.out"),
            (f"{b}.{{i}}.feed_forward.w1",             f"{b}.{{i}}.feed_forward.w1"),
            (f"{b}.{{i}}.feed_forward.w2",             f"{b}.{{i}}.feed_forward.w2"),
            (f"{b}.{{i}}.feed_forward.w3",             f"{b}.{{i}}.feed_forward.w3"))
    return rows + (((f"{b}.{{i}}.adaLN_modulation.0", f"{b}.{{i}}.adaLN_modulation.0"),) if b in MODULATED else ())


# diffusers module (canonical)                      original module
ZIMAGE_ROWS: tuple[tuple[str, str], ...] = sum((_block_rows(b) for b in BLOCKS), ()) + (
    ("all_x_embedder.2-1",                          "x_embedder"),
    ("all_final_layer.2-1.linear",                  "final_layer.linear"),
    ("all_final_layer.2-1.adaLN_modulation.1",      "final_layer.adaLN_modulation.1"),
    ("t_embedder.mlp.0",                            "t_embedder.mlp.0"),
    ("t_embedder.mlp.2",                            "t_embedder.mlp.2"),
    ("cap_embedder.1",                              "cap_embedder.1"),
    ("siglip_embedder.1",                           "siglip_embedder.1"),
)
ZIMAGE_FUSED: dict[str, tuple[str, ...]] = {f"{b}.{{i}}.attention.qkv": ("h", "h", "h") for b in BLOCKS}
# the patch embedder only diffusers names by patch size; the block modulation's index only Z-Image's original has
ZIMAGE_ANCHORS = {"diffusers": "all_x_embedder.2-1.weight", "original": "layers.0.adaLN_modulation.0.weight"}
