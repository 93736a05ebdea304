"""The README is the front door: its support matrix must be the registry's, its specs must exist, the
commands it documents must exist with the flags it shows, its set-up block must be what CI runs, and every
`loraport ...` line of its code blocks must run as written (on tiny models laid out under the README's names)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraport.cli import main
from loraport.formats import formats, support_matrix

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_support_matrix_matches_registry():
    block = re.search(r"<!-- support-matrix:start -->\n(.*?)\n<!-- support-matrix:end -->", README, re.S)
    assert block, "README lacks the support-matrix markers"
    assert block.group(1).strip() == support_matrix().strip(), (
        "README support matrix is out of date: paste the output of `loraport formats`"
    )


def test_every_format_has_a_spec():
    for name, f in formats().items():
        assert (ROOT / "formats" / f"{f.spec or name}.md").is_file(), f"format {name} has no spec"


def test_readme_commands_exist_with_their_flags():
    """Every `loraport <cmd> ... --flag` line in a README code block names a real command and real flags."""
    runner = CliRunner()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README, re.S)
    lines = [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    checked = 0
    for ln in lines:
        m = re.match(r"loraport (\w[\w-]*)(.*)", ln)
        if not m:
            continue
        cmd, rest = m.group(1), m.group(2)
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0, f"README mentions `loraport {cmd}`, which does not exist"
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest.split("#")[0]):
            assert flag in res.output, f"README shows `loraport {cmd} {flag}`, which the command does not accept"
        checked += 1
    assert checked >= 5, "expected the README recipes to show loraport commands"


# ------------------------------------------------------------------------------------------------ set-up block
def _setup_block() -> list[str]:
    sec = README.split("## Set up and test", 1)[1]
    block = re.search(r"```bash\n(.*?)```", sec, re.S).group(1)
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]


def test_setup_block_installs_cpu_torch_first_and_ci_runs_its_test_command():
    lines = _setup_block()
    torch_i = next(i for i, ln in enumerate(lines) if re.match(r"pip install \S*torch==", ln))
    dev_i = lines.index('pip install -e ".[dev]"')
    assert torch_i < dev_i < len(lines) - 1, "the CPU torch must be installed before the [dev] extra, tests last"
    # the block's line is the one CI runs (the CPU build is what this machine's index serves for the pin); the
    # prose right after it names PyTorch's CPU index for indexes that serve the CUDA build instead
    section = README.split("## Set up and test", 1)[1].split("\n## ", 1)[0]
    assert "download.pytorch.org/whl/cpu" in section, "the set-up section must say where the CPU build comes from"
    test_cmd = lines[-1]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert any(ln == test_cmd or ln.startswith(test_cmd + " ||") for ln in ci), (
        f"`.ci/run` must run the README's test command `{test_cmd}` as written")
    ci_torch = next(i for i, ln in enumerate(ci) if "torch==" in ln)
    assert ci_torch < next(i for i, ln in enumerate(ci) if '-e ".[dev]"' in ln), ".ci/run: torch before [dev]"
    version = re.search(r"torch==([\w.]+)", lines[torch_i]).group(1)
    assert f"torch=={version}" in ci[ci_torch], "README and .ci/run pin different torch versions"


def test_plain_pytest_finds_the_test_helpers():
    """`pytest` (not only `python -m pytest`) must import tests/_*_util.py: the root is on pythonpath."""
    import tomllib

    opts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    assert "." in opts.get("pythonpath", []) and opts.get("testpaths") == ["tests"]


# ------------------------------------------------------------------------------------------------ run every recipe
F = ROOT / "fixtures"
# the README's placeholder names -> the tiny fixture laid out under that exact name (README order of appearance)
LAYOUT = {
    "my-adapter": F / "llm" / "peft" / "llama_lora",          # PEFT LoRA of the Llama fixture
    "Llama-3-8B": F / "llm" / "bases" / "llama",
    "style": F / "llm" / "peft" / "llama_lora",
    "domain": F / "llm" / "peft" / "llama_rslora",
    "pixel-art.safetensors": F / "sd" / "kohya_peft.safetensors",  # kohya LoRA of the SD fixture
    "stable-diffusion-v1-5": F / "sd" / "base",                    # diffusers folder
    "llama": F / "quant" / "llama-bf16",                           # the 16-bit model behind llama-bnb-4bit
    "llama-bnb-4bit": F / "quant" / "llama-nf4-dq",                # as transformers + bitsandbytes save it
    "qlora-adapter": F / "quant" / "lora-small",
    "lora": F / "quant" / "lora-small",
    "qa": F / "quant" / "lora-small",
    "another-adapter": F / "quant" / "lora-small",
    "my-flux-lora.safetensors": F / "dit" / "flux_kohya.safetensors",   # kohya Flux LoRA of the micro Flux
    "flux1-dev.safetensors": F / "dit" / "flux-bfl.safetensors",        # BFL single file
}
BUILT = ("sd_xl_base_1.0.safetensors", "Llama-3-8B-tuned", "summarize", "model.onnx",  # made by _workspace
         "flux1-dev-fp8.safetensors", "llama-Q8_0.gguf", "flux1-dev-Q4_0.gguf")
# lines another test already runs verbatim (the demo: ~5-13 s, as a subprocess, offline, in test_cli_core)
RUN_ELSEWHERE = {"loraport demo": "tests/test_cli_core.py::test_demo_offline_under_a_minute"}


def _readme_commands() -> list[tuple[int, list[str]]]:
    """(block index, the block's `loraport ...` lines joined across backslash continuations) per code block."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README, re.S)
    out = []
    for i, b in enumerate(blocks):
        cmds = [ln.strip() for ln in b.replace("\\\n", " ").splitlines() if ln.strip().startswith("loraport ")]
        if cmds:
            out.append((i, cmds))
    return out


def _needs_onnx(cmds: list[str]) -> bool:
    return any("--to onnx" in c or ".onnx" in c for c in cmds)


def _sd_single_file(dst: Path) -> None:
    """The SD fixture as an original single-file checkpoint (model.diffusion_model.*, cond_stage_model.*)."""
    from safetensors.torch import load_file

    from tests._sd_util import save_single

    base = F / "sd" / "base"
    flat = {"unet." + k: v for k, v in load_file(base / "unet" / "diffusion_pytorch_model.safetensors").items()}
    flat.update({"text_encoder." + k: v for k, v in load_file(base / "text_encoder" / "model.safetensors").items()})
    save_single(flat, dst, xl=False)


def _second_adapter(src: Path, dst: Path) -> None:
    """Another adapter for the same base: lora-small with its B factors halved and negated."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(src / "adapter_model.safetensors")
    save_file({k: (-0.5 * v if "lora_B" in k else v).contiguous() for k, v in t.items()},
              dst / "adapter_model.safetensors", {"format": "pt"})


def _onnx_base(llama: Path, dst: Path) -> None:
    """A model someone else exported: torch.onnx (TorchScript exporter) of the 16-bit Llama, logits only."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from tests._onnx_util import LogitsOnly

    m = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    ids = torch.randint(0, m.config.vocab_size, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(m), (ids, torch.ones_like(ids)), str(dst), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})


def _fp8_single_file(dst: Path) -> None:
    """The micro Flux BFL file as the fp8 files people download store it: matrices float8_e4m3fn, the rest bf16."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(F / "dit" / "flux-bfl.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn if v.dim() == 2 else torch.bfloat16) for k, v in sd.items()}, dst)


def _gguf_base(dst: Path) -> None:
    """The Llama fixture as llama.cpp's converter lays it out, Q8_0 (written by gguf-py: tests/_gguf_base_util)."""
    from tests._gguf_base_util import make_llama_gguf

    make_llama_gguf(dst, "Q8_0")


def _comfy_gguf(dst: Path) -> None:
    """The micro Flux as ComfyUI-GGUF lays it out, Q4_0 where rows are whole blocks (tests/_gguf_dit_util)."""
    from safetensors.torch import load_file

    from tests._gguf_dit_util import comfy_gguf

    comfy_gguf(load_file(LAYOUT["flux1-dev.safetensors"]), dst, "flux", "Q4_0", small=0)


def _workspace(root: Path, onnx: bool) -> Path:
    """A folder holding every input the README names, under its README name."""
    from loraport.merging import merge

    ws = root / "readme"
    ws.mkdir()
    for name, src in LAYOUT.items():
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, ws / name)
    _sd_single_file(ws / "sd_xl_base_1.0.safetensors")
    # a fine-tuned model to extract from: the base with a real LoRA merged in
    merge(ws / "Llama-3-8B", [(ws / "domain", 1.0)], ws / "Llama-3-8B-tuned", device="cpu", manifest=False)
    _second_adapter(ws / "qa", ws / "summarize")
    _fp8_single_file(ws / "flux1-dev-fp8.safetensors")
    _gguf_base(ws / "llama-Q8_0.gguf")
    _comfy_gguf(ws / "flux1-dev-Q4_0.gguf")
    (ws / "jobs.json").write_text(re.search(r"```json\n(.*?)```", README, re.S).group(1))  # the README's, verbatim
    if onnx:
        _onnx_base(ws / "llama", ws / "model.onnx")
    return ws


def _run(line: str) -> str:
    """Run one README line as written, in-process: `> FILE` redirects stdout, `# ...` is a comment."""
    from loraport.cli import main

    argv = shlex.split(line, comments=True)
    assert argv[0] == "loraport"
    argv, redirect = argv[1:], None
    if ">" in argv:
        i = argv.index(">")
        argv, redirect = argv[:i], argv[i + 1]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, f"README line failed (exit {r.exit_code}): {line}\n{r.stderr[-2000:]}"
    if redirect:
        Path(redirect).write_text(r.stdout, encoding="utf-8")
    return r.stdout


def _run_blocks(tmp_path, monkeypatch, onnx: bool) -> list[str]:
    monkeypatch.setenv("LORAPORT_NO_GC_FREEZE", "1")  # many commands in one process: keep gc working
    ws = _workspace(tmp_path, onnx)
    monkeypatch.chdir(ws)
    ran = []
    for _, cmds in _readme_commands():
        if _needs_onnx(cmds) != onnx:
            continue
        for line in cmds:
            if line in RUN_ELSEWHERE:
                continue
            _run(line)
            ran.append(line)
    return ran


def test_readme_recipes_run_as_written(tmp_path, monkeypatch):
    """Every `loraport` line of the README's non-ONNX blocks, verbatim, in README order, in one folder that
    holds the README's inputs: a stale flag, a renamed option or two recipes writing the same --out fail here."""
    ran = _run_blocks(tmp_path, monkeypatch, onnx=False)
    verbs = {shlex.split(c)[1] for c in ran}
    assert {"inspect", "merge", "verify", "convert", "extract", "resize", "combine"} <= verbs, verbs
    ws = tmp_path / "readme"
    assert (ws / "merged" / "loraport-manifest.json").is_file() and (ws / "sdxl-pixel.safetensors").is_file()
    assert (ws / "merged-nf4" / "config.json").is_file() and (ws / "my-adapter.gguf").is_file()
    assert (ws / "flux-merged-fp8.safetensors").is_file() and (ws / "merged-Q8_0.gguf").is_file()
    for name, src in LAYOUT.items():  # the inputs are untouched
        if src.is_dir():
            assert all((ws / name / f.relative_to(src)).read_bytes() == f.read_bytes()
                       for f in src.rglob("*") if f.is_file()), name


@pytest.mark.slow
def test_readme_onnx_recipes_run_as_written(tmp_path, monkeypatch):
    """The ONNX blocks (three exports: ~15 s on 2 cores): `pytest -m slow tests/test_readme.py`."""
    ran = _run_blocks(tmp_path, monkeypatch, onnx=True)
    assert any("--multi-lora" in c for c in ran) and any(c.startswith("loraport validate") for c in ran)
    parity = json.loads((tmp_path / "readme" / "parity.json").read_text(encoding="utf-8"))
    assert parity, "validate --json wrote nothing"


def test_lines_run_elsewhere_are_run_there():
    src = (ROOT / "tests" / "test_cli_core.py").read_text(encoding="utf-8")
    assert '"demo"' in src and "def test_demo_offline_under_a_minute" in src
    assert set(RUN_ELSEWHERE) <= {c for _, cmds in _readme_commands() for c in cmds}


def test_readme_names_only_inputs_the_test_lays_out():
    """Every ./path a README command reads is laid out above or written by an earlier README line."""
    written: set[str] = set()
    known = set(LAYOUT) | set(BUILT)
    for _, cmds in _readme_commands():
        for line in cmds:
            argv = shlex.split(line, comments=True)
            outs = {argv[i + 1][2:] for i, a in enumerate(argv[:-1]) if a == "--out"}
            reads = {a[2:] for a in argv if a.startswith("./")} - outs
            missing = {r for r in reads if r not in known and r not in written}
            assert not missing, f"README line reads {sorted(missing)}, which tests/test_readme.py does not lay out"
            written |= outs
