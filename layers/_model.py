"""`SequenceModel`: input map, stacked blocks, final norm, head and pooling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ._block import Block, make_norm, rms_norm
from ._mixer import AbstractMixer, linear
from ._registry import mixer_pattern


class SequenceModel(eqx.Module):
    """A stack of `Block`s between an input map and an output head.

    The input map is a token embedding (`vocab_size=...`, inputs `Int[Array, "seq"]`)
    or a linear encoder (`d_input=...`, inputs `Float[Array, "seq d_input"]`). After
    the blocks come a final RMS norm and a linear head to `d_output`, then pooling:
    `None` for per-step outputs (language modelling), `"mean"` or `"last"` for one
    output per sequence (classification).

    `init_state`/`prefill`/`step` give per-step outputs whatever the pooling (for
    `"last"` the final one equals the pooled output), so a trained language model
    can generate token by token:

    ```python
    model = layers.SequenceModel("mamba", d_model=64, n_layers=2, vocab_size=256,
                                 d_output=256, key=key)
    logits, state = model.prefill(prompt, model.init_state())
    next_logits, state = model.step(next_token, state)
    ```

    A hybrid stack gives a list of mixers, repeated to `n_layers`, and keys
    `mixer_kwargs` by mixer name (Griffin: two recurrent blocks per local-attention
    block):

    ```python
    model = layers.SequenceModel(
        ["rglru", "rglru", "local_attention"], d_model=64, n_layers=6,
        vocab_size=256, d_output=256,
        mixer_kwargs={"local_attention": {"window": 128, "num_kv_heads": 1}}, key=key)
    ```
    """

    d_model: int = eqx.field(static=True)
    pooling: Literal["mean", "last"] | None = eqx.field(static=True)
    logit_soft_cap: float | None = eqx.field(static=True)
    embed_scale: float | None = eqx.field(static=True)
    norm_offset: float = eqx.field(static=True)
    embedding: eqx.nn.Embedding | None
    encoder: eqx.nn.Linear | None
    blocks: tuple[Block, ...]
    norm: eqx.nn.RMSNorm
    head: eqx.nn.Linear | None

    def __init__(
        self,
        mixer: str | type[AbstractMixer] | Sequence[str | type[AbstractMixer]],
        d_model: int,
        n_layers: int,
        d_output: int,
        *,
        vocab_size: int | None = None,
        d_input: int | None = None,
        pooling: Literal["mean", "last"] | None = None,
        mixer_kwargs: dict[str, Any] | None = None,
        mlp_ratio: int | float = 4.0,
        dropout: float = 0.0,
        remat: bool = False,
        norm_eps: float = 1e-5,
        tie_embeddings: bool = False,
        head_bias: bool = True,
        mlp_hidden: int | None = None,
        mlp_activation: Literal["gelu", "silu"] = "gelu",
        logit_soft_cap: float | None = None,
        mlp_bias: bool = False,
        embed_scale: float | None = None,
        norm_offset: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `mixer`: the sequence mixer of every block, a name in `layers.MIXERS` or a
          class; or a list of them, repeated (and cut) to `n_layers` blocks.
        - `d_model`, `n_layers`: the width and the number of blocks.
        - `d_output`: the head's output size (vocabulary or number of classes).
        - `vocab_size`: embed integer tokens (exactly one of this and `d_input`).
        - `d_input`: encode real inputs of this width linearly.
        - `pooling`: `None`, `"mean"` or `"last"`.
        - `mixer_kwargs`: the mixer's keyword arguments; with a list of mixers, a
          mapping from the list's entries to their keyword arguments
          (`{"local_attention": {"window": 64}}`).
        - `mlp_ratio`, `dropout`, `remat`: passed to every `Block`.
        - `norm_eps`: the epsilon of every RMS norm (the blocks' and the final one).
        - `tie_embeddings`: the head is the transposed token embedding (`head` is
          then `None`; needs `vocab_size` and `d_output == vocab_size`, no bias).
        - `head_bias`: whether an untied head has a bias.
        - `mlp_hidden`, `mlp_activation`: passed to every `Block`.
        - `logit_soft_cap`: outputs `c · tanh(y / c)` for this `c` (xLSTM 7B, Gemma 2);
          `None`: none.
        - `mlp_bias`, `norm_offset`: passed to every `Block`; the final norm also
          scales by `norm_offset + weight`.
        - `embed_scale`: multiply the token embeddings by this before the first block
          (Gemma: `√d_model`, rounded to bfloat16); the tied head is not scaled.
        - `key`: a `jax.random.PRNGKey`.
        """
        if (vocab_size is None) == (d_input is None):
            raise ValueError("give exactly one of `vocab_size` (tokens) and `d_input`.")
        if tie_embeddings and (vocab_size is None or d_output != vocab_size):
            raise ValueError(
                "`tie_embeddings=True` needs token inputs (`vocab_size`) and "
                f"`d_output == vocab_size`, got vocab_size={vocab_size}, "
                f"d_output={d_output}."
            )
        if pooling not in (None, "mean", "last"):
            raise ValueError(f"`pooling` must be None, 'mean' or 'last', got {pooling!r}.")
        layer_mixers = mixer_pattern(mixer, mixer_kwargs, n_layers)
        k_in, k_head, *k_blocks = jr.split(key, n_layers + 2)
        self.d_model, self.pooling = d_model, pooling
        self.logit_soft_cap = logit_soft_cap
        if embed_scale is not None and vocab_size is None:
            raise ValueError(
                "`embed_scale` scales token embeddings: it needs `vocab_size`."
            )
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self.norm_offset = float(norm_offset)
        if vocab_size is not None:
            self.embedding = eqx.nn.Embedding(
                vocab_size, d_model, dtype=jnp.float32, key=k_in
            )
            self.encoder = None
        else:
            self.embedding = None
            self.encoder = eqx.nn.Linear(d_input, d_model, dtype=jnp.float32, key=k_in)
        self.blocks = tuple(
            Block(
                d_model,
                kind,
                kwargs,
                mlp_ratio,
                dropout,
                remat,
                norm_eps=norm_eps,
                mlp_hidden=mlp_hidden,
                mlp_activation=mlp_activation,
                mlp_bias=mlp_bias,
                norm_offset=norm_offset,
                key=k,
            )
            for (kind, kwargs), k in zip(layer_mixers, k_blocks, strict=True)
        )
        self.norm = make_norm(d_model, norm_eps, norm_offset)
        if tie_embeddings:
            self.head = None
        else:
            self.head = eqx.nn.Linear(
                d_model, d_output, use_bias=head_bias, dtype=jnp.float32, key=k_head
            )

    def _encode(self, x):
        if self.embedding is not None:
            if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
                raise TypeError(f"expected integer tokens, got dtype {jnp.result_type(x)}.")
            if x.ndim not in (0, 1):
                raise ValueError(
                    f"expected one sequence of tokens of shape (seq,), got {x.shape}; "
                    "for a batch use `jax.vmap(model)(x)`."
                )
            h = jnp.take(self.embedding.weight, x, axis=0)
            if self.embed_scale is not None:
                h = h * np.asarray(self.embed_scale, h.dtype)
            return h
        if x.ndim not in (1, 2) or x.shape[-1] != self.encoder.in_features:
            raise ValueError(
                f"expected one sequence of shape (seq, {self.encoder.in_features}), got "
                f"{x.shape}; for a batch use `jax.vmap(model)(x)`."
            )
        return linear(self.encoder, x)

    def _head(self, h):
        h = rms_norm(self.norm, h, self.norm_offset)
        if self.head is None:  # tied: the embedding, transposed
            y = h @ self.embedding.weight.T.astype(h.dtype)
        else:
            y = linear(self.head, h)
        if self.logit_soft_cap is not None:
            cap = jnp.asarray(self.logit_soft_cap, y.dtype)
            y = cap * jnp.tanh(y / cap)
        return y

    def __call__(
        self,
        x: Int[Array, " seq"] | Float[Array, "seq d_input"],
        *,
        resets: Bool[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq d_output"] | Float[Array, " d_output"]:
        """**Arguments:**

        - `x`: one sequence of tokens `(seq,)` or features `(seq, d_input)`.
        - `resets`: true at the first token of each packed document, passed to every
          block's mixer (only when given).
        - `key`: for dropout when training.

        **Returns:** `(seq, d_output)`, or `(d_output,)` with pooling.
        """
        h = self._encode(x)
        keys = [None] * len(self.blocks) if key is None else jr.split(key, len(self.blocks))
        for block, k in zip(self.blocks, keys, strict=True):
            h = block(h, resets=resets, key=k)
        if self.pooling == "mean":
            h = jnp.mean(h, axis=0)
        elif self.pooling == "last":
            h = h[-1]
        return self._head(h)

    def init_state(self) -> tuple[PyTree[Array], ...]:
        return tuple(block.init_state() for block in self.blocks)

    def prefill(
        self,
        x: Int[Array, " seq"] | Float[Array, "seq d_input"],
        state: tuple[PyTree[Array], ...],
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_output"], tuple[PyTree[Array], ...]]:
        """Run a sequence from `state` (`resets` as in `__call__`); returns per-step
        outputs and the new state."""
        h = self._encode(x)
        new = []
        for block, s in zip(self.blocks, state, strict=True):
            h, s = block.prefill(h, s, resets=resets)
            new.append(s)
        return self._head(h), tuple(new)

    def step(
        self,
        x_t: Int[Array, ""] | Float[Array, " d_input"],
        state: tuple[PyTree[Array], ...],
    ) -> tuple[Float[Array, " d_output"], tuple[PyTree[Array], ...]]:
        """One token (an integer scalar, or a `(d_input,)` vector); returns
        `(output_t, state)`."""
        h = self._encode(x_t)
        new = []
        for block, s in zip(self.blocks, state, strict=True):
            h, s = block.step(h, s)
            new.append(s)
        return self._head(h), tuple(new)
