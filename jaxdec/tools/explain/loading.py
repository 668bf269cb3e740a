"""The model the report explains: a `train.py` run's newest checkpoint, or a small random one."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax

from jaxdec import api, checkpoint
from jaxdec.config import DecoderConfig, RopeScaling, Seq2SeqConfig, TrainConfig
from jaxdec.data.tokenizer import VOCAB_SIZE


# A small random model per task when no checkpoint is given: seconds end to end on a CPU.
RANDOM_MODELS = {
    "lm": DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=2, d_model=64, num_heads=4, max_len=128,
                        position="rope"),
    "dates": Seq2SeqConfig(vocab_size=VOCAB_SIZE, num_encoder_layers=1, num_decoder_layers=1,
                           d_model=64, num_heads=4, max_len=64),
}


@dataclasses.dataclass
class LoadedModel:
    params: dict
    config: DecoderConfig | Seq2SeqConfig
    description: str


def _fields(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def load_checkpoint(checkpoint_dir: str | os.PathLike) -> LoadedModel:
    """The params of a `train.py` run's newest usable checkpoint.

    The run's `config.json` (written by `train.py` beside `checkpoints/`) gives the model and
    optimiser configs, from which the restore template is built.
    """
    from jaxdec.training import create_train_state

    checkpoint_dir = pathlib.Path(checkpoint_dir)
    config_path = checkpoint_dir.parent / "config.json"
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint_dir} is not a directory")
    if not config_path.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint_dir}: no run config at {config_path} "
                                "(expected a train.py run folder: <run>/config.json, <run>/checkpoints/)")
    run = json.loads(config_path.read_text())
    model_cls = Seq2SeqConfig if "num_encoder_layers" in run["model"] else DecoderConfig
    fields = _fields(model_cls, run["model"])
    if isinstance(fields.get("rope_scaling"), dict):  # a RopeScaling, as JSON holds it
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    model_config = model_cls(**fields)
    train_config = TrainConfig(**_fields(TrainConfig, run["train"]))
    # One compiled program builds the template (its values are ignored, its layout is used).
    template = jax.jit(create_train_state, static_argnums=(0, 1))(model_config, train_config,
                                                                  jax.random.key(train_config.seed))
    state, step = checkpoint.restore(checkpoint_dir, template)
    return LoadedModel(state.params, model_config, f"checkpoint {checkpoint_dir}, step {step}")


def random_model(task: str, seed: int = 0) -> LoadedModel:
    config = RANDOM_MODELS[task]
    # One compiled program instead of one per random array.
    params = jax.jit(api.init_params, static_argnums=0)(config, jax.random.key(seed))
    return LoadedModel(params, config,
                       f"a small random model (seed {seed}, untrained)")
