"""`mamba` (`MambaForCausalLM`): Gu and Dao's Mamba language model; and
`falcon_mamba` (`FalconMambaForCausalLM`), the same with weightless RMS norms on the
step-size input and `B`, `C` (`layers.Mamba(bcdt_norm_eps=mixer_rms_eps)`).

The reference (`transformers.models.mamba`) is `x + mixer(RMSNorm(x))` per layer, no
MLP, a final `norm_f` and an `lm_head` tied to the embedding by default. Its mixer is
our `layers.Mamba` tensor for tensor, except that `dt_proj` carries its bias (ours is
`dt_bias`) and the depthwise convolution is stored as `(d_inner, 1, K)` (ours
`(K, d_inner)`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

import layers

from ._io import HFError, Tensors, field, require
from ._tree import (
    backbone_architecture,
    finish_backbone,
    load_backbone_layers,
    save_backbone,
    with_chunk,
)

MODEL_TYPE = "mamba"
ARCHITECTURE = "MambaForCausalLM"
FALCON_TYPE = "falcon_mamba"
FALCON_ARCHITECTURE = "FalconMambaForCausalLM"


def _options(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Our constructor options from `config.json`, refusing what we do not implement."""
    d_model = field(config, "hidden_size", int, path)
    d_inner = field(config, "intermediate_size", int, path, default=None)
    expand = field(config, "expand", int, path, default=2)
    if d_inner is None:
        d_inner = expand * d_model
    if d_inner % d_model:
        raise HFError(
            f"{path}/config.json: intermediate_size {d_inner} is not a multiple of "
            f"hidden_size {d_model} (layers.Mamba has d_inner = expand * d_model)"
        )
    rank = config.get("time_step_rank", "auto")
    if rank == "auto" or rank is None:
        rank = math.ceil(d_model / 16)
    rank = field({"time_step_rank": rank}, "time_step_rank", int, path)
    require(config, "hidden_act", "silu", path, default="silu")
    require(
        config,
        "use_bias",
        False,
        path,
        default=False,
        why="layers.Mamba's in_proj and out_proj have no bias",
    )
    mixer_kwargs = {
        "d_state": field(config, "state_size", int, path),
        "d_conv": field(config, "conv_kernel", int, path),
        "expand": d_inner // d_model,
        "dt_rank": rank,
    }
    if config.get("model_type") == FALCON_TYPE:
        eps = field(config, "mixer_rms_eps", float, path, default=1e-6)
        mixer_kwargs["bcdt_norm_eps"] = float(eps)
    return {
        "d_model": d_model,
        "n_layers": field(config, "num_hidden_layers", int, path),
        "vocab_size": field(config, "vocab_size", int, path),
        "norm_eps": float(field(config, "layer_norm_epsilon", float, path, default=1e-5)),
        "tie": bool(field(config, "tie_word_embeddings", bool, path, default=True)),
        "conv_bias": bool(field(config, "use_conv_bias", bool, path, default=True)),
        "mixer_kwargs": mixer_kwargs,
    }


def architecture(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The `layers.SequenceModel` keyword arguments (all but `key`) of this
    checkpoint's model (the interface in `train.hf`)."""
    return backbone_architecture("mamba", _options(config, path))


_MIXER_TENSORS = {  # checkpoint name -> ours, besides the convolution
    "in_proj.weight": "in_proj.weight",
    "x_proj.weight": "x_proj.weight",
    "dt_proj.weight": "dt_proj.weight",
    "dt_proj.bias": "dt_bias",
    "A_log": "A_log",
    "D": "D",
    "out_proj.weight": "out_proj.weight",
}


def load(config: dict[str, Any], tensors: Tensors, path: Path, chunk_size: int | None):
    o = _options(config, path)
    D, mk = o["d_model"], o["mixer_kwargs"]
    N, R, E = mk["d_state"], mk["dt_rank"], mk["expand"] * o["d_model"]
    shapes = {
        "in_proj.weight": (2 * E, D),
        "x_proj.weight": (R + 2 * N, E),
        "dt_proj.weight": (E, R),
        "dt_proj.bias": (E,),
        "A_log": (E, N),
        "D": (E,),
        "out_proj.weight": (D, E),
    }
    mixer_tensors = {k: (ours, shapes[k]) for k, ours in _MIXER_TENSORS.items()}
    arrays = load_backbone_layers(tensors, o, mixer_tensors, conv=E)
    architecture_ = with_chunk(architecture(config, path), chunk_size)
    return finish_backbone(tensors, arrays, architecture_)


def save(model: layers.SequenceModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`config.json` fields and tensors of a Mamba `SequenceModel`."""
    mixer = model.blocks[0].mixer
    V, D = model.embedding.weight.shape
    E = mixer.d_inner
    tensors = save_backbone(model, _MIXER_TENSORS)
    tied = model.head is None
    falcon = mixer.bcdt_norm_eps is not None
    config = {
        "architectures": [FALCON_ARCHITECTURE if falcon else ARCHITECTURE],
        "model_type": FALCON_TYPE if falcon else MODEL_TYPE,
        "hidden_size": D,
        "intermediate_size": E,
        "expand": E // D,
        "num_hidden_layers": len(model.blocks),
        "vocab_size": V,
        "state_size": mixer.d_state,
        "conv_kernel": mixer.d_conv,
        "time_step_rank": mixer.dt_rank,
        "layer_norm_epsilon": model.norm.eps,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "tie_word_embeddings": tied,
    }
    if falcon:
        config["mixer_rms_eps"] = mixer.bcdt_norm_eps
    return config, tensors
