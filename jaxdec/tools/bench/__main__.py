"""Benchmarks that print JSON lines (never asserted in unit tests).

    python -m jaxdec.tools.bench decode [--repeats 5] [--batches 1 8] [--model decoder|seq2seq]
    python -m jaxdec.tools.bench breakdown [--batches 1 8]
    python -m jaxdec.tools.bench train [--mesh data=8 fsdp=8 data=2,fsdp=2,tensor=2]   (JAX_NUM_CPU_DEVICES=8)
    python -m jaxdec.tools.bench gpt2 [--batches 1 8] [--bf16] [--no-hf]   (GPT-2 small decode: fraction
        of the memory-bandwidth limit at batch 1, and beside Hugging Face generate)
    python -m jaxdec.tools.bench smollm2 [--batches 1 8] [--new-tokens 64] [--repeats 3] [--no-hf]
        (the pretrained SmolLM2-135M-Instruct from its GGUF file, chat prompts of mixed
        lengths: the same figures, beside transformers' own GGUF-loaded model)
    python -m jaxdec.tools.bench scaling [--quick] [--out scaling.png]   (cost vs capacity, prompt,
        early exit and depth; writes a figure)
    python -m jaxdec.tools.bench memory [--widths 256 512 1024] [--memory-gib 24]   (train-step memory per remat policy)
    python -m jaxdec.tools.bench speculative [--batches 1 8] [--num-tokens 4] [--no-hf]   (SmolLM2:
        oracle, random and prompt-lookup drafts vs plain greedy, beside transformers' prompt lookup)
    python -m jaxdec.tools.bench --single-thread decode   (XLA on one thread)

Each figure is the median of `repeats` timed runs after one warm-up (compile) run; the thread
setting is reported with every line, since on a small CPU it changes the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxdec.tools.bench import memory
from jaxdec.tools.bench.decode import bench_decode, bench_decode_breakdown, bench_decode_seq2seq
from jaxdec.tools.bench.models import bench_gpt2, bench_smollm2
from jaxdec.tools.bench.scaling import bench_scaling
from jaxdec.tools.bench.speculative import bench_speculative
from jaxdec.tools.bench.train import bench_train


SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxdec.tools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single-thread", action="store_true",
                        help=f"run XLA on one thread (XLA_FLAGS={SINGLE_THREAD_FLAGS!r}); "
                             "faster for decoding on a small CPU")
    sub = parser.add_subparsers(dest="what", required=True)
    dec = sub.add_parser("decode", help="cached vs uncached generate tokens/s")
    dec.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    dec.add_argument("--repeats", type=int, default=5)
    dec.add_argument("--new-tokens", type=int, default=256)
    dec.add_argument("--no-uncached", action="store_true")
    dec.add_argument("--model", choices=["decoder", "seq2seq"], default="decoder")
    brk = sub.add_parser("breakdown", help="where a cached decode step's time goes")
    brk.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    brk.add_argument("--repeats", type=int, default=5)
    tr = sub.add_parser("train", help="train-step tokens/s and fraction of matmul peak")
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--seq", type=int, default=256)
    tr.add_argument("--steps", type=int, default=10)
    tr.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    tr.add_argument("--mesh", nargs="+", default=[None],
                    help="one row per mesh, e.g. data=8 fsdp=8 data=2,fsdp=2,tensor=2 (set "
                         "JAX_NUM_CPU_DEVICES=8 to simulate 8 CPU devices)")
    g2 = sub.add_parser("gpt2", help="GPT-2 small decode: fraction of the bandwidth limit, vs HF generate")
    g2.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    g2.add_argument("--new-tokens", type=int, default=64)
    g2.add_argument("--repeats", type=int, default=3)
    g2.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    g2.add_argument("--bf16", action="store_true", help="also decode with bfloat16 weights")
    sm = sub.add_parser("smollm2", help="pretrained SmolLM2-135M (GGUF) decode, vs transformers generate")
    sm.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    sm.add_argument("--new-tokens", type=int, default=64)
    sm.add_argument("--repeats", type=int, default=3)
    sm.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    sc = sub.add_parser("scaling", help="cost vs capacity, prompt length, early exit and depth")
    sc.add_argument("--quick", action="store_true", help="small sweeps (a smoke run)")
    sc.add_argument("--out", default="scaling.png", help="where to write the figure")
    memory.add_parser(sub)
    sp = sub.add_parser("speculative", help="SmolLM2 speculative decoding: oracle, random, prompt lookup vs plain")
    sp.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    sp.add_argument("--num-tokens", type=int, default=4)
    sp.add_argument("--new-tokens", type=int, default=96)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--tasks", nargs="+", default=["grounded", "chat"], choices=["grounded", "chat"])
    sp.add_argument("--no-hf", action="store_true", help="skip transformers' prompt lookup")
    args = parser.parse_args(argv)
    if args.single_thread and SINGLE_THREAD_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        # XLA reads its flags once, when the backend starts: rerun this command with them set.
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}".strip()}
        args_list = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "jaxdec.tools.bench", *args_list], env)
    if args.what == "memory":
        args.run(args)
    elif args.what == "speculative":
        bench_speculative(tuple(args.batches), num_tokens=args.num_tokens, new_tokens=args.new_tokens,
                          repeats=args.repeats, tasks=tuple(args.tasks), hf=not args.no_hf)
    elif args.what == "scaling":
        bench_scaling(args.quick, args.out)
    elif args.what == "gpt2":
        bench_gpt2(tuple(args.batches), new_tokens=args.new_tokens, repeats=args.repeats,
                   hf=not args.no_hf, dtypes=("float32", "bfloat16") if args.bf16 else ("float32",))
    elif args.what == "smollm2":
        bench_smollm2(tuple(args.batches), new_tokens=args.new_tokens, repeats=args.repeats, hf=not args.no_hf)
    elif args.what == "breakdown":
        bench_decode_breakdown(tuple(args.batches), repeats=args.repeats)
    elif args.what == "train":
        for mesh in args.mesh:
            bench_train(args.batch, args.seq, args.steps, args.dtype, mesh)
    elif args.what == "decode" and args.model == "seq2seq":
        bench_decode_seq2seq(tuple(args.batches), new_tokens=min(args.new_tokens, 128),
                             repeats=args.repeats, uncached=not args.no_uncached)
    elif args.what == "decode":
        bench_decode(tuple(args.batches), new_tokens=args.new_tokens, repeats=args.repeats,
                     uncached=not args.no_uncached)


if __name__ == "__main__":
    main()
