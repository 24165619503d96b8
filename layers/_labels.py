"""Telling the state-space parameters from the rest, for optimiser partitions."""

from __future__ import annotations

import jax
from jaxtyping import PyTree

from ._mixer import AbstractMixer


def _child(node, key):
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return jax.tree_util.tree_leaves(node)[key.key]
    raise TypeError(f"unsupported pytree key {key!r}")


def _is_ssm(tree, path) -> bool:
    node = tree
    for key in path:
        if (
            isinstance(node, AbstractMixer)
            and isinstance(key, jax.tree_util.GetAttrKey)
            and key.name in type(node).ssm_params
        ):
            return True
        node = _child(node, key)
    return False


def ssm_param_labels(tree: PyTree) -> PyTree[str]:
    """Label every leaf of a model `"ssm"` or `"other"`.

    The `"ssm"` leaves are the state-space parameters each mixer lists in its
    `ssm_params` (eigenvalues, step sizes, `B` of S4D/S5, `A_log`/`D`/`dt_bias` of
    Mamba, `Λ` of RG-LRU, `ν`/`θ`/`γ` of LRU), which the papers train with a lower
    learning rate and no weight decay. The result has the structure of `tree`, so it
    plugs into `optax.multi_transform`:

    ```python
    labels = layers.ssm_param_labels(eqx.filter(model, eqx.is_array))
    opt = optax.multi_transform(
        {"ssm": optax.adam(1e-3), "other": optax.adamw(4e-3, weight_decay=0.05)},
        lambda _: labels,  # a Module-shaped tree is callable: wrap it
    )
    ```

    Non-array leaves are labelled too (as `"other"` unless they sit in an SSM field).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "ssm" if _is_ssm(tree, path) else "other", tree
    )


def ssm_param_mask(tree: PyTree) -> PyTree[bool]:
    """`True` at the state-space parameters of `tree`, `False` elsewhere.

    A filter spec for `eqx.partition(model, layers.ssm_param_mask(model))`, or a
    mask for `optax.masked`/`optax.add_decayed_weights(mask=...)` (negate it to decay
    only the other parameters).
    """
    return jax.tree.map(lambda label: label == "ssm", ssm_param_labels(tree))
