"""Sampling from a language model: one prefill, then one compiled loop over new tokens.

`generate` runs the prompt through `model.prefill` once and then a single `lax.scan`
over `model.step`, drawing each token inside the loop, so that a whole generation is
two dispatches however many tokens it makes. The sampling rules are pure functions
of the logits:

- `temperature_logits`: divide by the temperature (0 means greedy: argmax);
- `top_k_logits`: keep the `k` largest logits (Fan et al. 2018);
- `top_p_logits`: keep the smallest set of most likely tokens whose probability
  mass is at least `p` (nucleus sampling, Holtzman et al. 2020);
- `sample_logits`: the three in that order (as Hugging Face `transformers` applies
  them), then one categorical draw.

Global attention needs a KV cache as long as the text; `with_cache_length` sets it,
and `generate` sizes it to the prompt plus the new tokens by itself.

```python
tokens = train.generate.generate(model, prompt, 200, temperature=0.8, top_p=0.95,
                                 key=jax.random.key(0))
```
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

import layers

# ------------------------------------------------------------------ sampling rules


def _dtype(logits):
    return jnp.result_type(logits)


def temperature_logits(
    logits: Float[Array, " vocab"], temperature: float | Float[Array, ""]
) -> Float[Array, " vocab"]:
    """`logits / temperature`; a temperature of 0 leaves the logits as they are (the
    greedy choice is their argmax, which `sample_logits` takes)."""
    t = jnp.asarray(temperature, _dtype(logits))
    return logits / jnp.where(t > 0, t, jnp.ones_like(t))


def _descending(logits):
    """The indices that sort `logits` from largest to smallest (ties: lower index
    first) and each index's rank in that order."""
    V = logits.shape[-1]
    order = jnp.argsort(-logits, stable=True)
    ranks = jnp.zeros((V,), jnp.int32).at[order].set(jnp.arange(V, dtype=jnp.int32))
    return order, ranks


def _mask_ranked(logits, k, p):
    """Keep the `k` top-ranked tokens and, among them, the smallest most likely set of
    mass `>= p` (`k`: an int32 in `[1, vocab]`; `p >= 1`: no mass test); one sort."""
    dtype, V = _dtype(logits), logits.shape[-1]
    order, ranks = _descending(logits)
    keep = jnp.arange(V, dtype=jnp.int32) < k
    # bfloat16 sums are too coarse: the probabilities in float32 at least.
    wide = dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
    ranked = jnp.where(keep, logits[order].astype(wide), jnp.asarray(-jnp.inf, wide))
    probs = jax.nn.softmax(ranked)
    # The mass ranked above each token (an exclusive cumulative sum).
    before = jnp.concatenate([jnp.zeros((1,), wide), jnp.cumsum(probs)[:-1]])
    p = jnp.asarray(p, wide)
    keep = (keep & ((before < p) | (p >= 1))).at[0].set(True)
    return jnp.where(keep[ranks], logits, jnp.asarray(-jnp.inf, dtype))


def _top_k_count(k, V: int):
    """`k` as a count in `[1, V]`: `k <= 0` or `k > V` is all `V`."""
    k = jnp.asarray(k, jnp.int32)
    return jnp.where((k <= 0) | (k > V), V, k)


def top_k_logits(
    logits: Float[Array, " vocab"], k: int | Int[Array, ""]
) -> Float[Array, " vocab"]:
    """Keep the `k` largest logits and set the others to `-inf`.

    Exactly `k` survive: among equal logits the lower token id is kept. `k <= 0` or
    `k >= vocab` keeps all of them.

    **Arguments:**

    - `logits`: `(vocab,)`.
    - `k`: an integer (Python or a traced scalar).

    **Returns:** `(vocab,)`, the kept logits unchanged.
    """
    return _mask_ranked(logits, _top_k_count(k, logits.shape[-1]), 1.0)


def top_p_logits(
    logits: Float[Array, " vocab"], p: float | Float[Array, ""]
) -> Float[Array, " vocab"]:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability
    (`softmax(logits)`) adds up to at least `p`, and set the others to `-inf`.

    A token is kept when the mass of the tokens ranked above it is below `p` (ties:
    the lower token id ranks first), so the most likely token always survives and
    `p >= 1` keeps every token.

    **Arguments:**

    - `logits`: `(vocab,)`.
    - `p`: in `(0, 1]`.

    **Returns:** `(vocab,)`, the kept logits unchanged.
    """
    return _mask_ranked(logits, logits.shape[-1], p)


def filter_logits(
    logits: Float[Array, " vocab"],
    temperature: float | Float[Array, ""] = 1.0,
    top_k: int | Int[Array, ""] | None = None,
    top_p: float | Float[Array, ""] | None = None,
) -> Float[Array, " vocab"]:
    """The logits that `sample_logits` draws from: divided by the temperature, then
    filtered by top-k, then by top-p (one sort for both), equal to
    `top_p_logits(top_k_logits(temperature_logits(logits, t), k), p)`.

    `None` leaves a filter out of the program; a traced `k <= 0` and `p >= 1` skip the
    sort at run time (`lax.cond`), so one compiled program serves every setting.
    """
    logits = temperature_logits(logits, temperature)
    if top_k is None and top_p is None:
        return logits
    V = logits.shape[-1]
    k = _top_k_count(V if top_k is None else top_k, V)
    p = jnp.asarray(1.0 if top_p is None else top_p, _dtype(logits))
    return lax.cond((k < V) | (p < 1), _mask_ranked, _keep, logits, k, p)


def _keep(logits, *_):
    return logits


def sample_logits(
    key: PRNGKeyArray,
    logits: Float[Array, " vocab"],
    temperature: float | Float[Array, ""] = 1.0,
    top_k: int | Int[Array, ""] | None = None,
    top_p: float | Float[Array, ""] | None = None,
) -> Int[Array, ""]:
    """Draw one token from `logits`.

    **Arguments:**

    - `key`: a `jax.random.PRNGKey`; the same key gives the same token.
    - `logits`: `(vocab,)`, unnormalised log-probabilities.
    - `temperature`: `>= 0`; 0 is greedy (the argmax, ties to the lower id; the key
      and the filters are then unused).
    - `top_k`: keep the `k` most likely tokens (`None` or 0: all).
    - `top_p`: keep the smallest set of most likely tokens with mass `>= p` (`None`
      or 1: all).

    **Returns:** an int32 scalar token id.
    """
    t = jnp.asarray(temperature, _dtype(logits))

    def draw(logits):
        filtered = filter_logits(logits, t, top_k, top_p)
        return jr.categorical(key, filtered).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits).astype(jnp.int32)

    return lax.cond(t > 0, draw, greedy, logits)


# ------------------------------------------------------------------ the KV cache


def _is_global_attention(x) -> bool:
    return isinstance(x, layers.AbstractAttention) and x.window is None


def with_cache_length(model: Any, length: int) -> Any:
    """`model` with the KV cache of every global-attention layer set to `length`
    tokens (each through `AbstractAttention.with_cache_length`); other layers, local
    attention's ring buffer included, are left as they are. The parameters are shared,
    not copied.

    **Arguments:**

    - `model`: a `layers.SequenceModel`, `layers.Block`, mixer, or any pytree of them.
    - `length`: the most tokens `prefill` plus `step` will see, `>= 1`.

    **Returns:** the model with `max_len = length` in its global attention layers.
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"the KV cache length must be an integer >= 1, got {length!r}.")

    def resize(leaf):
        if not _is_global_attention(leaf) or leaf.max_len == length:
            return leaf
        return leaf.with_cache_length(length)

    return jax.tree.map(resize, model, is_leaf=_is_global_attention)


def cache_bytes(state: Any) -> int:
    """The bytes of a recurrent state (every array leaf of the pytree)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state))


# ------------------------------------------------------------------ checks


def _check_model(model):
    if not isinstance(model, layers.SequenceModel):
        raise TypeError(
            f"generation needs a layers.SequenceModel, got {type(model).__name__}."
        )
    if model.embedding is None:
        raise ValueError(
            "generation needs a token model (built with `vocab_size`), not one on real "
            "inputs (`d_input`)."
        )
    vocab = model.embedding.num_embeddings
    head = getattr(model, "head", None)  # None: tied to the embedding
    d_output = vocab if head is None else head.out_features
    if d_output != vocab:
        raise ValueError(
            f"generation feeds the sampled tokens back: the head's d_output ({d_output}) "
            f"must equal the vocabulary size ({vocab})."
        )
    return vocab


def _check_prompt(prompt, vocab: int) -> np.ndarray:
    prompt = np.asarray(prompt)
    if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"`prompt` must be a 1-D array of integer token ids, got "
            f"{prompt.dtype}{prompt.shape}; for a batch use `jax.vmap`."
        )
    if prompt.size == 0:
        raise ValueError("`prompt` is empty: generation needs at least one token.")
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(
            f"`prompt` holds token ids in [{prompt.min()}, {prompt.max()}], outside the "
            f"model's vocabulary [0, {vocab})."
        )
    return prompt.astype(np.int32)


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    """Raise a `ValueError` naming the first argument out of range."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise ValueError(f"`max_new_tokens` must be an integer, got {max_new_tokens!r}.")
    if max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}.")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)):
        raise ValueError(f"`temperature` must be a finite number, got {temperature!r}.")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0: greedy), got {temperature}.")
    if top_k is not None and (
        not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0
    ):
        raise ValueError(f"`top_k` must be an integer >= 0 (0: off), got {top_k!r}.")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"`top_p` must lie in (0, 1] (1: off), got {top_p!r}.")


# ------------------------------------------------------------------ the compiled loop


def _prefill(model, prompt, state):
    logits, state = model.prefill(prompt, state)
    return logits[-1], state


def _decode(model, logits, state, key, temperature, top_k, top_p, n: int):
    """`n` tokens: the first drawn from `logits`, each next one from the logits of
    `model.step` on the one before, inside one `lax.scan`. Step `i` draws with
    `fold_in(key, i)`."""

    def draw(i, logits):
        return sample_logits(jr.fold_in(key, i), logits, temperature, top_k, top_p)

    first = draw(0, logits)

    def body(carry, i):
        token, state = carry
        logits, state = model.step(token, state)
        token = draw(i, logits)
        return (token, state), token

    _, rest = lax.scan(body, (first, state), jnp.arange(1, n, dtype=jnp.int32))
    return jnp.concatenate([first[None], rest])


_prefill_jit = eqx.filter_jit(_prefill)
_decode_jit = eqx.filter_jit(_decode)


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """What one `timed_generate` call cost.

    - `prompt_tokens`, `new_tokens`: the tokens prefilled and generated.
    - `compile_s`: compiling prefill and decode (once per shape and model).
    - `prefill_s`, `decode_s`: running them, after compilation.
    - `state_bytes`: the recurrent state (KV caches included) after the prefill.
    - `decode_temp_bytes`: the decode program's temporary memory (XLA's
      `memory_analysis`; -1 where the backend does not say).
    """

    prompt_tokens: int
    new_tokens: int
    compile_s: float
    prefill_s: float
    decode_s: float
    state_bytes: int
    decode_temp_bytes: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else math.inf

    def describe(self) -> str:
        """One line for a terminal."""
        return (
            f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.3f} s "
            f"({self.prefill_tokens_per_s:,.0f} tokens/s); decode: {self.new_tokens} "
            f"tokens in {self.decode_s:.3f} s ({self.decode_tokens_per_s:,.1f} tokens/s); "
            f"compile {self.compile_s:.1f} s; state {self.state_bytes / 2**20:.2f} MiB"
        )


def _prepare(model, prompt, max_new_tokens, temperature, top_k, top_p, key):
    vocab = _check_model(model)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    array = isinstance(key, jax.Array)
    typed = array and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
    raw = array and key.dtype == jnp.uint32 and key.shape == (2,)  # jr.PRNGKey
    if not (typed or raw):
        raise ValueError(f"`key` must be one jax.random.key, got {key!r}.")
    prompt = _check_prompt(prompt, vocab)
    model = with_cache_length(model, len(prompt) + max(max_new_tokens, 1))
    try:
        state = model.init_state()
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"cannot generate from this model: {e}") from e
    dtype = jnp.result_type(model.embedding.weight)
    # Traced: another temperature, k or p does not recompile; a filter that is off
    # (k=0, p=1) is skipped at run time.
    sampling = (
        jnp.asarray(temperature, dtype),
        jnp.asarray(top_k or 0, jnp.int32),
        jnp.asarray(1.0 if top_p is None else top_p, dtype),
    )
    return model, jnp.asarray(prompt), state, key, sampling


def generate(
    model: layers.SequenceModel,
    prompt: Int[Array, " prompt"] | np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKeyArray,
) -> Int[Array, " max_new_tokens"]:
    """Continue `prompt` by `max_new_tokens` tokens.

    The prompt goes through `model.prefill` once; the new tokens come from one
    compiled `lax.scan` over `model.step`, each drawn inside the loop by
    `sample_logits` with `jax.random.fold_in(key, i)` for the `i`-th new token. The KV
    caches of global attention are sized to `len(prompt) + max_new_tokens`
    (`with_cache_length`). Both programs are cached by `equinox.filter_jit`: another
    prompt length or number of tokens compiles again; another temperature, `top_k`
    or `top_p` (greedy included) does not.

    **Arguments:**

    - `model`: a `layers.SequenceModel` on tokens whose head outputs the vocabulary.
    - `prompt`: `(prompt,)` int token ids, at least one.
    - `max_new_tokens`: how many tokens to generate, `>= 0`.
    - `temperature`, `top_k`, `top_p`: as in `sample_logits` (0 is greedy).
    - `key`: a `jax.random.PRNGKey`; the same key gives the same tokens.

    **Returns:** `(max_new_tokens,)` int32 token ids, without the prompt.
    """
    model, prompt, state, key, sampling = _prepare(
        model, prompt, max_new_tokens, temperature, top_k, top_p, key
    )
    if max_new_tokens == 0:
        return jnp.zeros((0,), jnp.int32)
    logits, state = _prefill_jit(model, prompt, state)
    return _decode_jit(model, logits, state, key, *sampling, max_new_tokens)


def _temp_bytes(compiled) -> int:
    try:
        return int(compiled.compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return -1


def timed_generate(
    model: layers.SequenceModel,
    prompt: Int[Array, " prompt"] | np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKeyArray,
) -> tuple[np.ndarray, GenerationStats]:
    """`generate`, compiled ahead of time so that prefill and decode are timed apart
    from compilation and from each other.

    **Returns:** the new tokens as a NumPy int32 array `(max_new_tokens,)`, and a
    `GenerationStats`.
    """
    model, prompt, state, key, sampling = _prepare(
        model, prompt, max_new_tokens, temperature, top_k, top_p, key
    )
    t0 = time.perf_counter()
    prefill = _prefill_jit.lower(model, prompt, state).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, state = jax.block_until_ready(prefill(model, prompt, state))
    prefill_s = time.perf_counter() - t0
    tokens, decode_s, temp = np.zeros((0,), np.int32), 0.0, -1
    if max_new_tokens > 0:
        t0 = time.perf_counter()
        decode = _decode_jit.lower(
            model, logits, state, key, *sampling, max_new_tokens
        ).compile()
        compile_s += time.perf_counter() - t0
        temp = _temp_bytes(decode)
        t0 = time.perf_counter()
        out = decode(model, logits, state, key, *sampling, max_new_tokens)
        tokens = np.asarray(jax.device_get(jax.block_until_ready(out)))
        decode_s = time.perf_counter() - t0
    stats = GenerationStats(
        prompt_tokens=int(prompt.shape[0]),
        new_tokens=int(max_new_tokens),
        compile_s=compile_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        state_bytes=cache_bytes(state),
        decode_temp_bytes=temp,
    )
    return tokens, stats
