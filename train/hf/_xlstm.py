"""`xlstm` (`xLSTMForCausalLM`): xLSTM 7B (Beck et al. 2025).

Per block `x + mLSTM(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))` with the hidden width
`ffn_proj_factor · hidden_size` rounded up to a multiple of
`ffn_round_up_to_multiple_of`; a final `out_norm`, an `lm_head`, and the logits
soft-capped at `output_logit_soft_cap`. The mixer is `layers._mlstm_large.MLSTMLarge`;
`weight_mode: fused` checkpoints (one matrix for q, k, v, o and one for both gates)
are split on loading and saved as `single`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.random as jr
import numpy as np

import layers
from layers._mlstm_large import MLSTMLarge

from ._io import HFError, Tensors, field, require
from ._tree import arrays_of, build, with_chunk

MODEL_TYPE = "xlstm"
ARCHITECTURE = "xLSTMForCausalLM"


def _round_up(x: float, multiple: int) -> int:
    return int(((x + multiple - 1) // multiple) * multiple)


def _options(config: dict[str, Any], path: Path) -> dict[str, Any]:
    d_model = field(config, "hidden_size", int, path)
    emb = field(config, "embedding_dim", int, path, default=d_model)
    if emb != d_model:
        raise HFError(
            f"{path}/config.json: embedding_dim {emb} differs from hidden_size {d_model}"
        )
    n_layers = field(config, "num_hidden_layers", int, path, default=None)
    n_layers = field(config, "num_blocks", int, path) if n_layers is None else n_layers
    H = field(config, "num_heads", int, path)
    qk = float(field(config, "qk_dim_factor", float, path, default=0.5))
    vf = float(field(config, "v_dim_factor", float, path, default=1.0))
    for name, dim in (
        ("qk_dim_factor", int(d_model * qk)),
        ("v_dim_factor", int(d_model * vf)),
    ):
        if dim % H:
            raise HFError(
                f"{path}/config.json: {name} * hidden_size = {dim} is not a multiple of "
                f"num_heads {H}"
            )
    mode = require(config, "weight_mode", ("single", "fused"), path, default="single")
    require(
        config, "use_bias", False, path, default=False,
        why="the mapping of biases is not implemented",
    )  # fmt: skip
    factor = float(field(config, "ffn_proj_factor", float, path, default=2.667))
    multiple = field(config, "ffn_round_up_to_multiple_of", int, path, default=64)
    cap = config.get("gate_soft_cap", 15.0)
    out_cap = config.get("output_logit_soft_cap", 30.0)
    return {
        "d_model": d_model,
        "n_layers": n_layers,
        "vocab_size": field(config, "vocab_size", int, path),
        "norm_eps": float(field(config, "norm_eps", float, path, default=1e-6)),
        "tie": bool(field(config, "tie_word_embeddings", bool, path, default=False)),
        "fused": mode == "fused",
        "mlp_hidden": _round_up(d_model * factor, multiple),
        "logit_soft_cap": None if out_cap is None else float(out_cap),
        "mixer_kwargs": {
            "num_heads": H,
            "qk_dim_factor": qk,
            "v_dim_factor": vf,
            "gate_soft_cap": None if cap is None else float(cap),
            "norm_eps": float(field(config, "norm_eps", float, path, default=1e-6)),
            "cell_eps": float(field(config, "eps", float, path, default=1e-6)),
        },
    }


def architecture(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The `layers.SequenceModel` keyword arguments (all but `key`) of this
    checkpoint's model (the interface in `train.hf`)."""
    o = _options(config, path)
    V = o["vocab_size"]
    return {
        "mixer": MLSTMLarge,
        "d_model": o["d_model"],
        "n_layers": o["n_layers"],
        "d_output": V,
        "vocab_size": V,
        "mixer_kwargs": dict(o["mixer_kwargs"]),
        "mlp_ratio": 0.0,
        "mlp_hidden": o["mlp_hidden"],
        "mlp_activation": "silu",
        "norm_eps": o["norm_eps"],
        "tie_embeddings": o["tie"],
        "head_bias": False,
        "logit_soft_cap": o["logit_soft_cap"],
    }


def load(config: dict[str, Any], tensors: Tensors, path: Path, chunk_size: int | None):
    o = _options(config, path)
    D, V, L, F = o["d_model"], o["vocab_size"], o["n_layers"], o["mlp_hidden"]
    mk = o["mixer_kwargs"]
    H = mk["num_heads"]
    QK, VD = int(D * mk["qk_dim_factor"]), int(D * mk["v_dim_factor"])
    arrays = {"embedding.weight": tensors.take("backbone.embeddings.weight", (V, D))}
    for i in range(L):
        h, o_ = f"backbone.blocks.{i}.", f"blocks.{i}."
        arrays[o_ + "norm1.weight"] = tensors.take(h + "norm_mlstm.weight", (D,))
        arrays[o_ + "norm2.weight"] = tensors.take(h + "norm_ffn.weight", (D,))
        m, om = h + "mlstm_layer.", o_ + "mixer."
        if o["fused"]:
            w = tensors.take(m + "qkv_opreact.weight", (2 * QK + 2 * VD, D))
            q, k, v, og = np.split(w, [QK, 2 * QK, 2 * QK + VD])
            g = tensors.take(m + "ifgate_preact.weight", (2 * H, D))
            b = tensors.take(m + "ifgate_preact.bias", (2 * H,))
            gates = {"igate": (g[:H], b[:H]), "fgate": (g[H:], b[H:])}
        else:
            q = tensors.take(m + "q.weight", (QK, D))
            k = tensors.take(m + "k.weight", (QK, D))
            v = tensors.take(m + "v.weight", (VD, D))
            og = tensors.take(m + "ogate_preact.weight", (VD, D))
            gates = {
                g: (
                    tensors.take(m + f"{g}_preact.weight", (H, D)),
                    tensors.take(m + f"{g}_preact.bias", (H,)),
                )
                for g in ("igate", "fgate")
            }
        arrays.update({om + "q.weight": q, om + "k.weight": k, om + "v.weight": v})
        arrays[om + "ogate.weight"] = og
        for g, (w, b) in gates.items():
            arrays[om + f"{g}.weight"], arrays[om + f"{g}.bias"] = w, b
        arrays[om + "norm_weight"] = tensors.take(m + "multihead_norm.weight", (VD,))
        arrays[om + "out_proj.weight"] = tensors.take(m + "out_proj.weight", (D, VD))
        f_ = h + "ffn."
        if o["fused"]:
            w = tensors.take(f_ + "proj_up_gate_z.weight", (2 * F, D))
            arrays[o_ + "mlp.gate.weight"], arrays[o_ + "mlp.up.weight"] = w[:F], w[F:]
        else:
            arrays[o_ + "mlp.gate.weight"] = tensors.take(
                f_ + "proj_up_gate.weight", (F, D)
            )
            arrays[o_ + "mlp.up.weight"] = tensors.take(f_ + "proj_up.weight", (F, D))
        arrays[o_ + "mlp.down.weight"] = tensors.take(f_ + "proj_down.weight", (D, F))
    arrays["norm.weight"] = tensors.take("backbone.out_norm.weight", (D,))
    # transformers' xLSTM never ties lm_head to the embedding (whatever
    # tie_word_embeddings says): a stored lm_head is the head; none, with the flag set,
    # is read as tied
    tie = o["tie"] and "lm_head.weight" not in tensors
    if not tie:
        arrays["head.weight"] = tensors.take("lm_head.weight", (V, D))
    tensors.finish()

    architecture_ = with_chunk(architecture(config, path), chunk_size)
    architecture_["tie_embeddings"] = tie
    return build(lambda: layers.SequenceModel(**architecture_, key=jr.key(0)), arrays)


def check(model: layers.SequenceModel) -> None:
    """Refuse what `xLSTMForCausalLM` cannot express."""
    mixer = model.blocks[0].mixer
    if any(b.mlp is None or b.mlp.activation != "silu" for b in model.blocks):
        raise ValueError("save_hf: xLSTM blocks have a SwiGLU MLP (mlp_activation='silu')")
    widths = {b.mlp.gate.out_features for b in model.blocks}
    if len(widths) != 1:
        raise ValueError(f"save_hf: the blocks' MLP widths differ: {sorted(widths)}")
    if mixer.norm_bias is not None or mixer.q.bias is not None:
        raise ValueError("save_hf: xLSTM mixers with biases are not implemented")
    D = model.d_model
    if int(D * (mixer.d_qk / D)) != mixer.d_qk or int(D * (mixer.d_v / D)) != mixer.d_v:
        raise ValueError("save_hf: d_qk or d_v is not exactly a factor times d_model")
    eps = {model.norm.eps, mixer.norm_eps} | {b.norm2.eps for b in model.blocks}
    if len(eps) != 1:
        raise ValueError(f"save_hf: xLSTM has one norm_eps, the model has {sorted(eps)}")


def save(model: layers.SequenceModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`config.json` fields and tensors of an xLSTM 7B style `SequenceModel`."""
    check(model)
    mixer = model.blocks[0].mixer
    a = arrays_of(model)
    V, D = a["embedding.weight"].shape
    F = model.blocks[0].mlp.gate.out_features
    tensors = {"backbone.embeddings.weight": a["embedding.weight"]}
    for i in range(len(model.blocks)):
        h, o_ = f"backbone.blocks.{i}.", f"blocks.{i}."
        tensors[h + "norm_mlstm.weight"] = a[o_ + "norm1.weight"]
        tensors[h + "norm_ffn.weight"] = a[o_ + "norm2.weight"]
        m, om = h + "mlstm_layer.", o_ + "mixer."
        for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("ogate", "ogate_preact")):
            tensors[m + f"{theirs}.weight"] = a[om + f"{ours}.weight"]
        for g in ("igate", "fgate"):
            tensors[m + f"{g}_preact.weight"] = a[om + f"{g}.weight"]
            tensors[m + f"{g}_preact.bias"] = a[om + f"{g}.bias"]
        tensors[m + "multihead_norm.weight"] = a[om + "norm_weight"]
        tensors[m + "out_proj.weight"] = a[om + "out_proj.weight"]
        tensors[h + "ffn.proj_up_gate.weight"] = a[o_ + "mlp.gate.weight"]
        tensors[h + "ffn.proj_up.weight"] = a[o_ + "mlp.up.weight"]
        tensors[h + "ffn.proj_down.weight"] = a[o_ + "mlp.down.weight"]
    tensors["backbone.out_norm.weight"] = a["norm.weight"]
    tied = model.head is None  # written out: transformers' xLSTM does not tie
    tensors["lm_head.weight"] = a["embedding.weight"] if tied else a["head.weight"]
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": V,
        "hidden_size": D,
        "embedding_dim": D,
        "num_hidden_layers": len(model.blocks),
        "num_blocks": len(model.blocks),
        "num_heads": mixer.num_heads,
        "qk_dim_factor": mixer.d_qk / D,
        "v_dim_factor": mixer.d_v / D,
        "use_bias": False,
        "tie_word_embeddings": tied,
        "add_out_norm": True,
        "norm_eps": model.norm.eps,
        "eps": mixer.cell_eps,
        "gate_soft_cap": mixer.gate_soft_cap,
        "output_logit_soft_cap": model.logit_soft_cap,
        # F exactly: D * (F / D) is within rounding of F, rounded up to a multiple of F
        "ffn_proj_factor": F / D,
        "ffn_round_up_to_multiple_of": F,
        "weight_mode": "single",
        "mode": "inference",
        "inference_state_dtype": "float32",
    }
    return config, tensors
