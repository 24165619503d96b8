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
from ._tree import arrays_of, backbone_architecture, finish_backbone, with_chunk

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


def load(config: dict[str, Any], tensors: Tensors, path: Path, chunk_size: int | None):
    o = _options(config, path)
    D, V, L = o["d_model"], o["vocab_size"], o["n_layers"]
    mk = o["mixer_kwargs"]
    N, K, H, G = mk["d_state"], mk["d_conv"], mk["num_heads"], mk["n_groups"]
    E = mk["expand"] * D
    C = E + 2 * G * N
    arrays = {"embedding.weight": tensors.take("backbone.embeddings.weight", (V, D))}
    for i in range(L):
        h, o_ = f"backbone.layers.{i}.", f"blocks.{i}."
        arrays[o_ + "norm1.weight"] = tensors.take(h + "norm.weight", (D,))
        m, om = h + "mixer.", o_ + "mixer."
        arrays[om + "in_proj.weight"] = tensors.take(m + "in_proj.weight", (E + C + H, D))
        conv = tensors.take(m + "conv1d.weight", (C, 1, K))
        arrays[om + "conv_weight"] = np.ascontiguousarray(conv[:, 0, :].T)
        if o["conv_bias"]:
            arrays[om + "conv_bias"] = tensors.take(m + "conv1d.bias", (C,))
        else:
            arrays[om + "conv_bias"] = np.zeros((C,), np.float32)
        arrays[om + "dt_bias"] = tensors.take(m + "dt_bias", (H,))
        arrays[om + "A_log"] = tensors.take(m + "A_log", (H,))
        arrays[om + "D"] = tensors.take(m + "D", (H,))
        arrays[om + "norm_weight"] = tensors.take(m + "norm.weight", (E,))
        arrays[om + "out_proj.weight"] = tensors.take(m + "out_proj.weight", (D, E))
    architecture_ = with_chunk(architecture(config, path), chunk_size)
    return finish_backbone(tensors, arrays, architecture_)


def save(model: layers.SequenceModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`config.json` fields and tensors of a Mamba-2 `SequenceModel`."""
    mixer = model.blocks[0].mixer
    a = arrays_of(model)
    V, D = a["embedding.weight"].shape
    tensors = {"backbone.embeddings.weight": a["embedding.weight"]}
    for i in range(len(model.blocks)):
        h, o_ = f"backbone.layers.{i}.", f"blocks.{i}."
        tensors[h + "norm.weight"] = a[o_ + "norm1.weight"]
        m, om = h + "mixer.", o_ + "mixer."
        tensors[m + "in_proj.weight"] = a[om + "in_proj.weight"]
        conv = a[om + "conv_weight"]
        tensors[m + "conv1d.weight"] = np.ascontiguousarray(conv.T[:, None])
        tensors[m + "conv1d.bias"] = a[om + "conv_bias"]
        tensors[m + "dt_bias"] = a[om + "dt_bias"]
        tensors[m + "A_log"] = a[om + "A_log"]
        tensors[m + "D"] = a[om + "D"]
        tensors[m + "norm.weight"] = a[om + "norm_weight"]
        tensors[m + "out_proj.weight"] = a[om + "out_proj.weight"]
    tensors["backbone.norm_f.weight"] = a["norm.weight"]
    tied = model.head is None
    if not tied:
        tensors["lm_head.weight"] = a["head.weight"]
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
