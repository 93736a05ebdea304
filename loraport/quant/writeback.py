"""The part the fp8 and MXFP4 sinks share: each either writes a quantized base's own layout back (`src`, that
base's checkpoint) or quantizes a 16-bit base into the layout its consumers load. Options are the compute dtype
only; config.json keeps a quantized base's `quantization_config`; 16-bit output is `--dtype bf16` (omitting
--quantize on such a base keeps its layout, so the generic hint would not help)."""

from __future__ import annotations

from loraport.errors import BadInputError
from loraport.quant.quantizer import BnbQuantizer


class WritebackQuantizer(BnbQuantizer):
    write_16bit = "(--dtype bf16)"

    def __init__(self, compute_dtype=None, dtype=None, metrics: bool = True, source=None, **unknown):
        """`source`: a quantized base in this sink's layout, whose layout is written back."""
        if unknown:
            raise BadInputError(f"unknown {self.name} option(s): {', '.join(sorted(unknown))}")
        super().__init__(compute_dtype, dtype, metrics)
        self.src = source

    def config_update(self, config: dict) -> dict:
        cfg = dict(config)
        if self.src is not None:
            if self.src.quantization_config is not None:
                cfg["quantization_config"] = self.src.quantization_config
            return cfg
        return self._config_16bit(cfg)

    def _config_16bit(self, cfg: dict) -> dict:
        """config.json (a copy, free to change) for a 16-bit base quantized into this layout."""
        raise NotImplementedError
