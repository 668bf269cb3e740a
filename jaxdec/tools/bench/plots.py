"""The scaling benchmark's figure (matplotlib)."""

from __future__ import annotations


def plot_scaling(rows: list[dict], path: str) -> None:
    """Four panels: tok/s vs capacity, step cost and prefill memory vs prompt, early exit,
    compile seconds vs depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    by = lambda sweep: [r for r in rows if r["sweep"] == sweep]  # noqa: E731
    ax = axes[0]
    for batch in sorted({r["batch"] for r in by("capacity")}):
        pts = [r for r in by("capacity") if r["batch"] == batch]
        ax.plot([r["capacity"] for r in pts], [r["tokens_per_s"] for r in pts], "o-", label=f"batch {batch}")
        ax.plot([r["capacity"] for r in pts], [batch * 1e6 / r["decode_step_us"] for r in pts], "x--",
                label=f"batch {batch}, decode steps only")
    ax.set(xscale="log", xlabel="cache capacity (slots)", ylabel="tokens/s",
           title="same work, growing capacity")
    ax.legend()
    ax = axes[1]
    pts = by("prompt")
    ax.plot([r["prompt"] for r in pts], [r["decode_step_us"] for r in pts], "o-", label="decode step (µs)")
    ax.set(xscale="log", xlabel="prompt length", ylabel="µs per decode step", title="cost follows the filled length")
    twin = ax.twinx()
    twin.plot([r["prompt"] for r in pts], [r["prefill_temp_mib"] for r in pts], "s--", color="tab:red",
              label="prefill working memory (MiB)")
    twin.set_ylabel("prefill working memory (MiB)")
    ax.legend(loc="upper left")
    twin.legend(loc="lower right")
    ax = axes[2]
    pts = by("early_exit")
    ax.bar([str(r["max_new_tokens"]) for r in pts], [r["ms"] for r in pts])
    ax.set(xlabel="max_new_tokens (every row stops at step 1)", ylabel="ms", title="early exit")
    ax = axes[3]
    pts = by("depth")
    ax.plot([r["num_layers"] for r in pts], [r["train_step_compile_s"] for r in pts], "o-", label="train_step")
    ax.plot([r["num_layers"] for r in pts], [r["generate_compile_s"] for r in pts], "s-", label="generate")
    ax.set(xlabel="num_layers", ylabel="compile seconds", title="compile time vs depth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
