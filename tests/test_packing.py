"""Packed documents through every registered mixer: `resets` keeps them apart.

For each mixer, in float64, with documents of lengths 5, 1 and 7 (boundaries at odd
positions, inside the chunks of 4 steps that the chunked mixers use here):

- values: `mixer(concat(x1, x2, x3), resets)` equals `concat(mixer(x1), mixer(x2),
  mixer(x3))`;
- gradients, to the input and to every parameter, of a random projection of the
  outputs equal those of the separate documents;
- `prefill` with a reset at the first token drops the state it is given, and two
  `prefill` calls split inside a document (the second one holding the boundaries)
  give the same outputs as one.

Each mixer compiles once (`_everything`); the separate documents run as one
`jax.vmap` over documents zero-padded at their ends (causality makes the padding
invisible on the documents' own positions).
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

from .helpers import assert_close, raises_as_user

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


def _documents(x):
    """The documents of `x`, each zero-padded at its end to the longest one: causal
    mixers give the same outputs on a document's own positions."""
    L = max(LENGTHS)
    docs = [x[s : s + n] for s, n in zip(STARTS, LENGTHS, strict=True)]
    return jnp.stack([jnp.pad(d, ((0, L - d.shape[0]), (0, 0))) for d in docs])


def _undocument(y):
    return jnp.concatenate([y[i, :n] for i, n in enumerate(LENGTHS)])


@eqx.filter_jit
def _everything(m, x, w):
    """All the comparisons of one mixer in one compilation."""
    resets = _resets(False)

    def packed(mx):
        m, x = mx
        y = m(x, resets=resets)
        return jnp.sum(y * w), y

    def separate(mx):  # one vmapped call over the padded documents
        m, x = mx
        y = _undocument(jax.vmap(m)(_documents(x)))
        return jnp.sum(y * w), y

    grad = lambda f: eqx.filter_grad(f, has_aux=True)((m, x))
    init = _f64(m.init_state())  # float64 states: the comparisons are exact
    y_a, state = m.prefill(x[:SPLIT], init, resets=resets[:SPLIT])
    y_b, _ = m.prefill(x[SPLIT:], state, resets=resets[SPLIT:])
    dropped, _ = m.prefill(x, state, resets=_resets(True))  # `state` is not zero
    prefills = dict(split=jnp.concatenate([y_a, y_b]), dropped=dropped)
    return grad(packed), grad(separate), prefills, m(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_equals_separate_documents(name):
    m = make(name)
    x = draw(name, (T, D_MODEL), "x")
    w = draw(name, (T, D_MODEL), "w")
    (g_packed, y_packed), (g_sep, y_sep), prefills, y_mixed = _everything(m, x, w)
    assert_close(y_packed, y_sep, 1e-9, f"{name} outputs")
    assert_close(g_packed[1], g_sep[1], 1e-8, f"{name} input gradient")
    arrays = lambda tree: eqx.filter(tree, eqx.is_array)
    sep_leaves = jax.tree.leaves(arrays(g_sep[0]))
    packed_leaves = jax.tree_util.tree_leaves_with_path(arrays(g_packed[0]))
    for (path, a), b in zip(packed_leaves, sep_leaves, strict=True):
        assert_close(a, b, 1e-8, f"{name} gradient {jax.tree_util.keystr(path)}")
    # prefill: split inside a document (the second call holds both boundaries), and
    # a reset at the first token drops the state it is given.
    assert_close(prefills["split"], y_packed, 1e-9, f"{name}: prefill in two calls")
    assert_close(prefills["dropped"], y_packed, 1e-9, f"{name}: reset at token 0")
    # The comparison means something: without resets the documents mix.
    assert float(jnp.max(jnp.abs(y_mixed - y_sep))) > 1e-3


@pytest.mark.parametrize("bad", [jnp.zeros(T, jnp.int32), jnp.zeros(T + 1, bool)])
def test_bad_resets_are_named(bad):
    m = make("lru")
    with raises_as_user(ValueError, match="resets"):
        m(jnp.zeros((T, D_MODEL)), resets=bad)
