"""The merge engine, one module per stage (see /shared design: plan → apply → stream → sinks):

* `sources` — the base layouts, chosen by a registry when a base is opened; `resolve_target`, the one place
  an adapter target is matched to base tensors.
* `plan`    — every target resolved against the base and oriented; failures before a byte is written.
* `vocab`   — the plan's vocabulary rules: resized embeddings/heads, tied heads (untie), the adapter's tokenizer.
* `apply`   — the pure per-tensor math W' = W + Σ wᵢ·ΔWᵢ in fp32, on any device.
* `layout`  — the output files, keys, dtypes and shapes (headers known before the first write).
* `stream`  — the one pipeline: read ► apply ► write in three threads, bounded buffers (`buffers`), the CUDA
  stager (`device`), progress and the finite check.
* `sinks`   — the sink role (`Sink`); safetensors shards (the chunked writer of loraport/chunk_sink.py, with
  write-behind; the bitsandbytes layout is the quantizer's entries in them) and the side files (indexes,
  config.json).
* `reading` — what the stream does besides reading a plain safetensors base: its sha256 from those reads
  (loraport/hash_tap.py) and, when it is too big to stay cached, dropping it behind (loraport/pagecache.py).

`loraport.merging.merge` is the entry point for a merge. Importing this package loads nothing: import the stage
you need.

ONNX runs through the same stream (issue 16): `convert --to onnx` streams the graph's initializers from
`loraport.onnx.weights.GraphSource` (checkpoint tensors under the graph's names, the capture's buffers; a
quantized graph's weights through `loraport.onnx.quantize.GraphQuantizer`), and baking into an .onnx base
streams a foreign model's initializers from `loraport.onnx.initializers.InitializerSource`; both write through
`loraport.onnx.sink.OnnxDataSink` (ONNX external data). So export, bake and merge share one read ► apply ► write
loop: the byte budget, reused buffers, the CUDA stager, progress and the NaN/Inf check (`--fail-on-nonfinite`).
The layout is the contract: each tensor is written in its layout entry's dtype. This package imports nothing of
loraport.onnx (which is built on it).
"""
