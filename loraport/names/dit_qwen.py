"""Qwen-Image (and Edit) name table rows. Qwen's own release is a diffusers folder and ComfyUI's single file keeps
those names (under `model.diffusion_model.`), so each row is the same module in both columns: the table exists for
the dialects (musubi's `lora_unet_`, diffusion-pipe's `diffusion_model.`, DiffSynth's bare names) and the base
layouts. Consumed by loraport/names/dit.py. Spec: formats/dit.md."""

QWEN_MODULES: tuple[str, ...] = (
    "transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k", "transformer_blocks.{i}.attn.to_v",
    "transformer_blocks.{i}.attn.to_out.0",
    "transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
    "transformer_blocks.{i}.attn.add_v_proj", "transformer_blocks.{i}.attn.to_add_out",
    "transformer_blocks.{i}.img_mod.1", "transformer_blocks.{i}.txt_mod.1",
    "transformer_blocks.{i}.img_mlp.net.0.proj", "transformer_blocks.{i}.img_mlp.net.2",
    "transformer_blocks.{i}.txt_mlp.net.0.proj", "transformer_blocks.{i}.txt_mlp.net.2",
    "img_in", "txt_in", "proj_out", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
)
QWEN_ANCHOR = "transformer_blocks.0.img_mod.1.weight"  # a tensor only Qwen-Image's transformer has
# diffusers module (canonical)  == original module
QWEN_ROWS: tuple[tuple[str, str], ...] = tuple((m, m) for m in QWEN_MODULES)
