"""`loraport demo`: merge a LoRA into a tiny built-in model and prove parity by running inference."""

from __future__ import annotations

import sys

import click

from loraport.console import emit_json, out


def register(group: click.Group) -> None:
    group.add_command(demo_cmd)


@click.command("demo")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--keep", type=click.Path(), default=None, help="keep the demo files in this folder")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def demo_cmd(device, keep, as_json):
    """Build a tiny model + adapter offline, merge them, and check the merged model's outputs."""
    from loraport.demo import run_demo

    if keep:
        from pathlib import Path

        Path(keep).mkdir(parents=True, exist_ok=True)
    r = run_demo(keep, device=device)
    if as_json:
        emit_json(r)
    else:
        p = r["parity"]
        out.print(f"[bold]loraport demo[/bold] — {r['model']}")
        out.print(f"  adapter: PEFT layout, {r['adapter_targets']} LoRA targets (rsLoRA attention r=8, MLP r=4)")
        out.print(f"  merge:   {r['tensors_updated']} tensors updated on {r['device']} in {r['merge_seconds']:.2f}s")
        out.print(f"  parity (merged vs unmerged reference, fp32 logits): max|Δ| {p['max_abs']:.2e}, "
                  f"cosine {p['cosine']:.8f}, top-1 agreement {p['top1_agreement']:.0%}")
        out.print(f"  the adapter changes logits by up to {p['adapter_effect_max_abs']:.3f} (so parity is meaningful)")
        if r["transformers"] is not None:
            hf = r["transformers"]["max_abs"]
            out.print(f"  transformers loads the merged folder: max|Δ| vs our forward {hf:.2e}")
        else:
            out.print("  transformers not installed: skipped loading the merged folder with it")
        out.print(f"  result:  {'[green]PASS[/green]' if r['passed'] else '[red]FAIL[/red]'} "
                  f"(tolerance {r['tolerance']:g}) in {r['seconds']:.1f}s" + (f"; files in {keep}" if keep else ""))
    if not r["passed"]:
        sys.exit(1)
