"""The abstract sequence mixer and the small helpers its subclasses share."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree


class AbstractMixer(eqx.Module):
    """A causal sequence mixer: `(seq, d_model) -> (seq, d_model)` with a recurrent state.

    Subclasses implement the parallel form `__call__`, and the recurrent trio
    `init_state`, `prefill` and `step`, such that

    ```python
    mixer(x) == mixer.prefill(x, mixer.init_state())[0]
             == [mixer.step(x[t], state_t)[0] for t in range(T)]
    ```

    to float tolerance, for any length. Packed documents: `resets` (boolean `(seq,)`,
    true at the first token of each document) restarts the state before those tokens,
    so that nothing crosses a boundary (recurrences restart from the zero state, short
    convolutions do not read across it, attention is masked to the document):

    ```python
    mixer(concat(x1, x2), resets=start_of_x2) == concat(mixer(x1), mixer(x2))
    ```

    and `prefill` takes the same `resets` (a reset at its first token drops `state`).
    `ssm_params` names the fields that hold the
    state-space parameters (eigenvalues, step sizes, ...), which the papers train
    with a lower learning rate and no weight decay; see `layers.ssm_param_labels`.
    """

    d_model: eqx.AbstractVar[int]
    ssm_params: ClassVar[tuple[str, ...]] = ()

    def __call__(
        self,
        x: Float[Array, "seq d_model"],
        *,
        resets: Bool[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq d_model"]:
        """The parallel form over one sequence.

        **Arguments:**

        - `x`: one sequence `(seq, d_model)`.
        - `resets`: optional boolean `(seq,)`, true at the first token of each packed
          document; the state restarts there.
        - `key`: unused by deterministic mixers.

        **Returns:** `(seq, d_model)`, causal. By default `prefill` from
        `init_state()`; mixers with a faster parallel form override it.
        """
        return self.prefill(x, self.init_state(), resets=resets)[0]

    def _check_sequence(self, x: Any, resets: Any = None) -> Bool[Array, " seq"] | None:
        """The checks `__call__` and `prefill` start with, naming the class: `x` is one
        sequence `(seq, d_model)` and `resets` None or a boolean `(seq,)`; returns
        `resets`."""
        name = type(self).__name__
        check_sequence(x, self.d_model, name)
        return check_resets(resets, jnp.shape(x)[0], name)

    def _check_token(self, x_t: Any) -> None:
        """The check `step` starts with: `x_t` is one time step `(d_model,)`."""
        check_token(x_t, self.d_model, type(self).__name__)

    @abc.abstractmethod
    def init_state(self) -> PyTree[Array]:
        raise NotImplementedError

    @abc.abstractmethod
    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: PyTree[Array],
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], PyTree[Array]]:
        raise NotImplementedError

    @abc.abstractmethod
    def step(
        self, x_t: Float[Array, " d_model"], state: PyTree[Array]
    ) -> tuple[Float[Array, " d_model"], PyTree[Array]]:
        raise NotImplementedError


def time_axis(name: str | None) -> str | None:
    """`name` if the mesh in context (`jax.set_mesh`) has an axis of that name, else None.

    A layer built with `seq_axis="seq"` splits its scan over time across that mesh axis
    (`ssm.linear_scan(..., mesh_axis=...)`) when it runs under such a mesh, and runs an
    ordinary scan anywhere else (a single device, generation).
    """
    if name is None:
        return None
    return name if name in jax.sharding.get_abstract_mesh().axis_names else None


def check_sequence(x: Any, d_model: int, name: str) -> None:
    """Raise a helpful error unless `x` is one sequence of shape `(seq, d_model)`."""
    shape = tuple(jnp.shape(x))
    if len(shape) == 3 and shape[-1] == d_model:
        raise ValueError(
            f"{name} works on one sequence of shape (seq, {d_model}), got a batch of "
            f"shape {shape}; to process a batch, use `jax.vmap(layer)(x)`."
        )
    if len(shape) != 2 or shape[-1] != d_model:
        raise ValueError(
            f"{name} expects one sequence of shape (seq, {d_model}), got {shape}; "
            "batches go through `jax.vmap(layer)(x)`."
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} expects a floating input, got {jnp.result_type(x)}.")


def check_token(x_t: Any, d_model: int, name: str) -> None:
    """Raise unless `x_t` is one time step of shape `(d_model,)`."""
    if tuple(jnp.shape(x_t)) != (d_model,):
        raise ValueError(
            f"{name}.step expects one time step of shape ({d_model},), got "
            f"{tuple(jnp.shape(x_t))}; for a batch use `jax.vmap`."
        )


def real_dtype(dtype) -> jnp.dtype:
    """The dtype states and recurrence parameters are computed in: float32 at least."""
    return (
        jnp.dtype(jnp.float64)
        if jnp.dtype(dtype) == jnp.float64
        else jnp.dtype(jnp.float32)
    )


def complex_dtype(dtype) -> jnp.dtype:
    return (
        jnp.dtype(jnp.complex128)
        if jnp.dtype(dtype) == jnp.float64
        else jnp.dtype(jnp.complex64)
    )


def linear(layer: eqx.nn.Linear, x: Float[Array, "... d_in"]) -> Float[Array, "... d_out"]:
    """Apply an `eqx.nn.Linear` over leading axes, computing in the dtype of `x`."""
    y = x @ layer.weight.T.astype(x.dtype)
    if layer.bias is not None:
        y = y + jnp.reshape(layer.bias.astype(x.dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def check_resets(resets: Any, T: int, name: str) -> Bool[Array, " seq"] | None:
    """`resets` unchanged if it is None or a boolean `(T,)` array; else a clear error."""
    if resets is None:
        return None
    if tuple(jnp.shape(resets)) != (T,) or jnp.result_type(resets) != jnp.bool_:
        raise ValueError(
            f"{name}: `resets` must be a boolean array of shape ({T},) (true at the "
            "first token of each document), got "
            f"{jnp.result_type(resets)}{tuple(jnp.shape(resets))}."
        )
    return resets


def segments(resets: Bool[Array, " seq"]) -> Int[Array, " seq"]:
    """The document index of each token: the number of resets up to and including it.

    Whatever precedes the sequence (a carried state or convolution history) belongs to
    document 0, so a reset at the first token separates it from the sequence.
    """
    return jnp.cumsum(resets.astype(jnp.int32))


def keep_mask(resets: Bool[Array, " seq"] | None, dtype) -> Float[Array, " seq"] | None:
    """`1 - resets` in `dtype` (None stays None): multiplies a nonlinear recurrence's
    carried state before each step, so that it restarts from zero at each document."""
    return None if resets is None else jnp.logical_not(resets).astype(dtype)


def chunked(
    fn: Callable[[Array, PyTree[Array]], tuple[PyTree[Array], Array]],
    h0: Array,
    xs: PyTree[Array],
    chunk_size: int,
) -> tuple[PyTree[Array], Array]:
    """Run a linear recurrence chunk by chunk, saving only chunk-boundary states.

    `fn(h0, xs_chunk) -> (ys_chunk, hs_chunk)` evaluates the recurrence over one chunk
    of time (through `ssm.linear_scan`), returning its per-step outputs and its
    per-step states `hs_chunk` of shape `(C, *S)`. The chunks are visited by a
    `lax.scan` whose body is rematerialised (`jax.checkpoint`), so neither the forward
    nor the backward pass ever holds more than one chunk of states: memory is
    `O(T/C · S + C · S)` instead of `O(T · S)`. The last chunk is zero-padded; the
    state handed on is the one at the last real step, so padding never leaks.

    **Returns:** the outputs over all `T` steps and the final state.
    """
    T = jax.tree.leaves(xs)[0].shape[0]
    C = max(1, min(int(chunk_size), T))
    if C == T:
        ys, hs = fn(h0, xs)
        return ys, hs[-1]
    n = math.ceil(T / C)
    pad = n * C - T

    def split(v):
        v = jnp.concatenate([v, jnp.zeros((pad,) + v.shape[1:], v.dtype)]) if pad else v
        return v.reshape((n, C) + v.shape[1:])

    last = jnp.full((n,), C - 1, jnp.int32).at[-1].set((T - 1) % C)

    @jax.checkpoint
    def body(h, inputs):
        xs_c, last_c = inputs
        ys_c, hs_c = fn(h, xs_c)
        return lax.dynamic_index_in_dim(hs_c, last_c, keepdims=False), ys_c

    h, ys = lax.scan(body, h0, (jax.tree.map(split, xs), last))
    ys = jax.tree.map(lambda v: v.reshape((n * C,) + v.shape[2:])[:T], ys)
    return ys, h
