"""onnxruntime sessions: explicit providers, the onnxruntime/onnxruntime-gpu clash check, adapters kept alive.

Providers are always passed explicitly and read back with `sess.get_providers()`: onnxruntime-gpu without
a working CUDA silently falls back to CPU. The qdq accuracy level is pinned (default 0) because ORT's CPU EP
otherwise fuses DequantizeLinear→MatMul into MatMulNBits with int8 activations (accuracy_level 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraport.errors import BadInputError

QDQ_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
PROVIDER_CHOICES = ("auto", "cuda", "cpu")


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise BadInputError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
    _check_single_install()
    return onnxruntime


def _check_single_install() -> None:
    from importlib import metadata

    have = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            have.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(have) == 2:
        raise BadInputError("both onnxruntime and onnxruntime-gpu are installed; they overwrite each other. Run "
                            "`pip uninstall -y onnxruntime onnxruntime-gpu` and reinstall exactly one")


def providers_for(choice: str = "auto") -> list[str]:
    rt = ort()
    avail = rt.get_available_providers()
    choice = (choice or "auto").lower()
    if choice not in PROVIDER_CHOICES:
        raise BadInputError(f"--provider {choice!r}: choose auto, cuda or cpu")
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise BadInputError("--provider cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu "
                                "instead of onnxruntime)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]


@dataclass
class Session:
    """An InferenceSession plus what it actually runs on, and the adapters it has loaded (kept referenced for
    as long as the session: ORT's RunOptions only hold raw pointers to them)."""

    sess: object
    requested: list[str]
    providers: list[str]
    qdq_accuracy_level: str
    _adapters: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.sess.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.sess.get_outputs()]

    @property
    def with_past(self) -> bool:
        """Whether the graph has KV-cache inputs (`convert --to onnx --with-past`; layout in onnx/past.py)."""
        from loraport.onnx.past import past_inputs

        return bool(past_inputs(self.sess.get_inputs()))

    def run_steps(self, feeds: dict, splits: list[int], adapter: str | Path | None = None):
        """Run a whole sequence through a with-past graph in chunks ending at `splits` (first with an empty
        past, each later one fed the previous `present.*`); returns the concatenated logits."""
        from loraport.onnx.past import run_steps

        return run_steps(lambda f: self.run(f, adapter), self.sess.get_inputs(), self.output_names, feeds, splits)

    def run(self, feeds: dict, adapter: str | Path | None = None):
        """Run with at most one active .onnx_adapter (never through IOBinding, which ignores adapters)."""
        rt = ort()
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        if adapter is None:
            return self.sess.run(None, feeds)
        key = str(adapter)
        if key not in self._adapters:
            a = rt.LoraAdapter()
            a.Load(key)  # str path: Path objects are refused by the binding
            ro = rt.RunOptions()
            ro.add_active_adapter(a)
            self._adapters[key] = (a, ro)
        return self.sess.run(None, feeds, self._adapters[key][1])


def open_session(model: str | Path, provider: str = "auto", qdq_accuracy_level: str = "0",
                 strict_provider: bool = True) -> Session:
    rt = ort()
    req = providers_for(provider)
    so = rt.SessionOptions()
    so.log_severity_level = 3  # LoRA inputs are overridable initializers: one warning each otherwise
    if qdq_accuracy_level is not None:
        so.add_session_config_entry(QDQ_ACCURACY_KEY, str(qdq_accuracy_level))
    try:
        sess = rt.InferenceSession(str(model), so, providers=req)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise BadInputError(f"{model}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None
    got = list(sess.get_providers())
    if strict_provider and provider == "cuda" and got[0] != "CUDAExecutionProvider":
        raise BadInputError(f"--provider cuda: onnxruntime fell back to {got[0]} (CUDA/cuDNN libraries missing?)")
    return Session(sess, req, got, str(qdq_accuracy_level))
