"""The device: chosen once (`pick_device`) and passed down; the CUDA context warmed while inputs are read; host →
device copies staged through pinned buffers so they overlap the math."""

from __future__ import annotations

import torch

from loraport.errors import BadInputError


def pick_device(spec: str | None = "auto") -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise BadInputError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError("--device cuda asked for, but CUDA is not available here (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise BadInputError(f"unsupported device {spec!r}")
    return dev


class CudaStager:
    """Host → device copies through two reused pinned buffers on a side stream, so the copy of the next tensor
    runs while the current one is computed. Tensors above `limit` bytes are copied synchronously."""

    def __init__(self, dev: torch.device, limit: int = 256 << 20):
        self.dev, self.limit = dev, limit
        self.stream = torch.cuda.Stream(dev)
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.events: list = [None, None]
        self.i = 0

    def to_device(self, view: torch.Tensor, pinned: bool = False):
        """(device tensor, event): `view` copied to the device. `pinned`: view is page-locked already and stays
        unchanged until the copy is complete (the stream's read buffers go back to its pool only once the merged
        tensor is back on the host), so it is copied from directly, at any size."""
        n = view.numel() * view.element_size()
        if pinned and n:
            return self._copy(view)
        if n == 0 or n > self.limit:
            return view.to(self.dev), None
        k, self.i = self.i, self.i ^ 1
        if self.events[k] is not None:
            self.events[k].synchronize()  # the previous copy out of this pinned buffer is complete
        buf = self.bufs[k]
        if buf is None or buf.numel() < n:
            buf = self.bufs[k] = torch.empty(-(-n // (1 << 20)) << 20, dtype=torch.uint8, pin_memory=True)
        host = buf[:n].view(view.dtype).view(view.shape)
        host.copy_(view)
        t, ev = self._copy(host)
        self.events[k] = ev
        return t, ev

    def _copy(self, host: torch.Tensor):
        with torch.cuda.stream(self.stream):
            t = host.to(self.dev, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return t, ev

    def ready(self, t: torch.Tensor, ev) -> None:
        """Make the compute thread's stream wait for the copy of `t` (and keep t's memory until it is done)."""
        cur = torch.cuda.current_stream(self.dev)
        cur.wait_event(ev)
        t.record_stream(cur)


def warm_cuda(dev: torch.device) -> None:
    try:
        a = torch.ones(64, 64, device=dev)
        (a @ a).sum().item()
        torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    except Exception:  # noqa: BLE001 - only a warm-up: the merge itself reports any CUDA failure
        pass
