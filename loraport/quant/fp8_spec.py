"""What one fp8 weight of a base (or of an output) is: its layout kind, the stored tensors it is rebuilt from
and how it is written back. Shared by the fp8 source (fp8_checkpoint) and sink (fp8_quantizer)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MARKER = "scaled_fp8"  # ComfyUI: an empty tensor at the root of a scaled-fp8 file, its dtype the fp8 type


@dataclass
class Fp8Spec:
    """One fp8 weight: its layout kind, the stored tensors it is rebuilt from and how to write it back."""

    kind: str  # fp8.KINDS
    weight: str
    fp8: torch.dtype  # stored code dtype
    shape: tuple[int, ...]
    aux: dict[str, str] = field(default_factory=dict)  # role -> global name: "scale", "input_scale", "marker"
    scale_dtype: torch.dtype | None = None
    scale_shape: tuple[int, ...] | None = None
    block: tuple[int, int] | None = None  # the scale's tile: block (bm, bn), group (1, g), ct-block (bh, bw)
    ue8m0: bool = False  # block: power-of-two scales (config scale_fmt "ue8m0"; stored fp32, or uint8 bytes)
    dtype: torch.dtype = torch.float32  # served dtype (the merge works on the fp32 dequantized weight)

    @property
    def tiled(self) -> bool:
        """The scale is one per tile of the weight (`block`: DeepSeek / FineGrainedFP8, compressed-tensors `group` /
        `block`), not per tensor or per row."""
        return self.block is not None
