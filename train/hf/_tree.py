"""Our side of the mapping: a model's skeleton filled from arrays named by path."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import layers

from ..checkpoint import path_str


def build(make: Callable[[], eqx.Module], arrays: Mapping[str, np.ndarray]) -> eqx.Module:
    """`make()` with every array leaf replaced by `arrays[path]` (paths as
    `"blocks.0.norm1.weight"`).

    `make` is traced only for shapes (no random initialisation is computed); every
    leaf must be given with its exact shape, and every array must be used.
    """
    skeleton = eqx.filter_eval_shape(make)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    filled, used = [], set()
    for path, leaf in leaves:
        name = path_str(path)
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            filled.append(leaf)
            continue
        if name not in arrays:
            raise AssertionError(f"the mapping gives no array for {name}")
        value = np.asarray(arrays[name])
        if value.shape != leaf.shape:
            raise AssertionError(f"{name}: mapped shape {value.shape}, needs {leaf.shape}")
        filled.append(jnp.asarray(value, leaf.dtype))
        used.add(name)
    extra = set(arrays) - used
    if extra:
        raise AssertionError(f"the mapping gives arrays the model lacks: {sorted(extra)}")
    return jax.tree_util.tree_unflatten(treedef, filled)


def arrays_of(model: eqx.Module) -> dict[str, np.ndarray]:
    """The model's arrays by path, as float32 numpy arrays."""
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_array))
    return {path_str(p): np.asarray(leaf, np.float32) for p, leaf in leaves}


def backbone_architecture(mixer: str, options: Mapping) -> dict:
    """The `SequenceModel` keyword arguments (all but `key`) of a Mamba-family
    checkpoint: `L` blocks of `mixer` with no MLP, the final norm, the LM head (tied
    or not, no bias), from the `_options` of its loader."""
    V = options["vocab_size"]
    return {
        "mixer": mixer,
        "d_model": options["d_model"],
        "n_layers": options["n_layers"],
        "d_output": V,
        "vocab_size": V,
        "mixer_kwargs": dict(options["mixer_kwargs"]),
        "mlp_ratio": 0.0,
        "norm_eps": options["norm_eps"],
        "tie_embeddings": options["tie"],
        "head_bias": False,
    }


def with_chunk(architecture: Mapping, chunk_size: int | None) -> dict:
    """`architecture` with `chunk_size` added to the (single) mixer's options."""
    architecture = dict(architecture)
    if chunk_size is not None:
        architecture["mixer_kwargs"] = {
            **architecture["mixer_kwargs"],
            "chunk_size": chunk_size,
        }
    return architecture


def finish_backbone(
    tensors, arrays, architecture: Mapping, final_norm: str = "backbone.norm_f.weight"
):
    """The tail shared by the loaders: take the final norm (the tensor `final_norm`)
    and the LM head (or skip it when tied) from `tensors`, check nothing is left over,
    and build the `SequenceModel` of `architecture` from `arrays`."""
    D, V = architecture["d_model"], architecture["vocab_size"]
    arrays["norm.weight"] = tensors.take(final_norm, (D,))
    if architecture["tie_embeddings"]:
        tensors.skip("lm_head.weight")  # save_pretrained may or may not write it
    else:
        arrays["head.weight"] = tensors.take("lm_head.weight", (V, D))
    tensors.finish()
    return build(lambda: layers.SequenceModel(**architecture, key=jr.key(0)), arrays)


def load_backbone_layers(
    tensors, options: Mapping, mixer_tensors: Mapping[str, tuple[str, tuple]], conv: int
) -> dict[str, np.ndarray]:
    """The embedding and the layers of a Mamba-family checkpoint as our arrays.

    Each layer `i` is `backbone.layers.{i}.norm.weight` (our `blocks.{i}.norm1`), the
    depthwise convolution `mixer.conv1d` over `conv` channels (stored `(conv, 1, K)`,
    ours `(K, conv)`; a zero bias where the checkpoint has none) and the mixer's other
    tensors, `mixer_tensors[hf_name] = (our_name, shape)`, taken as they are.
    """
    D, V, K = options["d_model"], options["vocab_size"], options["mixer_kwargs"]["d_conv"]
    arrays = {"embedding.weight": tensors.take("backbone.embeddings.weight", (V, D))}
    for i in range(options["n_layers"]):
        h, o = f"backbone.layers.{i}.", f"blocks.{i}."
        arrays[o + "norm1.weight"] = tensors.take(h + "norm.weight", (D,))
        m, om = h + "mixer.", o + "mixer."
        for hf_name, (ours, shape) in mixer_tensors.items():
            arrays[om + ours] = tensors.take(m + hf_name, shape)
        weight = tensors.take(m + "conv1d.weight", (conv, 1, K))
        arrays[om + "conv_weight"] = np.ascontiguousarray(weight[:, 0, :].T)
        if options["conv_bias"]:
            arrays[om + "conv_bias"] = tensors.take(m + "conv1d.bias", (conv,))
        else:
            arrays[om + "conv_bias"] = np.zeros((conv,), np.float32)
    return arrays


def save_backbone(
    model: layers.SequenceModel, mixer_tensors: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """The tensors of a Mamba-family checkpoint from our model: the inverse of
    `load_backbone_layers` and `finish_backbone`, with `mixer_tensors[hf_name] =
    our_name`; `lm_head.weight` only when the head is not tied."""
    a = arrays_of(model)
    tensors = {"backbone.embeddings.weight": a["embedding.weight"]}
    for i in range(len(model.blocks)):
        h, o = f"backbone.layers.{i}.", f"blocks.{i}."
        tensors[h + "norm.weight"] = a[o + "norm1.weight"]
        m, om = h + "mixer.", o + "mixer."
        for hf_name, ours in mixer_tensors.items():
            tensors[m + hf_name] = a[om + ours]
        conv = a[om + "conv_weight"]
        tensors[m + "conv1d.weight"] = np.ascontiguousarray(conv.T[:, None])
        tensors[m + "conv1d.bias"] = a[om + "conv_bias"]
    tensors["backbone.norm_f.weight"] = a["norm.weight"]
    if model.head is not None:
        tensors["lm_head.weight"] = a["head.weight"]
    return tensors
