"""The tools built on the jaxdec library: what runs it, measures it and shows it.

The library (every other module of `jaxdec`) never imports them; they import the library and
`jaxdec.hf`. Each module holds one concern:

- `run`, `run_folder`: the training run behind `train.py` (config, presets, tasks, the loop) and
  the checks of its run folder (resume, overwrite) made before anything is written.
- `metrics`, `loss_curve`: the run's metrics as JSON lines, and the loss-curve PNG drawn from them.
- `timing`: the one way a tool times JAX work (median or fastest of repeated calls after a
  warm-up, each call waited for with `block_until_ready`).
- `costs`: work counted from a config rather than measured (matmul FLOPs, bytes a decode step
  reads), shared by the benchmarks and the explain report.
- `explain/`: `python -m jaxdec.tools.explain`, the HTML page of masks, attention maps and what
  the KV cache saves.
- `bench/`: `python -m jaxdec.tools.bench`, the benchmarks (JSON lines), with the decoders that
  exist only as their baselines.
"""
