"""`mamba2` (`Mamba2ForCausalLM`): Dao and Gu's Mamba-2 (SSD) language model.

The reference (`transformers.models.mamba2`) is `x + mixer(RMSNorm(x))` per layer, no
MLP, a final `norm_f` and an `lm_head` (untied by default). Its mixer is our
`layers.Mamba2` with `n_groups` groups of `B, C` and the gated RMS norm taken per
group of `d_inner / n_groups` channels; the depthwise convolution over `x, B, C` is
stored as `(channels, 1, K)` (ours `(K, channels)`).
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

MODEL_TYPE = "mamba2"
ARCHITECTURE = "Mamba2ForCausalLM"


def _number(value) -> float | None:
    """A JSON number; transformers >= 5 writes infinities as `{"__float__": "Infinity"}`."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _options(config: dict[str, Any], path: Path) -> dict[str, Any]:
    d_model = field(config, "hidden_size", int, path)
    expand = field(config, "expand", int, path, default=2)
    H = field(config, "num_heads", int, path)
    P = field(config, "head_dim", int, path)
    if H * P != expand * d_model:
        raise HFError(
            f"{path}/config.json: num_heads * head_dim = {H * P} differs from expand * "
            f"hidden_size = {expand * d_model}"
        )
    G = field(config, "n_groups", int, path, default=8)
    if H % G:
        raise HFError(f"{path}/config.json: n_groups {G} does not divide num_heads {H}")
    require(config, "hidden_act", "silu", path, default="silu")
    require(
        config,
        "use_bias",
        False,
        path,
        default=False,
        why="layers.Mamba2's in_proj and out_proj have no bias",
    )
    limit = config.get("time_step_limit", [0.0, math.inf])
    bounds = [_number(v) for v in limit] if isinstance(limit, list | tuple) else None
    if (
        not bounds
        or len(bounds) != 2
        or None in bounds
        or bounds[0] > 0
        or bounds[1] != math.inf
    ):
        raise HFError(
            f"{path}/config.json: field 'time_step_limit' = {limit!r} is not supported "
            "(expected [0.0, Infinity]: layers.Mamba2 does not clamp the step size)"
        )
    return {
        "d_model": d_model,
        "n_layers": field(config, "num_hidden_layers", int, path),
        "vocab_size": field(config, "vocab_size", int, path),
        "norm_eps": float(field(config, "layer_norm_epsilon", float, path, default=1e-5)),
        "tie": bool(field(config, "tie_word_embeddings", bool, path, default=False)),
        "conv_bias": bool(field(config, "use_conv_bias", bool, path, default=True)),
        "mixer_kwargs": {
            "d_state": field(config, "state_size", int, path),
            "d_conv": field(config, "conv_kernel", int, path),
            "expand": expand,
            "num_heads": H,
            "n_groups": G,
            "norm_eps": float(
                field(config, "layer_norm_epsilon", float, path, default=1e-5)
            ),
        },
    }


def architecture(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The `layers.SequenceModel` keyword arguments (all but `key`) of this
    checkpoint's model (the interface in `train.hf`)."""
    return backbone_architecture("mamba2", _options(config, path))


_MIXER_TENSORS = {  # checkpoint name -> ours, besides the convolution
    "in_proj.weight": "in_proj.weight",
    "dt_bias": "dt_bias",
    "A_log": "A_log",
    "D": "D",
    "norm.weight": "norm_weight",
    "out_proj.weight": "out_proj.weight",
}


def load(config: dict[str, Any], tensors: Tensors, path: Path, chunk_size: int | None):
    o = _options(config, path)
    D, mk = o["d_model"], o["mixer_kwargs"]
    N, H, G = mk["d_state"], mk["num_heads"], mk["n_groups"]
    E = mk["expand"] * D
    C = E + 2 * G * N  # the convolution's channels: x, B, C
    shapes = {
        "in_proj.weight": (E + C + H, D),
        "dt_bias": (H,),
        "A_log": (H,),
        "D": (H,),
        "norm.weight": (E,),
        "out_proj.weight": (D, E),
    }
    mixer_tensors = {k: (ours, shapes[k]) for k, ours in _MIXER_TENSORS.items()}
    arrays = load_backbone_layers(tensors, o, mixer_tensors, conv=C)
    architecture_ = with_chunk(architecture(config, path), chunk_size)
    return finish_backbone(tensors, arrays, architecture_)


def save(model: layers.SequenceModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`config.json` fields and tensors of a Mamba-2 `SequenceModel`."""
    mixer = model.blocks[0].mixer
    V, D = model.embedding.weight.shape
    tensors = save_backbone(model, _MIXER_TENSORS)
    tied = model.head is None
    if mixer.norm_eps != model.norm.eps:
        raise ValueError(
            f"save_hf: Mamba-2 has one layer_norm_epsilon, but the mixer's gated norm "
            f"has eps {mixer.norm_eps} and the model's norms {model.norm.eps}"
        )
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "hidden_size": D,
        "expand": mixer.d_inner // D,
        "num_heads": mixer.num_heads,
        "head_dim": mixer.head_dim,
        "n_groups": mixer.n_groups,
        "num_hidden_layers": len(model.blocks),
        "vocab_size": V,
        "state_size": mixer.d_state,
        "conv_kernel": mixer.d_conv,
        "layer_norm_epsilon": model.norm.eps,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "rms_norm": True,
        "norm_before_gate": False,
        "time_step_limit": [0.0, math.inf],
        "tie_word_embeddings": tied,
    }
    return config, tensors
