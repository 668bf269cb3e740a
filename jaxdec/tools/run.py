"""The training run behind `train.py`: data -> train loop with eval, metrics, checkpoints -> samples.

`RunConfig` is the whole run as one frozen dataclass; `train.py` builds its CLI from it (tyro), so
every flag is a field here or in DecoderConfig / TrainConfig, with no hand-kept list of flags.
What the run may do with its folder is decided first, in `tools.run_folder`; metrics go to
`tools.metrics` and the loss curve to `tools.loss_curve`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxdec import checkpoint, checks, family, sharding
from jaxdec.config import DecoderConfig, Seq2SeqConfig, TrainConfig
from jaxdec.data import (ByteTokenizer, Corpus, dates, eval_batches, load_stdlib_corpus, load_text_corpus,
                         pack_documents, packed_eval_batches, sample_batch, sample_packed_batch)
from jaxdec.data import tokens as token_files
from jaxdec.data.packing import documents_of
from jaxdec.decode import generate
from jaxdec.sampling import TopK
from jaxdec.tools.loss_curve import plot_loss_curve
from jaxdec.tools.metrics import MetricsLog, truncate_after
from jaxdec.tools.run_folder import RunFolder, check_run_folder, describe_files, run_name
from jaxdec.tools.timing import Stopwatch, measure
from jaxdec.training import TrainState, check_batch, create_train_state, eval_step, train_step


TOKENIZER = ByteTokenizer()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run.

    Attributes:
      model: the decoder-only LM (vocab_size must cover the byte tokenizer's 259 ids).
      train: optimisation settings.
      data: a text file or folder to train on, or a token file (NAME.bin with its NAME.bin.json,
        `jaxdec.data.tokens`) streamed from disk; None trains on the Python standard library's source.
      init: start from a pretrained model, a Hugging Face folder or a .gguf file (`jaxdec.hf`):
        its config replaces `model` (flags that would change it are refused), its params are
        the starting point and its tokenizer encodes the data (documents separated by its EOS).
      pack: lay whole documents into the rows (`jaxdec.data.packing`, with "segment_ids")
        instead of cutting random windows from the stream; the run prints the share of padding
        with and without packing.
      separator: cut the data's files into documents at this string (e.g. "<|endoftext|>").
      export: at the end, write the trained model as a Hugging Face folder here
        (`jaxdec.hf.export`: config.json, model.safetensors and the --init model's tokenizer).
      name: the run's folder under `runs_dir`; None: named after the data ("stdlib", the
        --data file's stem or folder's name, or "dates"; see `run_name`).
      runs_dir: where runs are written (metrics.jsonl, loss.png, checkpoints/).
      steps: train steps (micro-batches).
      batch_size: sequences per step.
      seq_len: tokens per sequence (targets); at most model.max_len.
      eval_every: held-out evaluation period in steps (and at the end).
      eval_batches: held-out batches per periodic evaluation (the final one uses 4x as many).
      log_every: train-metric logging period in steps.
      checkpoint_every: checkpoint period in steps (and at the end); 0 disables checkpoints.
      keep_checkpoints: newest checkpoints kept.
      resume: continue the run already in the folder, from its latest usable checkpoint; its
        config.json must match this config (`check_run_folder` says which fields may differ).
        On an empty or missing folder the run starts fresh.
      overwrite: delete the run already in the folder (its config.json, metrics, loss.png and
        checkpoints) and start a new one there. Without it or `resume`, a folder that holds a
        run is refused before anything is written.
      num_samples: held-out prompts to continue with the KV cache at the end.
      sample_tokens: tokens generated per sample.
      held_out_fraction: share of files (or bytes, for a single file) held out.
      eval_examples: dates task: held-out dates translated for the exact-match score (the
        final score uses 4x as many).
      mesh: shard over a device mesh, e.g. "data=2,fsdp=2,tensor=2" (omitted axes are 1; the
        sizes multiply to the device count); None: one device, or pure data parallelism over
        every device when several processes run.
      num_cpu_devices: simulate this many CPU devices (as JAX_NUM_CPU_DEVICES=8 does).
      coordinator_address: multi-process: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).
      num_processes: multi-process: how many processes run (or JAX_NUM_PROCESSES).
      process_id: multi-process: this process's index (or JAX_PROCESS_ID).
      distributed: multi-process from the cluster's own environment (SLURM, Open MPI,
        Kubernetes, Cloud TPU): `jax.distributed.initialize()` detects the rest.
    """

    model: DecoderConfig
    train: TrainConfig
    data: str | None = None
    init: str | None = None
    pack: bool = False
    separator: str | None = None
    export: str | None = None
    name: str | None = None
    runs_dir: str = "runs"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False
    num_samples: int = 3
    sample_tokens: int = 160
    held_out_fraction: float = 0.05
    eval_examples: int = 512
    mesh: str | None = None
    num_cpu_devices: int | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False


@dataclasses.dataclass(frozen=True)
class Seq2SeqRunConfig(RunConfig):
    """A run of the encoder-decoder on the embedded dates task (`--task dates`); seq_len is the
    source length in bytes."""

    model: Seq2SeqConfig


def llama_block(config: DecoderConfig) -> DecoderConfig:
    """The same model with Llama's block: RMSNorm, a SwiGLU MLP of width 8/3 D (rounded up to a
    multiple of 32, so the MLP keeps about the plain 4 D MLP's parameter count), no biases."""
    d_ff = -(-8 * config.d_model // 3 // 32) * 32
    return dataclasses.replace(config, norm="rms", mlp="gated", activation="silu", use_bias=False, d_ff=d_ff)


def gpt2_block(config: DecoderConfig) -> DecoderConfig:
    """The same model with GPT-2's block: LayerNorm, a GELU MLP of width 4 D, biases."""
    return dataclasses.replace(config, norm="layer", mlp="plain", activation="gelu_tanh", use_bias=True, d_ff=None)


def _model(d_model: int, layers: int, heads: int, max_len: int) -> DecoderConfig:
    # RoPE and Llama's block: at the same size and budget both beat their alternatives on the
    # stdlib corpus (learned positions; GPT-2's block: README, "The main job").
    return llama_block(DecoderConfig(vocab_size=TOKENIZER.vocab_size, num_layers=layers, d_model=d_model,
                                     num_heads=heads, max_len=max_len, position="rope"))


# --block: the decoder block of the lm task's presets (llama is the presets' own).
BLOCKS = {"gpt2": gpt2_block, "llama": llama_block}


PRESETS: dict[str, RunConfig] = {
    "tiny": RunConfig(
        model=_model(128, 2, 4, 128),
        train=TrainConfig(learning_rate=3e-3, warmup_steps=20, decay_steps=150),
        steps=150, batch_size=16, seq_len=128, eval_every=50, eval_batches=4, checkpoint_every=50,
        sample_tokens=80,
    ),
    "small": RunConfig(
        model=_model(192, 4, 4, 256),
        train=TrainConfig(learning_rate=3e-3, warmup_steps=30, decay_steps=600),
        steps=600,
    ),
    "base": RunConfig(
        model=_model(384, 6, 6, 512),
        train=TrainConfig(learning_rate=1e-3, warmup_steps=200, decay_steps=5000, dropout=0.1),
        steps=5000, batch_size=32, seq_len=256, eval_every=500, eval_batches=16,
        checkpoint_every=500,
    ),
}


DATES_PRESETS: dict[str, Seq2SeqRunConfig] = {
    "tiny": Seq2SeqRunConfig(
        model=Seq2SeqConfig(vocab_size=TOKENIZER.vocab_size, num_encoder_layers=1, num_decoder_layers=1,
                            d_model=64, num_heads=4, max_len=64),
        train=TrainConfig(learning_rate=3e-3, warmup_steps=20, decay_steps=100),
        name="dates-tiny", steps=100, batch_size=32, seq_len=32, eval_every=50, checkpoint_every=50,
        eval_examples=128, num_samples=6,
    ),
    "small": Seq2SeqRunConfig(
        model=Seq2SeqConfig(vocab_size=TOKENIZER.vocab_size, num_encoder_layers=2, num_decoder_layers=2,
                            d_model=128, num_heads=4, max_len=64),
        train=TrainConfig(learning_rate=2e-3, warmup_steps=100, decay_steps=1500),
        name="dates", steps=1500, batch_size=64, seq_len=32, eval_every=500, checkpoint_every=500,
        eval_examples=512, num_samples=8,
    ),
}


def validate(cfg: RunConfig) -> RunFolder:
    """Refuses a run that cannot work, or that would write over another run, before loading
    data or compiling anything; returns what the run does with its folder (`check_run_folder`).
    """
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every"):
        checks.positive_int(name, getattr(cfg, name))
    if cfg.seq_len > cfg.model.max_len:
        raise ValueError(f"seq_len {cfg.seq_len} is beyond the model's max_len={cfg.model.max_len}")
    if cfg.init is not None:
        if cfg.mesh is not None or cfg.num_processes not in (None, 1) or cfg.distributed:
            raise ValueError("--init starts one device from the pretrained params; --mesh and several "
                             "processes are for runs from scratch")
    elif cfg.model.vocab_size < TOKENIZER.vocab_size:
        raise ValueError(
            f"model.vocab_size {cfg.model.vocab_size} is smaller than the byte tokenizer's "
            f"{TOKENIZER.vocab_size} ids"
        )
    if cfg.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    if cfg.mesh is not None:
        sharding.parse_mesh(cfg.mesh)
    if family.of(cfg.model).takes_source:
        if cfg.seq_len < dates.max_source_bytes():
            raise ValueError(f"seq_len {cfg.seq_len} is shorter than the longest date source "
                             f"({dates.max_source_bytes()} bytes)")
        if cfg.data is not None:
            raise ValueError("--data trains the language model; the dates task generates its data")
    if cfg.data is not None and not pathlib.Path(cfg.data).expanduser().exists():
        # Before the folder check: the run's default name is derived from this path.
        raise ValueError(f"data path does not exist: {cfg.data!r}")
    if cfg.pack and cfg.data is not None and token_files.is_token_file(cfg.data):
        raise ValueError("--pack lays whole documents into rows; a token file is streamed as windows "
                         "(give the text file or folder to pack it)")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite deletes it: choose one")
    return check_run_folder(cfg)


def load_corpus(cfg: RunConfig, tokenizer=None) -> Corpus:
    """The user's --data (text, or a token file mapped from disk), or the standard library's
    source, encoded by `tokenizer` (None: bytes); refuses data too small for a batch."""
    if cfg.data is not None and token_files.is_token_file(cfg.data):
        corpus = token_corpus(cfg.data, tokenizer)
    elif cfg.data is None:
        corpus = load_stdlib_corpus(held_out_fraction=cfg.held_out_fraction, tokenizer=tokenizer)
    else:
        corpus = load_text_corpus(cfg.data, held_out_fraction=cfg.held_out_fraction, tokenizer=tokenizer,
                                  separator=cfg.separator)
    needed = cfg.batch_size * (cfg.seq_len + 1)
    if len(corpus.train) < needed:
        raise ValueError(
            f"batch too large for the data: batch_size * (seq_len + 1) = {needed} tokens, but the "
            f"training split of {corpus.name} holds {len(corpus.train)}"
        )
    if len(corpus.held_out) < cfg.seq_len + 1:
        raise ValueError(
            f"the held-out split of {corpus.name} holds {len(corpus.held_out)} tokens, fewer than "
            f"one sequence of seq_len + 1 = {cfg.seq_len + 1}; lower --seq-len"
        )
    return corpus


def token_corpus(path: str, tokenizer=None) -> Corpus:
    """A token file as a Corpus whose streams are views of the memory map (nothing is read);
    refused when it was written by another tokenizer than the run's."""
    tf = token_files.open_token_file(path)
    want = token_files.BYTES if tokenizer is None else tokenizer.fingerprint
    if tf.tokenizer is not None and tf.tokenizer != want:
        raise ValueError(f"token file {path} was written by tokenizer {tf.tokenizer}, but this run encodes with "
                         f"{want}: rewrite it with the run's tokenizer (python -m jaxdec.hf tokens --gguf/--checkpoint "
                         "for --init, python -m jaxdec.data.tokens write for the byte tokenizer)")
    vocab = TOKENIZER.vocab_size if tokenizer is None else tokenizer.vocab_size
    if tf.vocab_size is not None and tf.vocab_size > vocab:
        raise ValueError(f"token file {path} has vocab_size {tf.vocab_size}, above the model's {vocab}")
    return Corpus(name=str(path), train=tf.train, held_out=tf.held_out, train_files=(str(path),),
                  held_out_files=(str(path),))


def setup_mesh(cfg: RunConfig):
    """Devices, processes and the mesh of a run (before any JAX work); None for one device.

    Raises:
      ValueError: a mesh that does not match the device count, or (several processes) a batch
        size that does not split over data x fsdp, before anything is compiled.
    """
    sharding.init_devices(cfg.num_cpu_devices, cfg.coordinator_address, cfg.num_processes,
                          cfg.process_id, auto_detect=cfg.distributed)
    if cfg.mesh is None and jax.process_count() == 1:
        return None
    sizes = sharding.parse_mesh(cfg.mesh) if cfg.mesh is not None else {"data": jax.device_count()}
    mesh = sharding.make_mesh(**sizes)
    blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    if jax.process_count() > 1 and cfg.batch_size % blocks:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of data x fsdp = {blocks} "
                         f"when {jax.process_count()} processes share each batch")
    return mesh


def pad_rows(batch: dict, multiple: int) -> dict:
    """Appends rows of weight zero (lengths 0) so the batch divides into `multiple` row blocks.

    The loss and metrics are sums over real targets, so they are unchanged. A padded row keeps
    one source token (source_lengths 1) so a seq2seq encoder's attention stays defined.
    """
    B, T1 = np.shape(batch["tokens"])
    extra = -B % multiple
    if not extra:
        return batch
    out = {k: np.concatenate([np.asarray(v), np.zeros((extra, *np.shape(v)[1:]), np.asarray(v).dtype)])
           for k, v in batch.items()}
    out["lengths"] = np.concatenate([np.asarray(batch.get("lengths", np.full(B, T1))),
                                     np.zeros(extra)]).astype(np.int32)
    if "source_lengths" in out:
        out["source_lengths"][B:] = 1
    return out


def place_batch(batch: dict, mesh) -> dict:
    """A host batch (its global rows, a pure function of seed and step) -> this process's rows
    placed over the mesh; unchanged without a mesh."""
    if mesh is None:
        return batch
    batch = pad_rows(batch, mesh.shape["data"] * mesh.shape["fsdp"])
    rows = sharding.process_rows(len(batch["tokens"]), mesh)
    return sharding.shard_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, mesh)


def evaluate(state: TrainState, batches: list[dict]) -> dict:
    """Token-weighted held-out loss, bits per token and accuracy over `batches`."""
    sums = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
    for batch in batches:
        check_batch(batch, state.model_config, check_values=True)  # host values, before placing
        m = eval_step(state, place_batch(batch, state.mesh))
        for k in sums:
            sums[k] += float(m[k])
    loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
    return {"eval_loss": loss, "eval_bits_per_byte": loss / math.log(2.0),
            "eval_accuracy": sums["correct"] / max(sums["tokens"], 1.0), "eval_tokens": sums["tokens"]}


def held_out_prompts(corpus: Corpus, num: int, length: int, eos_id: int = TOKENIZER.eos_id) -> list[np.ndarray]:
    """The openings of held-out documents, `length` tokens each (a byte document's starts with
    its BOS). Without document offsets (a token file), documents start after an EOS in the
    stream's first million tokens, so the file is not read whole."""
    stream = corpus.held_out
    if corpus.held_out_offsets is not None:
        starts = corpus.held_out_offsets[:-1]
    else:
        head = np.asarray(stream[: 1 << 20])
        starts = np.r_[0, np.flatnonzero(head[:-1] == eos_id) + 1]
    prompts = [np.asarray(stream[s : s + length]).astype(np.int32) for s in starts[:num]]
    return [p for p in prompts if len(p) > 0]


def check_finite(result, what: str) -> None:
    """Raises FloatingPointError if any row of a GenerateResult was sampled from NaN or inf
    logits (its tokens would be garbage, e.g. token 0 everywhere, printed without a word)."""
    bad = np.flatnonzero(np.asarray(result.nonfinite))
    if bad.size:
        raise FloatingPointError(
            f"{what}: the model's logits were NaN or inf for row(s) {bad.tolist()} of "
            f"{len(result.nonfinite)}; its parameters hold non-finite values (a diverged run? "
            "lower the learning rate or check the data)")


def sample_texts(state: TrainState, prompts: list[np.ndarray], new_tokens: int, key: jax.Array,
                 tokenizer=TOKENIZER) -> list[str]:
    """Continues each prompt with the KV cache (top-k 10 sampling), decoded to text."""
    width = max(len(p) for p in prompts)
    batch = np.full((len(prompts), width), tokenizer.pad_id, np.int32)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    result = generate(state.params, state.model_config, batch, lengths, max_new_tokens=new_tokens,
                      sampler=TopK(10, temperature=0.8), key=key, eos_id=tokenizer.eos_id,
                      pad_id=tokenizer.pad_id, mesh=state.mesh)
    check_finite(result, "samples")
    return [tokenizer.decode(p) + " ⟶ " + tokenizer.decode(np.asarray(t)) for p, t in zip(prompts, result.tokens)]


def decode_speed(state: TrainState, prompt: np.ndarray, new_tokens: int, repeats: int = 3) -> dict:
    """Greedy tokens/s at batch 1, with and without the KV cache (median of `repeats`)."""
    speeds = {}
    for use_cache in (True, False):
        run = lambda: generate(state.params, state.model_config, prompt[None], max_new_tokens=new_tokens,  # noqa: E731
                               use_cache=use_cache, mesh=state.mesh).tokens
        speeds["cached" if use_cache else "uncached"] = new_tokens / measure(run, repeats).seconds
    speeds["speedup"] = speeds["cached"] / speeds["uncached"]
    return speeds


class LMTask:
    """Next-token prediction on a text corpus; scored in held-out bits per byte.

    tokenizer: None for the byte tokenizer, else the --init model's `jaxdec.hf.TextTokenizer`
    (bits per byte then divide the held-out nats by the UTF-8 bytes of the targets).
    """

    def __init__(self, cfg: RunConfig, tokenizer=None):
        self.cfg = cfg
        self.tokenizer = tokenizer or TOKENIZER
        self.corpus = load_corpus(cfg, tokenizer)
        print(f"data: {self.corpus.name}: {len(self.corpus.train):,} train / "
              f"{len(self.corpus.held_out):,} held-out tokens ({len(self.corpus.train_files)} / "
              f"{len(self.corpus.held_out_files)} files)")
        self.bytes_per_id = None if tokenizer is None else tokenizer.byte_lengths()
        self.packed = self.held_packed = None
        if cfg.pack:
            self.packed, self.held_packed = (
                pack_documents(documents_of(stream, offsets), cfg.seq_len + 1, self.tokenizer.pad_id)
                for stream, offsets in ((self.corpus.train, self.corpus.train_offsets),
                                        (self.corpus.held_out, self.corpus.held_out_offsets)))
            print(f"packed {len(self.packed.pieces):,} documents (pieces of at most {cfg.seq_len + 1} tokens) into "
                  f"{len(self.packed.tokens):,} rows: {100 * self.packed.padding_fraction:.2f}% padding, against "
                  f"{100 * self.packed.unpacked_padding_fraction:.2f}% with one document per row")
        self.eval_data = self._eval_data(cfg.eval_batches)

    def _eval_data(self, n: int) -> list[dict]:
        if self.held_packed is not None:
            return packed_eval_batches(self.held_packed, batch_size=self.cfg.batch_size, max_batches=n)
        return eval_batches(self.corpus.held_out, batch_size=self.cfg.batch_size,
                            seq_len=self.cfg.seq_len, max_batches=n)

    def train_batch(self, step: int) -> dict:
        if self.packed is not None:
            return sample_packed_batch(self.packed, batch_size=self.cfg.batch_size, seed=self.cfg.train.seed, step=step)
        return sample_batch(self.corpus.train, batch_size=self.cfg.batch_size,
                            seq_len=self.cfg.seq_len, seed=self.cfg.train.seed, step=step)

    def _score(self, state: TrainState, batches: list[dict]) -> dict:
        ev = evaluate(state, batches)
        if self.bytes_per_id is not None:  # nats over the targets' UTF-8 bytes, not over tokens
            targets = [b["tokens"][:, 1:][_target_mask(b)] for b in batches]
            n_bytes = sum(int(self.bytes_per_id[t].sum()) for t in targets)
            ev["eval_bits_per_byte"] = ev["eval_loss"] * ev["eval_tokens"] / math.log(2.0) / max(n_bytes, 1)
        return ev

    def evaluate(self, state: TrainState) -> dict:
        return self._score(state, self.eval_data)

    def final_evaluation(self, state: TrainState) -> dict:
        """On the final evaluation's held-out batches (4x eval_batches): a pretrained model is
        scored here before its first step, so before and after are the same tokens."""
        return self._score(state, self._eval_data(4 * self.cfg.eval_batches))

    @staticmethod
    def describe(ev: dict) -> str:
        return f"held-out loss {ev['eval_loss']:.4f}, {ev['eval_bits_per_byte']:.4f} bits/byte"

    def finish(self, state: TrainState) -> tuple[dict, str]:
        cfg = self.cfg
        final = self.final_evaluation(state)
        prompts = held_out_prompts(self.corpus, cfg.num_samples, min(48, cfg.model.max_len // 2),
                                   self.tokenizer.eos_id)
        if prompts:
            new = min(cfg.sample_tokens, cfg.model.max_len - max(len(p) for p in prompts) + 1)
            print("\nsamples (KV cache, top-k 10, temperature 0.8), held-out prompt ⟶ continuation:")
            for text in sample_texts(state, prompts, new, jax.random.fold_in(state.key, cfg.steps), self.tokenizer):
                print("-" * 80 + "\n" + text)
            if cfg.init is None:  # the cached / uncached comparison is for the models trained here
                speed = decode_speed(state, prompts[0], new)
                print("-" * 80)
                print(f"decode speed, batch 1, {new} new tokens: cached {speed['cached']:,.0f} tok/s, "
                      f"uncached {speed['uncached']:,.0f} tok/s ({speed['speedup']:.1f}x)")
        print(f"final evaluation, {int(final['eval_tokens']):,} held-out targets: {self.describe(final)}")
        return final, f"held-out bits/byte: {final['eval_bits_per_byte']:.4f}"


def _target_mask(batch: dict) -> np.ndarray:
    """bool [B, T]: the targets a batch scores (within one segment, for packed rows)."""
    tokens = batch["tokens"]
    if "segment_ids" not in batch:
        return np.ones((tokens.shape[0], tokens.shape[1] - 1), bool)
    seg = batch["segment_ids"]
    return (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])


def translate_dates(state: TrainState, sources: list[str], source_len: int) -> list[str]:
    """Greedy KV-cache decoding of date strings with the encoder-decoder: texts -> texts."""
    batch = dates.encode_pairs([(s, "0000-00-00") for s in sources], source_len=source_len,
                               target_len=dates.TARGET_BYTES)
    prompts = np.full((len(sources), 1), TOKENIZER.bos_id, np.int32)
    result = generate(state.params, state.model_config, prompts, source=batch["source"],
                      source_lengths=batch["source_lengths"], max_new_tokens=dates.TARGET_BYTES + 1,
                      eos_id=TOKENIZER.eos_id, pad_id=TOKENIZER.pad_id, mesh=state.mesh)
    check_finite(result, "date translations")
    return [TOKENIZER.decode(np.asarray(t)) for t in result.tokens]


class DatesTask:
    """Date normalisation (English and Korean forms -> ISO 8601); scored in held-out exact match."""

    def __init__(self, cfg: Seq2SeqRunConfig):
        self.cfg = cfg
        print(f"data: dates task, {len(dates.DATE_FORMATS)} formats, held-out dates never trained on")
        self.eval_batch = self._batch("held_out", step=0, batch_size=cfg.batch_size * cfg.eval_batches)

    def _batch(self, split: str, step: int, batch_size: int) -> dict:
        return dates.sample_batch(batch_size=batch_size, split=split, seed=self.cfg.train.seed,
                                  step=step, source_len=self.cfg.seq_len, target_len=dates.TARGET_BYTES)

    def train_batch(self, step: int) -> dict:
        return self._batch("train", step, self.cfg.batch_size)

    def exact_match(self, state: TrainState, n: int) -> tuple[float, list[tuple[str, str, str]]]:
        pairs = dates.sample_pairs(n, split="held_out", seed=self.cfg.train.seed + 1)
        outputs = []
        for i in range(0, n, 256):  # fixed-size chunks: one compiled decode program
            chunk = pairs[i : i + 256]
            chunk = chunk + [chunk[-1]] * (256 - len(chunk))
            outputs += translate_dates(state, [src for src, _ in chunk], self.cfg.seq_len)
        rows = [(src, tgt, out) for (src, tgt), out in zip(pairs, outputs)]
        return sum(tgt == out for _, tgt, out in rows) / n, rows

    def evaluate(self, state: TrainState) -> dict:
        ev = evaluate(state, [self.eval_batch])
        ev["eval_exact_match"], _ = self.exact_match(state, self.cfg.eval_examples)
        return ev

    @staticmethod
    def describe(ev: dict) -> str:
        return f"held-out loss {ev['eval_loss']:.4f}, exact match {100 * ev['eval_exact_match']:.2f}%"

    def finish(self, state: TrainState) -> tuple[dict, str]:
        final = evaluate(state, [self.eval_batch])
        final["eval_exact_match"], rows = self.exact_match(state, 4 * self.cfg.eval_examples)
        print(f"\nheld-out translations (KV cache, greedy), {len(rows)} dates:")
        shown = rows[: self.cfg.num_samples]
        wrong = [r for r in rows[self.cfg.num_samples :] if r[1] != r[2]]
        for src, tgt, out in shown + wrong[:5]:
            print(f"  {src!r:36} -> {out!r:14} {'ok' if out == tgt else 'WRONG, expected ' + repr(tgt)}")
        return final, f"held-out exact match: {100 * final['eval_exact_match']:.2f}%"


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """What --init brings: the checkpoint (config, params, special ids), its tokenizer
    (`jaxdec.hf.TextTokenizer`) and chat template."""

    checkpoint: object
    tokenizer: object
    chat_template: str | None


def with_init(cfg: RunConfig) -> tuple[RunConfig, Pretrained]:
    """The run with the --init model's config as `model`, and what --init brings.

    Raises:
      ValueError: the path is missing or not a supported model, or the model is not one this
        run trains (a decoder-only model).
    """
    from jaxdec.hf.text import load_pretrained

    if not pathlib.Path(cfg.init).expanduser().exists():
        raise ValueError(f"--init {cfg.init!r} does not exist: give a Hugging Face folder or a .gguf file")
    ckpt, tok, template = load_pretrained(str(pathlib.Path(cfg.init).expanduser()))
    print(f"init: {cfg.init}: {ckpt.model_type}, {ckpt.config.num_layers} layers, d_model {ckpt.config.d_model}, "
          f"vocab {ckpt.config.vocab_size:,}; its tokenizer encodes the data (documents end with id {tok.eos_id})")
    return dataclasses.replace(cfg, model=ckpt.config), Pretrained(ckpt, tok, template)


def run(cfg: RunConfig) -> dict:
    """Trains, evaluates, checkpoints and samples; returns the final held-out metrics.

    The run folder is checked first (`validate`): a run already there is continued only with
    `resume` and a matching config, replaced only with `overwrite`, and otherwise left untouched.
    """
    cfg = dataclasses.replace(cfg, name=run_name(cfg))  # config.json records the folder's name
    pretrained = None
    if cfg.init is not None:  # read only: the model's config is what the folder check compares
        cfg, pretrained = with_init(cfg)
    folder = validate(cfg)
    mesh = setup_mesh(cfg)
    primary = jax.process_index() == 0
    if family.of(cfg.model).takes_source:
        task = DatesTask(cfg)
    else:
        task = LMTask(cfg, None if pretrained is None else pretrained.tokenizer)
    out = folder.path
    if jax.process_count() > 1:  # every process has read the folder before process 0 changes it
        multihost_utils.sync_global_devices(f"jaxdec run folder checked {out}")
    if primary and folder.remove:
        print(f"--overwrite: removing the earlier run in {out}: {describe_files(list(folder.remove))}")
        for path in folder.remove:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxdec run folder cleared {out}")
    out.mkdir(parents=True, exist_ok=True)
    if primary:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    ckpt_dir = out / "checkpoints"
    # Every process logs the same (replicated) metrics; each to its own file.
    metrics_path = out / ("metrics.jsonl" if primary else f"metrics.process{jax.process_index()}.jsonl")

    state = create_train_state(cfg.model, cfg.train, jax.random.key(cfg.train.seed), mesh=mesh,
                               params=None if pretrained is None else pretrained.checkpoint.params)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"model: {n_params:,} parameters{'' if cfg.init is None else ' from ' + cfg.init}; run folder {out}")
    if mesh is not None:
        held = sharding.bytes_per_device((state.params, state.opt_state))
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} "
              f"process(es): params + optimizer state {max(held['per_device'].values()) / 2**20:.2f} "
              f"MiB per device of {held['total'] / 2**20:.2f} MiB")
    start = 0
    if folder.resume and checkpoint.latest_step(ckpt_dir) is not None:
        state, start = checkpoint.restore(ckpt_dir, state)
        truncate_after(metrics_path, start)
        print(f"resumed from step {start}")
    elif folder.resume and metrics_path.exists():
        # The same config with no checkpoint to continue from: train again from step 0.
        print(f"no checkpoint in {ckpt_dir}: training this run again from step 0")
        metrics_path.unlink()

    log = MetricsLog(metrics_path)
    if pretrained is not None and start == 0:
        ev = task.final_evaluation(state)
        log.log(0, **ev)
        print(f"step 0, the pretrained model, on the final evaluation's {int(ev['eval_tokens']):,} held-out "
              f"targets: {task.describe(ev)}")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, unit="step", dynamic_ncols=True,
               disable=not primary)
    window, window_tokens = Stopwatch(), []
    for step in bar:
        batch = task.train_batch(step)
        # The host batch's ids and lengths are checked here, before it is placed on devices: an
        # out-of-range id would otherwise give a NaN loss and a silently skipped update.
        check_batch(batch, cfg.model, check_values=True)
        state, metrics = train_step(state, place_batch(batch, mesh))
        window_tokens.append(metrics["tokens"])  # a device scalar: no wait here
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            tok_s = sum(float(t) for t in window_tokens) / window.lap()
            window_tokens = []
            log.log(done, **metrics, tokens_per_s=tok_s)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
        if done % cfg.eval_every == 0 and done != cfg.steps:
            ev = task.evaluate(state)
            log.log(done, **ev)
            bar.write(f"step {done}: {task.describe(ev)}")
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            checkpoint.save(ckpt_dir, state, done, keep=cfg.keep_checkpoints)
    bar.close()

    final, final_line = task.finish(state)
    log.log(cfg.steps, **final)
    log.close()
    if primary:
        plot_loss_curve(metrics_path, out / "loss.png", title=f"jaxdec {cfg.name}")
    print(f"metrics: {metrics_path}; loss curve: {out / 'loss.png'}")
    if cfg.export is not None and primary:
        from jaxdec.hf.export import export_folder

        model_type = "llama" if pretrained is None else pretrained.checkpoint.model_type
        export_folder(cfg.export, jax.device_get(state.params), cfg.model, model_type=model_type,
                      tokenizer=None if pretrained is None else pretrained.tokenizer,
                      chat_template=None if pretrained is None else pretrained.chat_template)
        print(f"exported the trained model as a Hugging Face folder: {cfg.export}")
    if cfg.checkpoint_every:  # the report reads the run's config.json and newest checkpoint
        print(f"see inside: python -m jaxdec.tools.explain --checkpoint {ckpt_dir} --out {out / 'explain'}")
    print(final_line)
    return final
