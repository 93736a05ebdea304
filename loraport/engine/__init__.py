"""The merge engine, one module per stage (see /shared design: plan → apply → stream → sinks):

* `sources` — the base layouts, chosen by a registry when a base is opened; `resolve_target`, the one place
  an adapter target is matched to base tensors.
* `plan`    — every target resolved against the base and oriented; failures before a byte is written.
* `vocab`   — the plan's vocabulary rules: resized embeddings/heads, tied heads (untie), the adapter's tokenizer.
* `apply`   — the pure per-tensor math W' = W + Σ wᵢ·ΔWᵢ in fp32, on any device.
* `layout`  — the output files, keys, dtypes and shapes (headers known before the first write).
* `stream`  — the one pipeline: read ► apply ► write in three threads, bounded buffers (`buffers`), the CUDA
  stager (`device`), progress and the finite check.
* `sinks`   — safetensors shards (O_DIRECT writer; the bitsandbytes layout is the quantizer's entries in them)
  and the side files (indexes, config.json).

`loraport.merging.merge` is the entry point. Importing this package loads nothing: import the stage you need.

Not unified yet (issue 16): the ONNX export's `loraport.onnx.weights.WeightSource` + prestream thread and
`loraport.onnx.baking.bake` run their own loops over `plan` + `apply` (they import build_plan / merged_tensor
from here) with their own buffer reuse and name fall-backs, and write ONNX external data themselves; the next
step is an ONNX source (initializers by name, matched by value against a reference) and an ONNX external-data
sink driven by `stream.Stream`, which would give them the finite check and the byte budget.
"""
