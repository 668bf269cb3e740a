"""The command line of the explain report: `python -m jaxdec.tools.explain --help`."""

from __future__ import annotations

import argparse
import pathlib
import sys

import jaxdec.tools.explain
from jaxdec import family
from jaxdec.tools.explain.loading import RANDOM_MODELS, load_checkpoint, random_model
from jaxdec.tools.explain.report import explain
from jaxdec.tools.explain.text import DEFAULT_DATES_TEXT, DEFAULT_LM_TEXT


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(prog="python -m jaxdec.tools.explain",
                                     description=jaxdec.tools.explain.__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a train.py run's checkpoints folder, e.g. runs/stdlib/checkpoints")
    parser.add_argument("--task", choices=sorted(RANDOM_MODELS), default=None,
                        help="without --checkpoint: the random model's family (lm: decoder-only, "
                             "dates: encoder-decoder); with it, must match the run")
    parser.add_argument("--out", help="output folder (default: <run>/explain, or runs/explain-<task>)")
    parser.add_argument("--text", help=f"the input (default {DEFAULT_LM_TEXT!r}; dates: {DEFAULT_DATES_TEXT!r})")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens decoded for the cost picture")
    parser.add_argument("--samples", type=int, default=8, help="prefix lengths timed on the uncached path")
    parser.add_argument("--repeats", type=int, default=5, help="timings per measurement (the fastest is kept)")
    parser.add_argument("--seed", type=int, default=0, help="the random model's init seed")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.checkpoint:
            loaded = load_checkpoint(args.checkpoint)
            task = "dates" if family.of(loaded.config).takes_source else "lm"
            if args.task is not None and args.task != task:
                raise ValueError(f"--task {args.task} does not match the checkpoint, a {task} run")
            out = args.out or pathlib.Path(args.checkpoint).parent / "explain"
        else:
            task = args.task or "lm"
            loaded = random_model(task, args.seed)
            out = args.out or pathlib.Path("runs") / f"explain-{task}"
        path = explain(loaded, out, text=args.text, new_tokens=args.new_tokens, samples=args.samples,
                       repeats=args.repeats)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    print(f"report: {path} (and its PNGs in {path.parent})")
    return path


if __name__ == "__main__":
    main()
