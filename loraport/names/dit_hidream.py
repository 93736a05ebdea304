"""HiDream-I1 (and E1) name table rows. HiDream's release is a diffusers folder and its single file (ComfyUI) keeps
those names (diffusers' `convert_hidream_transformer_to_diffusers` only strips `model.diffusion_model.`), so each
row is the same module in both columns, as for Qwen-Image: the table serves the dialects (`diffusion_model.`
read by diffusers' `_convert_non_diffusers_hidream_lora_to_diffusers`, `transformer.`, `lora_unet_`) and the base
layouts. `{e}` is a routed expert of the mixture-of-experts MLP (`ff_i`); its `gate` is a bare parameter, not a
linear layer, and no trainer targets it. Consumed by loraport/names/dit.py. Spec: formats/dit.md."""

_BLOCK = ("adaLN_modulation.1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out",
          "ff_i.shared_experts.w1", "ff_i.shared_experts.w2", "ff_i.shared_experts.w3",
          "ff_i.experts.{e}.w1", "ff_i.experts.{e}.w2", "ff_i.experts.{e}.w3")
_DOUBLE_ONLY = ("attn1.to_q_t", "attn1.to_k_t", "attn1.to_v_t", "attn1.to_out_t", "ff_t.w1", "ff_t.w2", "ff_t.w3")

HIDREAM_MODULES: tuple[str, ...] = (
    *(f"double_stream_blocks.{{i}}.block.{m}" for m in _BLOCK + _DOUBLE_ONLY),
    *(f"single_stream_blocks.{{s}}.block.{m}" for m in _BLOCK),
    "t_embedder.timestep_embedder.linear_1", "t_embedder.timestep_embedder.linear_2",
    "p_embedder.pooled_embedder.linear_1", "p_embedder.pooled_embedder.linear_2",
    "x_embedder.proj", "caption_projection.{i}.linear", "final_layer.linear", "final_layer.adaLN_modulation.1",
)
HIDREAM_ANCHOR = "double_stream_blocks.0.block.attn1.to_q_t.weight"  # a tensor only HiDream's transformer has
# diffusers module (canonical)  == original module
HIDREAM_ROWS: tuple[tuple[str, str], ...] = tuple((m, m) for m in HIDREAM_MODULES)
