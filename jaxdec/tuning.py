"""Platform tuning as data: how a program is computed on one platform, never what it computes.

A `Tuning` holds every choice made for speed on one platform: attention block and chunk sizes,
layer unrolls and per-layer weight splitting, the one-query attention's form, the argmax's form,
the training pass's causal query blocks and row groups, and the decode programs' compiler
options. It is frozen and hashable, resolved once per platform (`for_platform`) and passed
where it is used, as a static argument, so it is part of every compiled program's key: two
platforms never share a program, and a test can compile any tuning without touching a global.

Results do not depend on the tuning beyond float rounding: tokens, losses and dropout masks are
the same under every tuning (dropout draws per row, not per row group). One exception, in
distribution only: speculative decoding with a stochastic sampler verifies drafts in the rounds
`verify_row_cost` says pay, and the random draws follow the rounds taken; their distribution is
the same under every tuning (greedy tokens are the same).

`CPU` holds the choices measured on 2-core x86 CPUs (`python -m jaxdec.tools.bench decode | train |
gpt2 | scaling`; the figures are in docs/performance.md). Every other platform gets `PLAIN`:
einsum dots, `jnp.argmax`, scanned layers, one causal pass, one row group and XLA's default
compiler options, until a measurement on that platform says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Speed choices of one platform (module docstring).

    Attributes:
      cache_block: key slots per attention block of a cached step: a cache of at most this many
        slots is read in one pass, a longer one block by block up to the newest key (and from
        the oldest key a sliding window still sees), so a step costs the filled length.
      prefill_chunk: query rows per prefill chunk; the prompt buffer is as wide as capacity -
        max_new_tokens, and short prompts still run one whole chunk.
      layer_unroll: blocks traced per layer-scan iteration of a full-sequence pass (training,
        prefix recompute, encoder); 1 keeps compile time that of one block.
      split_layers_max: depth up to which a decode loop reads per-layer weights instead of
        slicing a stacked [L, ...] weight (a CPU dot copies a dynamic slice before reading it);
        the step program then grows with depth, hence the bound. 0: always the stacked scan.
      tied_head_copy: a decode loop over more than one row reads a tied head from a [D, V]
        copy of the embedding made once (a CPU matmul contracting the [V, D] table's minor axis
        for a few rows is slow).
      sum_chunk: a one-query attention step (decoding) computes its scores and values as
        products summed in chunks of at most this many elements, which XLA's CPU compiler
        fuses with the product and reads from the cache in place; 0: einsum dots.
      argmax: "jnp" (`jnp.argmax`) or "two_reductions" (the max, then the lowest index holding
        it: XLA's CPU (value, index) reduction is slower). Same result, ties and NaN included.
      causal_blocks, causal_min_rows: a training pass's causal self-attention runs its queries in
        at most causal_blocks blocks of at least causal_min_rows rows, each reading keys up to
        its own last row only; 1: one pass over the whole square.
      row_groups, row_group_min_tokens: a train step on one device splits its batch into this
        many independent row groups (when each holds at least row_group_min_tokens targets), so
        XLA's CPU runtime overlaps one group's elementwise kernels with another's matmuls.
      decode_compiler_options: XLA compiler options of the decode programs, as sorted (name,
        value) pairs; applied only where this jaxlib accepts them.
      verify_row_cost: what each row beyond the first adds to a cached step's time, as a share
        of a one-row step. Speculative decoding verifies B x (γ + 1) rows where a plain step
        reads B, and verifies only while the drafts it expects each row to have accepted pay
        for that (`speculative.verify_ratio`); 0: rows are free, verify whenever there is a draft.
    """

    cache_block: int = 128
    prefill_chunk: int = 64
    layer_unroll: int = 1
    split_layers_max: int = 0
    tied_head_copy: bool = False
    sum_chunk: int = 0
    argmax: Literal["jnp", "two_reductions"] = "jnp"
    causal_blocks: int = 1
    causal_min_rows: int = 64
    row_groups: int = 1
    row_group_min_tokens: int = 1024
    decode_compiler_options: tuple[tuple[str, str], ...] = ()
    verify_row_cost: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cache_block", "prefill_chunk", "layer_unroll", "causal_blocks", "causal_min_rows",
                     "row_groups", "row_group_min_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Tuning.{name} must be an int >= 1, got {value!r}")
        for name in ("split_layers_max", "sum_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Tuning.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.verify_row_cost, (int, float)) or self.verify_row_cost < 0:
            raise ValueError(f"Tuning.verify_row_cost must be a number >= 0, got {self.verify_row_cost!r}")
        if self.argmax not in ("jnp", "two_reductions"):
            raise ValueError(f"Tuning.argmax must be 'jnp' or 'two_reductions', got {self.argmax!r}")
        object.__setattr__(self, "decode_compiler_options", tuple(sorted(self.decode_compiler_options)))


# The plain forms: every platform without measurements of its own.
PLAIN = Tuning()

# Chosen by measurements on 2-core x86 CPUs (docs/performance.md has the figures and machines).
CPU = Tuning(
    layer_unroll=4,
    split_layers_max=16,
    tied_head_copy=True,
    sum_chunk=32,
    argmax="two_reductions",
    causal_blocks=2,
    row_groups=2,
    # XLA's CPU compiler hands matmuls to YNNPACK by default; a cached step multiplies only a
    # few rows by each weight, where XLA's own dots were faster.
    decode_compiler_options=(("xla_cpu_experimental_ynn_fusion_type", ""),),
    # A CPU step streams the weights once per step whatever the rows, but each row adds its
    # own matrix-vector work (`python -m jaxdec.tools.bench speculative` prints the ratio).
    verify_row_cost=0.06,
)

BY_PLATFORM = {"cpu": CPU}


def for_platform(platform: str | None = None) -> Tuning:
    """The tuning of `platform` ("cpu", "gpu"/"cuda"/"rocm", "tpu"); None: JAX's default backend."""
    platform = jax.default_backend() if platform is None else platform
    return BY_PLATFORM.get(platform, PLAIN)


def platform_of(tree, mesh=None) -> str | None:
    """The platform a program over `tree`'s arrays runs on: the mesh's, else the first array's
    device's, else (numpy leaves) JAX's default backend; None for traced arrays (inside the
    caller's jit, which decides)."""
    leaves = jax.tree.leaves(tree)
    if leaves and isinstance(leaves[0], jax.core.Tracer):
        return None
    if mesh is not None:
        return mesh.devices.flat[0].platform
    if leaves and isinstance(leaves[0], jax.Array):
        return next(iter(leaves[0].devices())).platform
    return jax.default_backend()


def for_arrays(tree, mesh=None) -> Tuning:
    """The tuning of the platform `tree`'s arrays (or the mesh) are on (`platform_of`)."""
    return for_platform(platform_of(tree, mesh))
