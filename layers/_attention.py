"""Causal softmax attention: multi-head, grouped-query, sliding-window, with a KV cache."""

from __future__ import annotations

import copy
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._heads import head_rms_norm, head_sizes, merge_heads, split_heads
from ._mixer import (
    AbstractMixer,
    linear,
    real_dtype,
)


class AttentionState(NamedTuple):
    """The KV cache of an attention layer.

    Entries are indexed by slot; the token at stream index `j` (counted from
    `init_state`) lives in slot `j % cache`, so the cache of local attention is a ring
    buffer of `window` entries and that of global attention holds `max_len` tokens.

    - `k`, `v`: the cached keys (rotated) and values.
    - `pos`: the stream index of each slot's token, `-1` where the slot is empty.
    - `index`: the number of tokens seen (the stream index of the next one).
    - `doc_start`: the stream index of the current document's first token (positions
      count from it and nothing before it is attended to).
    """

    k: Float[Array, "cache kv_heads head_dim"]
    v: Float[Array, "cache kv_heads head_dim"]
    pos: Int[Array, " cache"]
    index: Int[Array, ""]
    doc_start: Int[Array, ""]


def rope(
    x: Float[Array, "seq heads head_dim"], positions: Int[Array, " seq"], base: float
) -> Float[Array, "seq heads head_dim"]:
    """Rotary position embedding (Su et al. 2021) in the "rotate half" layout of
    GPT-NeoX and Llama: channel `i` and `i + d/2` turn by `position · base^(-2i/d)`.

    Computed in float32 (float64 for float64 inputs), returned in `x.dtype`.
    """
    d = x.shape[-1]
    dtype = real_dtype(x.dtype)
    inv_freq = jnp.asarray(float(base) ** (-np.arange(0, d // 2) * 2.0 / d), dtype)
    angle = positions.astype(dtype)[:, None] * inv_freq[None, :]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    x32 = x.astype(dtype)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def document_starts(
    resets: Bool[Array, " seq"] | None, index: Int[Array, " seq"], start: Int[Array, ""]
) -> Int[Array, " seq"]:
    """The stream index of the first token of each token's document.

    `index` holds the tokens' stream indices, `start` the start of the document that
    is running before the first of them; a token where `resets` is true starts a new
    one.
    """
    starts = jnp.broadcast_to(start, index.shape)
    if resets is not None:
        starts = jnp.where(resets, index, starts)
    return lax.cummax(starts, axis=0)


class AbstractAttention(AbstractMixer):
    """Causal softmax attention (Vaswani et al. 2017) with the options of today's
    language models; `Attention` and `LocalAttention` are its two final forms.

    Per head `n` (with `G = num_heads / num_kv_heads` query heads sharing each key and
    value head, Ainslie et al. 2023):

    ```
    q, k, v = W_q x, W_k x, W_v x                   # split into heads
    q, k = RMSNorm(q), RMSNorm(k)                    # optional QK-norm, per head
    q, k = RoPE(q, p), RoPE(k, p)                    # p: position in the document
    o[t] = Σ_s softmax_s(q[t]·k[s] / √d + mask[t, s]) v[s]
    y = W_o o
    ```

    with `mask[t, s] = 0` where `s <= t`, `s` is in `t`'s document and (sliding
    window) `t - s < window`, and `-∞` elsewhere. On the CPU backend the parallel form
    is two einsums and a softmax (`softmax_attention`), and local attention over a
    sequence much longer than its window computes only the band (`band_attention`,
    `O(T · window)`); elsewhere it goes through `jax.nn.dot_product_attention` (pass
    `implementation="cudnn"` for cuDNN's fused kernel on a GPU, which needs bfloat16
    or float16 inputs; any `implementation` given goes there on every backend).

    The recurrent state is a KV cache (`AttentionState`): a ring buffer of `window`
    entries for local attention, whose state is bounded at any length, or `max_len`
    entries for global attention, which must be given at construction for
    `init_state`/`prefill`/`step` to be usable (the parallel form needs no cache and
    takes any length). Writing past `max_len` is a runtime error
    (`equinox.error_if`).
    """

    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    window: int | None = eqx.field(static=True)
    max_len: int | None = eqx.field(static=True)
    rope_base: float | None = eqx.field(static=True)
    rotary_dim: int | None = eqx.field(static=True)
    implementation: Literal["xla", "cudnn"] | None = eqx.field(static=True)
    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    q_norm: Float[Array, " head_dim"] | None
    k_norm: Float[Array, " head_dim"] | None

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window: int | None = None,
        max_len: int | None = None,
        rope_base: float | None = 10_000.0,
        qk_norm: bool = False,
        implementation: Literal["xla", "cudnn"] | None = None,
        *,
        rotary_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `num_heads`: the number of query heads.
        - `num_kv_heads`: the number of key/value heads, a divisor of `num_heads`
          (default `num_heads`: multi-head attention; 1: multi-query attention;
          in between: grouped-query attention).
        - `head_dim`: the width of each head (default `d_model // num_heads`).
        - `window`: each token attends to itself and the `window - 1` tokens before
          it (sliding-window attention as in Griffin); `None` for global attention.
        - `max_len`: the KV cache length of global attention (the most tokens
          `prefill` and `step` can see from `init_state`); unused with a `window`.
        - `rope_base`: the base of the rotary embedding's frequencies; `None` for no
          position encoding.
        - `qk_norm`: RMS-normalise queries and keys per head (with a learned scale)
          before the rotary embedding, as in OLMo 2 and Qwen 3.
        - `implementation`: passed to `jax.nn.dot_product_attention` (`None`: the
          einsum form on CPU, its default elsewhere; `"xla"`: its XLA path on every
          backend; `"cudnn"`: cuDNN's fused kernel).
        - `rotary_dim`: rotate only the first `rotary_dim` channels of each head
          (partial rotary embedding, as RecurrentGemma's half); default all.
        - `qkv_bias`, `out_bias`: biases on the query/key/value maps and on the
          output map (RecurrentGemma: `out_bias=True`).
        - `key`: a `jax.random.PRNGKey`.
        """
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            head_dim = head_sizes(d_model, num_heads, "d_model")
        k_q, k_k, k_v, k_o = jr.split(key, 4)
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim, self.window, self.max_len = head_dim, window, max_len
        self.rope_base = None if rope_base is None else float(rope_base)
        self.rotary_dim = rotary_dim
        self.implementation = implementation
        inner, kv = num_heads * head_dim, num_kv_heads * head_dim

        def proj(n_in, n_out, k, bias=qkv_bias):
            return eqx.nn.Linear(n_in, n_out, use_bias=bias, dtype=jnp.float32, key=k)

        self.q_proj, self.k_proj = proj(d_model, inner, k_q), proj(d_model, kv, k_k)
        self.v_proj = proj(d_model, kv, k_v)
        self.o_proj = proj(inner, d_model, k_o, out_bias)
        ones = jnp.ones((head_dim,), jnp.float32)
        self.q_norm, self.k_norm = (ones, ones) if qk_norm else (None, None)

    def __check_init__(self):
        if self.num_heads < 1 or self.num_kv_heads < 1 or self.head_dim < 1:
            raise ValueError("`num_heads`, `num_kv_heads` and `head_dim` must be >= 1.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_kv_heads` ({self.num_kv_heads}) must divide `num_heads` "
                f"({self.num_heads})."
            )
        if self.rotary_dim is not None and not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"`rotary_dim` must be in [2, head_dim={self.head_dim}], got "
                f"{self.rotary_dim}."
            )
        rotated = self.head_dim if self.rotary_dim is None else self.rotary_dim
        if self.rope_base is not None and (rotated % 2 or self.rope_base <= 1):
            raise ValueError(
                "the rotary embedding needs an even `head_dim` (or `rotary_dim`) and "
                f"`rope_base` > 1, got head_dim={self.head_dim}, "
                f"rotary_dim={self.rotary_dim}, rope_base={self.rope_base}."
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"`window` must be >= 1 or None, got {self.window}.")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"`max_len` must be >= 1 or None, got {self.max_len}.")
        if self.implementation not in (None, "xla", "cudnn"):
            raise ValueError(
                f"`implementation` must be None, 'xla' or 'cudnn', got "
                f"{self.implementation!r}."
            )

    @property
    def cache_size(self) -> int | None:
        """The number of KV-cache entries: `window`, else `max_len`."""
        return self.window if self.window is not None else self.max_len

    def with_cache_length(self, max_len: int) -> AbstractAttention:
        """This global-attention layer with a KV cache of `max_len` tokens; the
        parameters are shared, not copied, and `self` is left as it is.

        ```python
        mixer = layers.Attention(64, num_heads=4, key=key)  # no cache: parallel only
        sized = mixer.with_cache_length(512)
        y, cache = sized.prefill(x, sized.init_state())
        ```

        **Arguments:**

        - `max_len`: the most tokens `prefill` plus `step` will see, `>= 1`.

        **Returns:** a layer equal to this one but for `max_len`.

        **Raises:** `ValueError` for local attention (its cache is its `window`) or a
        `max_len` that is not an integer `>= 1`.
        """
        if self.window is not None:
            raise ValueError(
                f"{type(self).__name__}: local attention's KV cache holds its "
                f"`window` ({self.window}) entries; `with_cache_length` applies to "
                "global attention."
            )
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ValueError(
                f"the KV cache length must be an integer >= 1, got {max_len!r}."
            )
        # `max_len` is a static field (part of the tree structure, so `eqx.tree_at`
        # cannot reach it), and `__init__` takes a key and options, not the fields, so
        # `dataclasses.replace` cannot rebuild the layer (Equinox has no public
        # replace for a module with its own `__init__`). A shallow copy shares every
        # array; its one field is set as Equinox's own unflattening sets fields.
        new = copy.copy(self)
        object.__setattr__(new, "max_len", max_len)
        return new

    def _qkv(self, x, positions):
        q = split_heads(linear(self.q_proj, x), self.num_heads)
        k = split_heads(linear(self.k_proj, x), self.num_kv_heads)
        v = split_heads(linear(self.v_proj, x), self.num_kv_heads)
        if self.q_norm is not None:
            q = head_rms_norm(q, self.q_norm).astype(x.dtype)
            k = head_rms_norm(k, self.k_norm).astype(x.dtype)
        if self.rope_base is not None:
            q, k = self._rope(q, positions), self._rope(k, positions)
        return q, k, v

    def _rope(self, x, positions):
        r = self.rotary_dim
        if r is None or r == self.head_dim:
            return rope(x, positions, self.rope_base)
        rotated = rope(x[..., :r], positions, self.rope_base)
        return jnp.concatenate([rotated, x[..., r:]], axis=-1)

    def _attend(self, q, k, v, mask, causal: bool, starts=None):
        """Softmax attention of `q` `(T, N, d)` over `k`, `v` `(S, K, d)`: `mask`
        `(T, S)` (or None), plus the causal and window masks when `causal` (then
        `starts` holds each query's document start, for the band).

        On the CPU backend (and with `implementation=None`) this is the plain
        einsum-softmax formulation, and local attention over a long sequence computes
        only the band: `jax.nn.dot_product_attention`'s XLA path is slower there (it
        vmaps its core over the query groups, so both `T × S` products and the
        softmax run on transposed batched layouts). Elsewhere, or with an explicit
        `implementation`, `jax.nn.dot_product_attention`.
        """
        if self.implementation is None and jax.default_backend() == "cpu":
            if causal:
                T = q.shape[0]
                if self.window is not None and _band_pays(T, self.window):
                    return band_attention(q, k, v, starts, self.window)
                index = jnp.arange(T, dtype=jnp.int32)
                allowed = index[None, :] <= index[:, None]
                if self.window is not None:
                    allowed = allowed & (index[:, None] - index[None, :] < self.window)
                mask = allowed if mask is None else mask & allowed
            return softmax_attention(q, k, v, mask)
        window = None
        if causal and self.window is not None:
            window = (self.window - 1, 0)
        # JAX's XLA path promotes float64 with float32 internally, which strict dtype
        # promotion (as in our tests) refuses.
        with jax.numpy_dtype_promotion("standard"):
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=mask,
                is_causal=causal,
                local_window_size=window,
                implementation=self.implementation,
            )

    def __call__(
        self,
        x: Float[Array, "seq d_model"],
        *,
        resets: Bool[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq d_model"]:
        """**Arguments:**

        - `x`: one sequence `(seq, d_model)`.
        - `resets`: true at the first token of each packed document: attention stays
          inside documents and positions restart at each.
        - `key`: unused.

        **Returns:** `(seq, d_model)`, causal.
        """
        T = x.shape[0]
        resets = self._check_sequence(x, resets)
        index = jnp.arange(T, dtype=jnp.int32)
        starts = document_starts(resets, index, jnp.zeros((), jnp.int32))
        q, k, v = self._qkv(x, index - starts)
        mask = None if resets is None else index[None, :] >= starts[:, None]
        o = self._attend(q, k, v, mask, causal=True, starts=starts)
        return linear(self.o_proj, merge_heads(o))

    def init_state(self) -> AttentionState:
        """An empty KV cache of `window` (local) or `max_len` (global) entries."""
        if self.cache_size is None:
            raise ValueError(
                f"{type(self).__name__}: global attention needs `max_len` (the KV cache "
                "length) for init_state/prefill/step; construct it with max_len=... or use "
                "with_cache_length(n)."
            )
        C, dtype = self.cache_size, real_dtype(self.q_proj.weight.dtype)
        zeros = jnp.zeros((C, self.num_kv_heads, self.head_dim), dtype)
        return AttentionState(
            k=zeros,
            v=zeros,
            pos=jnp.full((C,), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
            doc_start=jnp.zeros((), jnp.int32),
        )

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: AttentionState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], AttentionState]:
        """Run `x` after the tokens held in `state`.

        **Arguments:**

        - `x`: one sequence `(seq, d_model)`.
        - `state`: the KV cache (`init_state()` for an empty one).
        - `resets`: as in `__call__`; a reset at the first token hides the cache.

        **Returns:** the outputs `(seq, d_model)` and the cache with `x` appended.
        """
        resets = self._check_sequence(x, resets)
        return self._extend(x, state, resets)

    def step(
        self, x_t: Float[Array, " d_model"], state: AttentionState
    ) -> tuple[Float[Array, " d_model"], AttentionState]:
        """One token after those in `state`: returns `(y_t, state)`."""
        self._check_token(x_t)
        y, state = self._extend(x_t[None], state, None)
        return y[0], state

    def _extend(self, x, state: AttentionState, resets):
        T, C = x.shape[0], state.pos.shape[0]
        index = state.index + jnp.arange(T, dtype=jnp.int32)
        starts = document_starts(resets, index, state.doc_start)
        q, k, v = self._qkv(x, index - starts)
        keys = jnp.concatenate([state.k.astype(k.dtype), k])
        values = jnp.concatenate([state.v.astype(v.dtype), v])
        key_index = jnp.concatenate([state.pos, index])
        # The cache's empty slots hold -1, below every document start.
        mask = (key_index[None, :] >= starts[:, None]) & (
            key_index[None, :] <= index[:, None]
        )
        if self.window is not None:
            mask = mask & (index[:, None] - key_index[None, :] < self.window)
        o = self._attend(q, keys, values, mask, causal=False)
        y = linear(self.o_proj, merge_heads(o))
        # Write the last min(T, C) tokens (distinct slots) into the cache.
        n = min(T, C)
        slots = index[T - n :] % C
        new = AttentionState(
            k=state.k.at[slots].set(k[T - n :].astype(state.k.dtype)),
            v=state.v.at[slots].set(v[T - n :].astype(state.v.dtype)),
            pos=state.pos.at[slots].set(index[T - n :]),
            index=state.index + T,
            doc_start=starts[-1],
        )
        if self.window is None:
            y, new = eqx.error_if(
                (y, new),
                new.index > C,
                f"{type(self).__name__}: more tokens than the KV cache's max_len={C}; "
                "construct the layer with a larger max_len.",
            )
        return y, new


def softmax_attention(
    q: Float[Array, "*blocks seq heads head_dim"],
    k: Float[Array, "*blocks keys kv_heads head_dim"],
    v: Float[Array, "*blocks keys kv_heads head_dim"],
    mask: Bool[Array, "*blocks seq keys"] | None,
) -> Float[Array, "*blocks seq heads head_dim"]:
    """`softmax(q kᵀ / √d, masked) v` by two einsums, query heads grouped onto their
    key/value heads (no repeat); logits and softmax in float32 (float64 for float64
    inputs), as `jax.nn.dot_product_attention` takes them. Every query row must keep
    at least one key."""
    *lead, T, N, d = q.shape
    K = k.shape[-2]
    G = N // K
    # (..., K, G·T, d): each key/value head's queries as one matrix, so that both
    # products are plain batched matrix products with no size-1 group axis (a group
    # axis puts `T × S` transposes into the backward pass).
    qg = jnp.moveaxis(q.reshape(*lead, T, K, G, d), -4, -2).reshape(*lead, K, G * T, d)
    dtype = real_dtype(q.dtype)
    logits = jnp.einsum("...kqd,...skd->...kqs", qg, k, preferred_element_type=dtype)
    logits = logits * (1 / np.sqrt(d)).astype(dtype)
    if mask is not None:
        # The mask repeated over the groups, `(..., G·T, S)`, rather than the logits
        # reshaped to `(..., K, G, T, S)`: a layout change of the `T × S` logits puts
        # a copy of them into the backward pass.
        S = k.shape[-3]
        negative = jnp.asarray(-0.7 * np.finfo(dtype).max, dtype)
        grouped = jnp.broadcast_to(mask[..., None, :, :], (*mask.shape[:-2], G, T, S))
        grouped = grouped.reshape(*mask.shape[:-2], 1, G * T, S)
        logits = jnp.where(grouped, logits, negative)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    o = jnp.einsum("...kqs,...skd->...kqd", probs, v).reshape(*lead, K, G, T, d)
    return jnp.moveaxis(o, -2, -4).reshape(*lead, T, N, d)


def _band_pays(length: int, window: int) -> bool:
    """The band (blocks of `window` queries against two blocks of keys) does less work
    than the masked `length × length` product."""
    blocks = -(-length // window)
    return blocks * 2 * window * window < length * length


def band_attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "seq kv_heads head_dim"],
    v: Float[Array, "seq kv_heads head_dim"],
    starts: Int[Array, " seq"],
    window: int,
) -> Float[Array, "seq heads head_dim"]:
    """Causal sliding-window attention computing only the band: the queries in blocks
    of `window`, each block against the keys of its own and the previous block
    (`O(T · window)` work and memory rather than `T²`), masked to `t - window < s <= t`
    and `s >= starts[t]` (the query's document).

    **Arguments:**

    - `q`, `k`, `v`: one sequence's queries and keys/values.
    - `starts`: the stream index of each token's document start (`document_starts`).
    - `window`: each token attends to itself and the `window - 1` before it.

    **Returns:** `(seq, heads, head_dim)`, as the masked full product gives it.
    """
    T, W = q.shape[0], window
    n = -(-T // W)

    def blocks(x):
        x = jnp.pad(x, [(0, n * W - T)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(n, W, *x.shape[1:])

    def with_previous(xb):  # (n, 2W, ...): block i-1 (zeros before the first), block i
        previous = jnp.concatenate([jnp.zeros_like(xb[:1]), xb[:-1]])
        return jnp.concatenate([previous, xb], axis=1)

    index = jnp.arange(n * W, dtype=jnp.int32).reshape(n, W)
    key_index = index[:, :1] - W + jnp.arange(2 * W, dtype=jnp.int32)[None, :]
    t, s = index[:, :, None], key_index[:, None, :]
    # Padded queries (t >= T) keep their own key; padded keys lie after every real
    # query; the keys before the first block (s < 0) lie before every document start.
    mask = (s <= t) & (t - s < W) & (s >= blocks(starts)[:, :, None])
    kb, vb = with_previous(blocks(k)), with_previous(blocks(v))
    o = softmax_attention(blocks(q), kb, vb, mask)
    return o.reshape(n * W, *o.shape[2:])[:T]


class Attention(AbstractAttention):
    """Causal softmax attention, global unless given a `window`; see
    `AbstractAttention` for the equations and the arguments.

    ```python
    mixer = layers.Attention(64, num_heads=4, num_kv_heads=2, max_len=1024, key=key)
    y = jax.vmap(mixer)(x)                            # x: (batch, seq, 64)
    y, cache = mixer.prefill(x[0], mixer.init_state())
    y_t, cache = mixer.step(x_t, cache)
    ```
    """


class LocalAttention(AbstractAttention):
    """Sliding-window attention (Beltagy et al. 2020) as Griffin and RecurrentGemma use
    it (De et al. 2024): `Attention` with `window=128` by default, whose KV cache is a
    ring buffer of `window` entries.

    ```python
    mixer = layers.LocalAttention(64, num_heads=4, window=64, key=key)
    ```
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window: int = 128,
        rope_base: float | None = 10_000.0,
        qk_norm: bool = False,
        implementation: Literal["xla", "cudnn"] | None = None,
        *,
        rotary_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:** as `Attention`, with `window` (default 128) required to be an
        integer and no `max_len` (the cache holds `window` entries)."""
        if not isinstance(window, int) or isinstance(window, bool):
            raise ValueError(f"LocalAttention needs an integer `window`, got {window!r}.")
        super().__init__(
            d_model,
            num_heads,
            num_kv_heads,
            head_dim,
            window,
            None,
            rope_base,
            qk_norm,
            implementation,
            rotary_dim=rotary_dim,
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            key=key,
        )
