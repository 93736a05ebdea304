"""Where the exported graph's weights come from: the merge engine, tensor by tensor.

`WeightSource` opens the base checkpoint and the adapters once, plans the merge with
`loraport.merge.build_plan`, and serves `merged(name)` (fp32, on the device) for the parameter names the
graph uses, translating them to the checkpoint's own spelling (a missing model prefix, tied heads).
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraport.adapter import Adapter
from loraport.errors import BadInputError


class WeightSource:
    def __init__(self, base: str | Path, adapters: list[tuple[str | Path | Adapter, float]], device: str = "auto",
                 strict: bool = True, merge: bool = True):
        from loraport.formats import load_adapter
        from loraport.merge import build_plan, open_base, pick_device

        self.base_path = Path(base)
        if not self.base_path.is_dir() or not (self.base_path / "config.json").is_file():
            raise BadInputError(f"--base {base}: ONNX export needs a transformers model folder with config.json")
        self.ckpt = open_base(self.base_path)
        self.config = self.ckpt.config if isinstance(self.ckpt.config, dict) else {}
        self.device = pick_device(device)
        self.adapters: list[tuple[Adapter, float]] = [
            (a if isinstance(a, Adapter) else load_adapter(a, base=self.ckpt), float(w)) for a, w in adapters
        ]
        # the multi-LoRA graph keeps the base weights unmerged; the adapters only go to .onnx_adapter files
        self._files: dict[str, object] = {}
        self.plan = build_plan(self.ckpt, self.adapters if merge else [], strict=strict)

    # names -----------------------------------------------------------------------------------------
    def checkpoint_name(self, name: str) -> str | None:
        """The checkpoint tensor that holds the model parameter `name`, or None."""
        ck = self.ckpt
        if name in ck:
            return name
        parts = name.split(".", 1)
        if len(parts) == 2 and parts[1] in ck:  # checkpoints saved without the base-model prefix (GPT-2)
            return parts[1]
        for n in ck.resolve(name):  # a tied head stored only as the embedding
            return n
        if name.endswith("lm_head.weight") and ck.tied():
            for emb in ("model.embed_tokens.weight", "transformer.wte.weight", "wte.weight"):
                if emb in ck:
                    return emb
        return None

    def merged(self, name: str, want: torch.dtype | None = None) -> torch.Tensor:
        """The merged tensor for model parameter `name`: fp32, or — for a tensor no adapter touches — the
        stored tensor itself when `want` is its dtype (no fp32 round trip, one buffer)."""
        from loraport.merge import merged_tensor

        ck_name = self.checkpoint_name(name)
        if ck_name is None:
            raise BadInputError(f"{self.base_path}: the model built from config.json has a weight {name!r} that "
                                "the checkpoint does not contain (config and weights disagree?)")
        raw = self._read(ck_name)
        if raw is not None and ck_name not in self.plan.updates and raw.dtype == want:
            return raw
        return merged_tensor(self.plan, ck_name, self.device, base_tensor=raw)

    def _read(self, name: str) -> torch.Tensor | None:
        """The base tensor read into private memory (not through the memory map): pages of a mapped file count
        in the process's resident set until unmapped, so reading a whole model through the map would make the
        export's peak RSS grow with the model."""
        try:
            sh, key = self.ckpt.shard_of(name)
            info = sh.file.tensors[key]
        except (AttributeError, KeyError):
            return None  # not a plain safetensors checkpoint (e.g. a dequantizing view): let the engine read it
        f = self._files.get(sh.relpath)
        if f is None:
            f = self._files[sh.relpath] = open(sh.file.path, "rb")
        buf = bytearray(info.nbytes)
        f.seek(info.begin)
        if f.readinto(buf) != info.nbytes:
            raise BadInputError(f"{sh.file.path}: truncated while reading {name}")
        if not buf:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self.ckpt.close()
