"""`python -m jaxdec.tools.bench`: benchmarks that print JSON lines (never asserted in unit tests).

`python -m jaxdec.tools.bench --help` lists the commands. Modules: `__main__` (the command
line), `decode` (generate tokens/s, cached and uncached, and where a step's time goes), `train`
(train-step tokens/s, sharded or not), `models` (GPT-2 small and the pretrained SmolLM2 beside
Hugging Face), `scaling` (cost vs capacity, prompt, early exit, depth) and `plots` (its figure),
`machine` (this machine's matmul peak and read bandwidths), `baselines` (decoders that exist only
to be measured against), `common` (the benchmark models and the thread setting every line reports).
Times come from `jaxdec.tools.timing`, FLOPs and bytes from `jaxdec.tools.costs`.
"""
