"""Hugging Face checkpoints in and out: `load_hf` and `save_hf`.

A Hugging Face model directory (`config.json` plus `model.safetensors`, or shards
listed in `model.safetensors.index.json`) of a model type in `MODEL_TYPES` becomes a
`layers.SequenceModel` whose logits equal the reference's (`transformers`) to float
tolerance, and back. Only `safetensors` and numpy read the files: no torch at run
time.

```python
from train.hf import load_hf, save_hf

model, info = load_hf("path/to/mamba-130m-hf")
logits = model(tokens)                      # tokens: Int[Array, "seq"]
save_hf(model, "out/mamba-finetuned")       # loads in transformers again
```

**Adding a model type.** Each model type is one private module (`_mamba.py`,
`_mamba2.py`, `_xlstm.py`, ...) listed in `_MODULES` below (and, if `save_hf` writes
it, its mixer class in `_BY_MIXER`). A module defines:

- `MODEL_TYPE` (`config.json`'s `model_type`) and `ARCHITECTURE` (the
  `transformers` class name).
- `architecture(config, path) -> dict`: the keyword arguments of
  `layers.SequenceModel` (all but `key`) that build this checkpoint's model with
  random parameters, from `config.json` alone (no tensors read): `mixer` (a name in
  `layers.MIXERS`, a mixer class, or a list of them for a hybrid stack), `d_model`,
  `n_layers`, `d_output`, `vocab_size`, `mixer_kwargs` (plain YAML data: numbers,
  strings, booleans, None, lists, mappings; keyed by the list's entries for a
  hybrid), and whatever else the model needs (`mlp_ratio`, `mlp_hidden`,
  `mlp_activation`, `norm_eps`, `tie_embeddings`, `head_bias`, `logit_soft_cap`, or a
  new `SequenceModel` option). Anything it cannot map exactly is an `HFError` naming
  the `config.json` field. This is all `init_from: hf:PATH` needs: the trainer
  builds `SequenceModel(**architecture(...))` with its own `d_output`, `vocab_size`
  (the task's), `tie_embeddings=False`, `head_bias=True`, `pooling`, `dropout` and
  `remat`; the parameters are then named by path (`blocks.0.mixer.q.weight`), with
  `embedding.weight`, `head.weight` and `head.bias` following the vocabulary.
- `load(config, tensors, path, chunk_size) -> SequenceModel`: the model of
  `architecture(config, path)` (same parameter paths and shapes; `chunk_size` added
  to the mixers' options when not None; `tie_embeddings` may follow which tensors
  are stored) with every array taken from `tensors` (`Tensors.take`, then
  `Tensors.finish()`, so that a missing or unused tensor is an error).
  `_tree.build(make, arrays)` fills a skeleton from arrays named by path.
- `save(model) -> (config, tensors)`: the inverse, for `save_hf` (optional for a
  type that is only loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import layers
from layers._mlstm_large import MLSTMLarge

from . import _mamba, _mamba2, _recurrent_gemma, _xlstm
from ._io import (
    TOKENIZER_FILE,
    HFError as HFError,
    Tensors,
    read_config,
    read_tensors,
    write_dir,
)

_MODULES = {m.MODEL_TYPE: m for m in (_mamba, _mamba2, _xlstm, _recurrent_gemma)}
_MODULES[_mamba.FALCON_TYPE] = _mamba
MODEL_TYPES: tuple[str, ...] = tuple(_MODULES)
_BY_MIXER = {
    layers.Mamba: _mamba,
    layers.Mamba2: _mamba2,
    MLSTMLarge: _xlstm,
    layers.RGLRU: _recurrent_gemma,
    layers.LocalAttention: _recurrent_gemma,
}


def _module(config: dict[str, Any], path: Path):
    model_type = config.get("model_type")
    if model_type is None:
        raise HFError(f"{path}/config.json: field 'model_type' is missing")
    if model_type not in _MODULES:
        raise HFError(
            f"{path}/config.json: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(MODEL_TYPES)}"
        )
    return _MODULES[model_type]


def load_hf(
    path: str | Path, *, chunk_size: int | None = None
) -> tuple[layers.SequenceModel, dict[str, Any]]:
    """Load a local Hugging Face model directory as a `layers.SequenceModel`.

    **Arguments:**

    - `path`: the directory (`config.json` and safetensors; nothing is downloaded).
    - `chunk_size`: the mixers' time chunk (a speed/memory knob that does not change
      the outputs); the layer's default when `None`.

    **Returns:** `(model, info)`: the model with float32 parameters, and a dict with
    `model_type`, `config` (the parsed `config.json`), `path`, `tokenizer` (the path of
    `tokenizer.json` beside it, or `None`) and `n_params`.

    **Raises:** `HFError` (a `ConfigError`) naming the file, tensor or config field
    for a directory that cannot be mapped exactly: no `config.json`, an unsupported
    `model_type` or option, a missing, extra or mis-shaped tensor, a dtype other than
    float32/float16/bfloat16/float64.
    """
    path = Path(path).expanduser()
    config = read_config(path)
    module = _module(config, path)
    tensors = Tensors(path, read_tensors(path))
    model = module.load(config, tensors, path, chunk_size)
    tokenizer = path / TOKENIZER_FILE
    info = {
        "model_type": config["model_type"],
        "config": config,
        "path": str(path),
        "tokenizer": str(tokenizer) if tokenizer.is_file() else None,
        "n_params": sum(a.size for a in _tree_arrays(model)),
    }
    return model, info


def _tree_arrays(model):
    import equinox as eqx
    import jax

    return jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))


def save_hf(
    model: layers.SequenceModel,
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str = "float32",
) -> Path:
    """Write `model` as a Hugging Face model directory that `transformers` loads
    (`AutoModelForCausalLM.from_pretrained(path)`), the inverse of `load_hf`.

    **Arguments:**

    - `model`: a token `SequenceModel` whose blocks all hold the same mixer of a
      supported type (`layers.Mamba`: `mamba`, or `falcon_mamba` with
      `bcdt_norm_eps`; `layers.Mamba2`: `mamba2`), with no
      MLP, no pooling and no head bias (or an all-zero one).
    - `path`: the directory to write (created; files in it are replaced).
    - `tokenizer`: a `tokenizer.json` to copy beside the weights.
    - `dtype`: `"float32"` (exact) or `"float16"`.

    **Returns:** `path`.
    """
    module = _check_savable(model)
    config, tensors = module.save(model)
    path = write_dir(path, config, tensors, dtype)
    if tokenizer is not None:
        import shutil

        shutil.copyfile(tokenizer, path / TOKENIZER_FILE)
    return path


def _check_savable(model):
    import numpy as np

    if not isinstance(model, layers.SequenceModel):
        raise TypeError(f"save_hf: expected a layers.SequenceModel, got {type(model)}")
    if model.embedding is None:
        raise ValueError("save_hf: the model has no token embedding (built with d_input)")
    if model.pooling is not None:
        raise ValueError(f"save_hf: a causal LM has no pooling, got {model.pooling!r}")
    kinds = {type(b.mixer) for b in model.blocks}
    modules = {_BY_MIXER.get(k) for k in kinds}
    # one mixer per model type, except RecurrentGemma's hybrid of RGLRU and attention
    if (
        len(modules) != 1
        or None in modules
        or (len(kinds) > 1 and modules != {_recurrent_gemma})
    ):
        names = sorted(k.__name__ for k in kinds)
        raise ValueError(
            f"save_hf: every block must hold one mixer of "
            f"{[k.__name__ for k in _BY_MIXER]} (or, for recurrent_gemma, RGLRU and "
            f"LocalAttention), got {names}"
        )
    if len({getattr(b.mixer, "bcdt_norm_eps", None) for b in model.blocks}) != 1:
        raise ValueError("save_hf: the blocks' Mamba mixers differ in bcdt_norm_eps")
    module = next(iter(modules))
    gemma = module is _recurrent_gemma
    if module not in (_xlstm, _recurrent_gemma) and any(
        b.mlp is not None for b in model.blocks
    ):
        raise ValueError("save_hf: the Hugging Face Mamba models have no MLP (mlp_ratio=0)")
    if module not in (_xlstm, _recurrent_gemma) and model.logit_soft_cap is not None:
        raise ValueError("save_hf: the Hugging Face Mamba models have no logit soft cap")
    if not gemma and (model.embed_scale is not None or model.norm_offset != 0):
        raise ValueError(
            f"save_hf: {module.MODEL_TYPE} has no embedding scale and norms scaled by "
            f"weight alone (embed_scale=None, norm_offset=0), got "
            f"{model.embed_scale}, {model.norm_offset}"
        )
    if not gemma and any(
        b.mlp is not None and b.mlp.gate.bias is not None for b in model.blocks
    ):
        raise ValueError(
            f"save_hf: {module.MODEL_TYPE}'s MLP has no biases (mlp_bias=False)"
        )
    if model.head is not None:
        if model.head.bias is not None and np.any(np.asarray(model.head.bias) != 0):
            raise ValueError(
                "save_hf: the head has a non-zero bias, which lm_head cannot hold "
                "(freeze `head.bias` when fine-tuning, or build with head_bias=False)"
            )
        if model.head.out_features != model.embedding.num_embeddings:
            raise ValueError(
                f"save_hf: the head's {model.head.out_features} outputs differ from the "
                f"vocabulary of {model.embedding.num_embeddings}"
            )
    for name in ("norm1",):
        if any(getattr(b, name).weight is None for b in model.blocks):
            raise ValueError(f"save_hf: a block's {name} has no weight")
    if any(b.norm1.eps != model.norm.eps for b in model.blocks):
        raise ValueError("save_hf: the blocks' and the final norm's eps differ")
    return module


from ._finetune import (  # noqa: E402  (they use load_hf above)
    architecture as architecture,
    load_matching_hf as load_matching_hf,
    trainer_architecture as trainer_architecture,
    with_hf_model as with_hf_model,
)
