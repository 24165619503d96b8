"""`recurrent_gemma` (`RecurrentGemmaForCausalLM`): RecurrentGemma, Google's Griffin
language model (De et al. 2024; Botev et al. 2024).

The reference (`transformers.models.recurrent_gemma`) embeds tokens and multiplies
them by `√hidden_size` rounded to bfloat16; each layer is `x + temporal(norm(x))`,
then `x + mlp(norm(x))`, with Gemma's RMS norms (scale `1 + weight`), the temporal
block taken from `block_types` repeated over the layers: `recurrent` (the Hawk block
around an RG-LRU: our `layers.RGLRU` with `reset_rule="recurrent_gemma"`) or
`attention` (sliding-window multi-query attention with a rotary embedding on part of
each head and a bias on the output map: our `layers.LocalAttention`). The MLP is a
GeGLU (tanh gelu) of width `intermediate_size // 2` with biases; a final norm, the
`lm_head` (tied by default) and the logits soft-capped at `logits_soft_cap`.

Tensor for tensor our layers hold the same numbers, except: the RG-LRU's
`recurrent_param` is minus our `a_param` (their decay is `exp(-8 r softplus(p))`,
ours `σ(Λ)^(8 r)`), its gate biases are `(heads, block)` where ours are flat, and the
convolution is stored `(lru_width, 1, K)` (ours `(K, lru_width)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

import layers

from ._io import HFError, Tensors, field, require
from ._tree import arrays_of, finish_backbone

MODEL_TYPE = "recurrent_gemma"
ARCHITECTURE = "RecurrentGemmaForCausalLM"
_KINDS = {"recurrent": "rglru", "attention": "local_attention"}
# the tanh approximation of gelu, which is jax.nn.gelu's default
_GELUS = ("gelu_pytorch_tanh", "gelu_new")


def embed_scale(d_model: int) -> float:
    """`√d_model` rounded to bfloat16, as the reference's `normalizer` buffer."""
    return float(np.asarray(np.sqrt(d_model), np.float32).astype(jnp.bfloat16))


def _rope(config: dict[str, Any], path: Path) -> tuple[float, float]:
    """`(rope_theta, partial_rotary_factor)` from `rope_parameters` (transformers 5) or
    the top level (older `config.json` files)."""
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise HFError(f"{path}/config.json: field 'rope_parameters' must be a mapping")
    rope_type = rope.get("rope_type", config.get("rope_type", "default"))
    if rope_type != "default":
        raise HFError(
            f"{path}/config.json: field 'rope_parameters.rope_type' = {rope_type!r} is "
            "not supported (expected 'default')"
        )
    merged = {
        **{k: config[k] for k in ("rope_theta", "partial_rotary_factor") if k in config}
    }
    merged.update(
        {k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope}
    )
    theta = float(field(merged, "rope_theta", float, path, default=10_000.0))
    factor = float(field(merged, "partial_rotary_factor", float, path, default=0.5))
    return theta, factor


def _options(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Our constructor options from `config.json`, refusing what we do not implement."""
    where = f"{path}/config.json"
    D = field(config, "hidden_size", int, path)
    L = field(config, "num_hidden_layers", int, path)
    H = field(config, "num_attention_heads", int, path)
    KV = field(config, "num_key_value_heads", int, path, default=H)
    if KV < 1 or H % KV:
        raise HFError(
            f"{where}: num_key_value_heads {KV} does not divide num_attention_heads {H}"
        )
    head_dim = D // H  # transformers sets it so, whatever config.json says
    stored = config.get("head_dim")
    if stored is not None and stored != head_dim:
        raise HFError(
            f"{where}: field 'head_dim' = {stored!r} differs from hidden_size // "
            f"num_attention_heads = {head_dim}, which transformers uses"
        )
    R = field(config, "lru_width", int, path, default=D)
    kinds = field(
        config, "block_types", list, path, default=["recurrent", "recurrent", "attention"]
    )
    bad = [k for k in kinds if k not in _KINDS]
    if bad or not kinds:
        raise HFError(
            f"{where}: field 'block_types' = {kinds!r}: expected a non-empty list of "
            f"{sorted(_KINDS)}"
        )
    if "recurrent" in kinds and R % H:
        raise HFError(
            f"{where}: lru_width {R} is not a multiple of num_attention_heads {H} (the "
            "RG-LRU's gates are block-diagonal over the heads)"
        )
    require(config, "hidden_activation", _GELUS, path, default="gelu_pytorch_tanh",
            why="our GeGLU and RG-LRU gate use the tanh approximation of gelu")  # fmt: skip
    theta, factor = _rope(config, path)
    rotary = int(head_dim * factor)
    if "attention" in kinds and (rotary < 2 or rotary % 2):
        raise HFError(
            f"{where}: partial_rotary_factor {factor} of head_dim {head_dim} rotates "
            f"{rotary} channels; layers.LocalAttention needs an even number >= 2"
        )
    cap = field(config, "logits_soft_cap", float, path, default=30.0)
    F = field(config, "intermediate_size", int, path) // 2
    if F < 1:
        raise HFError(f"{where}: intermediate_size // 2 must be >= 1 (the MLP's width)")
    pattern = [_KINDS[k] for k in kinds][:L]  # repeated over the layers
    mixer_kwargs = {
        "rglru": {"d_rnn": R, "d_conv": field(config, "conv1d_width", int, path, default=4),
                  "num_heads": H, "reset_rule": "recurrent_gemma"},
        "local_attention": {
            "num_heads": H, "num_kv_heads": KV, "head_dim": head_dim,
            "window": field(config, "attention_window_size", int, path, default=2048),
            "rope_base": theta, "rotary_dim": None if rotary == head_dim else rotary,
            "qkv_bias": bool(field(config, "attention_bias", bool, path, default=False)),
            "out_bias": True,
        },
    }  # fmt: skip
    return {
        "d_model": D,
        "n_layers": L,
        "vocab_size": field(config, "vocab_size", int, path),
        "pattern": pattern,
        "mixer_kwargs": {k: v for k, v in mixer_kwargs.items() if k in pattern},
        "mlp_hidden": F,
        "norm_eps": float(field(config, "rms_norm_eps", float, path, default=1e-6)),
        "tie": bool(field(config, "tie_word_embeddings", bool, path, default=True)),
        "logit_soft_cap": float(cap),
    }


def architecture(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The `layers.SequenceModel` keyword arguments (all but `key`) of this
    checkpoint's model (the interface in `train.hf`)."""
    o = _options(config, path)
    V = o["vocab_size"]
    return {
        "mixer": o["pattern"],
        "d_model": o["d_model"],
        "n_layers": o["n_layers"],
        "d_output": V,
        "vocab_size": V,
        "mixer_kwargs": o["mixer_kwargs"],
        "mlp_ratio": 0.0,
        "mlp_hidden": o["mlp_hidden"],
        "mlp_activation": "gelu",
        "mlp_bias": True,
        "norm_eps": o["norm_eps"],
        "norm_offset": 1.0,
        "embed_scale": embed_scale(o["d_model"]),
        "tie_embeddings": o["tie"],
        "head_bias": False,
        "logit_soft_cap": o["logit_soft_cap"],
    }


def _linear(tensors, theirs, ours, shape, bias, arrays):
    arrays[ours + ".weight"] = tensors.take(theirs + ".weight", shape)
    if bias:
        arrays[ours + ".bias"] = tensors.take(theirs + ".bias", shape[:1])


def _load_recurrent(tensors, h, o_, mk, D, arrays):
    R, K, H = mk["d_rnn"], mk["d_conv"], mk["num_heads"]
    t, m = h + "temporal_block.", o_ + "mixer."
    _linear(tensors, t + "linear_y", m + "gate_proj", (R, D), True, arrays)
    _linear(tensors, t + "linear_x", m + "in_proj", (R, D), True, arrays)
    _linear(tensors, t + "linear_out", m + "out_proj", (D, R), True, arrays)
    conv = tensors.take(t + "conv_1d.weight", (R, 1, K))
    arrays[m + "conv_weight"] = np.ascontiguousarray(conv[:, 0, :].T)
    arrays[m + "conv_bias"] = tensors.take(t + "conv_1d.bias", (R,))
    g = t + "rg_lru."
    arrays[m + "a_param"] = -tensors.take(g + "recurrent_param", (R,))
    for ours, theirs in (("a", "recurrent_gate"), ("x", "input_gate")):
        arrays[m + f"W_{ours}"] = tensors.take(g + theirs + "_weight", (H, R // H, R // H))
        arrays[m + f"b_{ours}"] = tensors.take(g + theirs + "_bias", (H, R // H)).reshape(R)


def _load_attention(tensors, h, o_, mk, D, arrays):
    H, KV, hd, bias = mk["num_heads"], mk["num_kv_heads"], mk["head_dim"], mk["qkv_bias"]
    t, m = h + "temporal_block.", o_ + "mixer."
    _linear(tensors, t + "q_proj", m + "q_proj", (H * hd, D), bias, arrays)
    _linear(tensors, t + "k_proj", m + "k_proj", (KV * hd, D), bias, arrays)
    _linear(tensors, t + "v_proj", m + "v_proj", (KV * hd, D), bias, arrays)
    _linear(tensors, t + "o_proj", m + "o_proj", (D, H * hd), True, arrays)


def load(config: dict[str, Any], tensors: Tensors, path: Path, chunk_size: int | None):
    """The model of `architecture(config, path)` from `tensors` (`chunk_size` is
    unused: neither mixer has one)."""
    arch = architecture(config, path)
    D, V, L, F = arch["d_model"], arch["vocab_size"], arch["n_layers"], arch["mlp_hidden"]
    pattern = arch["mixer"]
    arrays = {"embedding.weight": tensors.take("model.embed_tokens.weight", (V, D))}
    for i in range(L):
        h, o_ = f"model.layers.{i}.", f"blocks.{i}."
        arrays[o_ + "norm1.weight"] = tensors.take(h + "temporal_pre_norm.weight", (D,))
        arrays[o_ + "norm2.weight"] = tensors.take(h + "channel_pre_norm.weight", (D,))
        kind = pattern[i % len(pattern)]
        loader = _load_recurrent if kind == "rglru" else _load_attention
        loader(tensors, h, o_, arch["mixer_kwargs"][kind], D, arrays)
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj")):
            _linear(
                tensors, h + f"mlp_block.{theirs}", o_ + f"mlp.{ours}", (F, D), True, arrays
            )
        _linear(tensors, h + "mlp_block.down_proj", o_ + "mlp.down", (D, F), True, arrays)
    return finish_backbone(tensors, arrays, arch, final_norm="model.final_norm.weight")


def kinds_of(block) -> str:
    return "recurrent" if isinstance(block.mixer, layers.RGLRU) else "attention"


def _one(values, what: str):
    values = set(values)
    if len(values) != 1:
        raise ValueError(f"save_hf: RecurrentGemma has one {what}, the model has {values}")
    return next(iter(values))


def check(model: layers.SequenceModel) -> list[str]:
    """Refuse what `RecurrentGemmaForCausalLM` cannot express; returns the block
    types."""
    D, kinds = model.d_model, []
    for i, b in enumerate(model.blocks):
        m = b.mixer
        if isinstance(m, layers.RGLRU):
            if m.reset_rule != "recurrent_gemma" or m.c != 8.0:
                raise ValueError(
                    f"save_hf: blocks.{i}: RecurrentGemma's RG-LRU is "
                    f"RGLRU(reset_rule='recurrent_gemma', c=8), got "
                    f"reset_rule={m.reset_rule!r}, c={m.c}"
                )
            kinds.append("recurrent")
        elif isinstance(m, layers.LocalAttention):
            if m.o_proj.bias is None or m.q_norm is not None or m.rope_base is None:
                raise ValueError(
                    f"save_hf: blocks.{i}: RecurrentGemma's attention has an output "
                    "bias (out_bias=True), a rotary embedding and no QK-norm"
                )
            if m.head_dim != D // m.num_heads:
                raise ValueError(
                    f"save_hf: blocks.{i}: head_dim {m.head_dim} is not d_model // "
                    f"num_heads = {D // m.num_heads}"
                )
            if (
                len({m.q_proj.bias is None, m.k_proj.bias is None, m.v_proj.bias is None})
                > 1
            ):
                raise ValueError(f"save_hf: blocks.{i}: q, k, v biases must go together")
            kinds.append("attention")
        else:
            raise ValueError(
                f"save_hf: blocks.{i}: {type(m).__name__} is not in RecurrentGemma"
            )
        if b.mlp is None or b.mlp.activation != "gelu" or b.mlp.gate.bias is None:
            raise ValueError(
                f"save_hf: blocks.{i}: RecurrentGemma blocks have a GeGLU MLP with biases "
                "(mlp_activation='gelu', mlp_bias=True)"
            )
    _one([b.mlp.gate.out_features for b in model.blocks], "MLP width")
    _one([b.mixer.num_heads for b in model.blocks], "number of heads")
    for cls, attrs in (
        (layers.RGLRU, ("d_rnn", "d_conv")),
        (layers.LocalAttention, ("num_kv_heads", "window", "rope_base", "rotary_dim")),
    ):
        mixers = [b.mixer for b in model.blocks if isinstance(b.mixer, cls)]
        for attr in attrs:
            if mixers:
                _one([getattr(m, attr) for m in mixers], attr)
    att = next((b.mixer for b in model.blocks if kinds_of(b) == "attention"), None)
    if att is not None:
        rotary = att.head_dim if att.rotary_dim is None else att.rotary_dim
        if int(att.head_dim * (rotary / att.head_dim)) != rotary:
            raise ValueError(
                f"save_hf: rotary_dim {rotary} of head_dim {att.head_dim} is not "
                "int(head_dim * partial_rotary_factor) for any float factor"
            )
    offsets = {model.norm_offset} | {b.norm_offset for b in model.blocks}
    if offsets != {1.0}:
        raise ValueError(
            f"save_hf: Gemma's norms scale by 1 + weight (norm_offset=1), got {offsets}"
        )
    if model.embed_scale != embed_scale(D):
        raise ValueError(
            f"save_hf: RecurrentGemma scales the embeddings by {embed_scale(D)} "
            f"(√d_model in bfloat16), the model by {model.embed_scale}"
        )
    if model.logit_soft_cap is None:
        raise ValueError("save_hf: RecurrentGemma soft-caps its logits (logit_soft_cap)")
    _one([model.norm.eps] + [b.norm2.eps for b in model.blocks], "rms_norm_eps")
    return kinds


def save(model: layers.SequenceModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`config.json` fields and tensors of a RecurrentGemma `SequenceModel`."""
    kinds = check(model)
    a = arrays_of(model)
    V, D = a["embedding.weight"].shape
    blocks = model.blocks
    rnn = next((b.mixer for b in blocks if isinstance(b.mixer, layers.RGLRU)), None)
    att = next(
        (b.mixer for b in blocks if isinstance(b.mixer, layers.LocalAttention)), None
    )
    H = blocks[0].mixer.num_heads
    tensors = {"model.embed_tokens.weight": a["embedding.weight"]}
    for i, kind in enumerate(kinds):
        h, o_ = f"model.layers.{i}.", f"blocks.{i}."
        t, m = h + "temporal_block.", o_ + "mixer."
        tensors[h + "temporal_pre_norm.weight"] = a[o_ + "norm1.weight"]
        tensors[h + "channel_pre_norm.weight"] = a[o_ + "norm2.weight"]
        if kind == "recurrent":
            names = (
                ("linear_y", "gate_proj"),
                ("linear_x", "in_proj"),
                ("linear_out", "out_proj"),
            )
            R = rnn.d_rnn
            tensors[t + "conv_1d.weight"] = np.ascontiguousarray(
                a[m + "conv_weight"].T[:, None]
            )
            tensors[t + "conv_1d.bias"] = a[m + "conv_bias"]
            g = t + "rg_lru."
            tensors[g + "recurrent_param"] = -a[m + "a_param"]
            for ours, theirs in (("a", "recurrent_gate"), ("x", "input_gate")):
                tensors[g + theirs + "_weight"] = a[m + f"W_{ours}"]
                tensors[g + theirs + "_bias"] = a[m + f"b_{ours}"].reshape(H, R // H)
        else:
            names = tuple((p, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        for theirs, ours in names:
            for kind_ in ("weight", "bias"):
                if m + f"{ours}.{kind_}" in a:
                    tensors[t + f"{theirs}.{kind_}"] = a[m + f"{ours}.{kind_}"]
        for theirs, ours in (
            ("gate_proj", "gate"),
            ("up_proj", "up"),
            ("down_proj", "down"),
        ):
            for kind_ in ("weight", "bias"):
                tensors[h + f"mlp_block.{theirs}.{kind_}"] = a[o_ + f"mlp.{ours}.{kind_}"]
    tensors["model.final_norm.weight"] = a["norm.weight"]
    tied = model.head is None
    if not tied:
        tensors["lm_head.weight"] = a["head.weight"]
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": V,
        "hidden_size": D,
        "num_hidden_layers": len(blocks),
        "intermediate_size": 2 * blocks[0].mlp.gate.out_features,
        "num_attention_heads": H,
        "head_dim": D // H,
        "block_types": kinds,
        "rms_norm_eps": model.norm.eps,
        "logits_soft_cap": model.logit_soft_cap,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": tied,
    }
    if rnn is not None:
        config.update(lru_width=rnn.d_rnn, conv1d_width=rnn.d_conv)
    else:
        config.update(lru_width=D)
    if att is not None:
        config.update(
            num_key_value_heads=att.num_kv_heads,
            attention_window_size=att.window,
            attention_bias=att.q_proj.bias is not None,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": att.rope_base,
                "partial_rotary_factor": (att.rotary_dim or att.head_dim) / att.head_dim,
            },
        )
    return config, tensors
