"""Packed documents through every registered mixer: `resets` keeps them apart.

For each mixer, in float64, with documents of lengths 5, 1 and 7 (boundaries at odd
positions, inside the chunks of 4 steps that the chunked mixers use here):

- values: `mixer(concat(x1, x2, x3), resets)` equals `concat(mixer(x1), mixer(x2),
  mixer(x3))`;
- gradients, to the input and to every parameter, of a random projection of the
  outputs equal those of the separate documents;
- `prefill` with a reset at the first token drops the state it is given, and two
  `prefill` calls split inside a document (the second one holding a boundary) give
  the same outputs as one.
"""

import functools
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import layers

from .helpers import assert_close

D_MODEL = 8
LENGTHS = (5, 1, 7)
STARTS = np.cumsum((0,) + LENGTHS[:-1])  # 0, 5, 6
T = sum(LENGTHS)
SPLIT = 4  # the two-call prefill splits inside the first document

CASES = {  # every registered mixer, small, with chunks shorter than the documents
    "s4d": dict(state_size=4, chunk_size=4),
    "s5": dict(state_size=4),
    "lru": dict(state_size=4),
    "mamba": dict(d_state=4, chunk_size=4),
    "rglru": dict(d_rnn=8, num_heads=2),
    "gru": dict(d_hidden=6),
    "lstm": dict(d_hidden=6),
    "linear_attention": dict(num_heads=2, chunk_size=4),
    "retnet": dict(num_heads=2, chunk_size=4),
    "gla": dict(num_heads=2, chunk_size=4),
    "mlstm": dict(num_heads=2, chunk_size=4),
    "mamba2": dict(d_state=4, num_heads=2, chunk_size=4),
    "deltanet": dict(num_heads=2, allow_neg_eigval=True, chunk_size=4),
    "gated_deltanet": dict(num_heads=2, head_dim=3, chunk_size=4),
    "attention": dict(num_heads=2, num_kv_heads=1, max_len=32),
    "local_attention": dict(num_heads=2, window=3),
}


def test_every_registered_mixer_is_covered():
    assert set(CASES) == set(layers.MIXERS)


def _f64(tree):
    def cast(v):
        if not eqx.is_inexact_array(v):
            return v
        complex_ = jnp.issubdtype(v.dtype, jnp.complexfloating)
        return v.astype(jnp.complex128 if complex_ else jnp.float64)

    return jax.tree.map(cast, tree)


@functools.cache
def make(name):
    build = lambda key: _f64(layers.MIXERS[name](D_MODEL, **CASES[name], key=key))
    return eqx.filter_jit(build)(jr.key(zlib.crc32(name.encode())))


def draw(name, shape, salt):
    rng = np.random.default_rng(zlib.crc32((name + salt).encode()))
    return jnp.asarray(rng.standard_normal(shape))


def _resets(first: bool):
    r = np.zeros(T, bool)
    r[STARTS] = True
    r[0] = first
    return jnp.asarray(r)


@eqx.filter_jit
def _packed_vs_separate(m, x, w):
    resets = _resets(False)

    def packed(mx):
        m, x = mx
        y = m(x, resets=resets)
        return jnp.sum(y * w), y

    def separate(mx):
        m, x = mx
        ends = np.append(STARTS[1:], T)
        y = jnp.concatenate([m(x[s:e]) for s, e in zip(STARTS, ends, strict=True)])
        return jnp.sum(y * w), y

    grad = lambda f: eqx.filter_grad(f, has_aux=True)((m, x))
    return grad(packed), grad(separate)


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_equals_separate_documents(name):
    m = make(name)
    x = draw(name, (T, D_MODEL), "x")
    w = draw(name, (T, D_MODEL), "w")
    (g_packed, y_packed), (g_sep, y_sep) = _packed_vs_separate(m, x, w)
    assert_close(y_packed, y_sep, 1e-9, f"{name} outputs")
    assert_close(g_packed[1], g_sep[1], 1e-8, f"{name} input gradient")
    packed_leaves = jax.tree_util.tree_leaves_with_path(
        eqx.filter(g_packed[0], eqx.is_array)
    )
    sep_leaves = jax.tree.leaves(eqx.filter(g_sep[0], eqx.is_array))
    for (path, a), b in zip(packed_leaves, sep_leaves, strict=True):
        assert_close(a, b, 1e-8, f"{name} gradient {jax.tree_util.keystr(path)}")
    # The comparison means something: without resets the documents mix.
    y_mixed = eqx.filter_jit(lambda m, x: m(x))(m, x)
    assert float(jnp.max(jnp.abs(y_mixed - y_sep))) > 1e-3


@eqx.filter_jit
def _prefills(m, x, prefix):
    init = _f64(m.init_state())  # float64 states: the comparisons are exact
    _, state = m.prefill(prefix, init)
    dropped, _ = m.prefill(x, state, resets=_resets(True))
    resets = _resets(False)
    y_a, s = m.prefill(x[:SPLIT], init, resets=resets[:SPLIT])
    y_b, _ = m.prefill(x[SPLIT:], s, resets=resets[SPLIT:])
    return dropped, jnp.concatenate([y_a, y_b]), m(x, resets=resets)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_with_resets(name):
    m = make(name)
    x = draw(name, (T, D_MODEL), "x")
    prefix = draw(name, (3, D_MODEL), "prefix")
    dropped, split, packed = _prefills(m, x, prefix)
    alone = eqx.filter_jit(lambda m, x: m(x, resets=_resets(True)))(m, x)
    assert_close(dropped, alone, 1e-9, f"{name}: a reset at the first token")
    assert_close(split, packed, 1e-9, f"{name}: prefill in two calls")


@pytest.mark.parametrize("bad", [jnp.zeros(T, jnp.int32), jnp.zeros(T + 1, bool)])
def test_bad_resets_are_named(bad):
    m = make("lru")
    with pytest.raises(ValueError, match="resets"):
        m(jnp.zeros((T, D_MODEL)), resets=bad)
