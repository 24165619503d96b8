"""`allow_neg_eigval` (Grazzi et al. 2025, "Unlocking state-tracking in linear RNNs
through negative eigenvalues"): transition eigenvalues in `(-1, 1)` instead of
`(0, 1)`.

For Mamba and Mamba-2 (`a = 2 exp(Δ A) - 1`, the input term unchanged) and DeltaNet
and Gated DeltaNet (`β = 2σ(·)`, so `α (I - β k kᵀ)` has the eigenvalue `α (1 - β)`
along `k`), in float64 at an odd length, each case in one compilation:

- the layer equals a plain loop over time written below from the equations, on the
  layer's own parameters, in values and in gradients to the input and every
  parameter;
- some transition eigenvalue of that loop is negative for the drawn parameters and
  input (so the comparison fails if the option did nothing);
- `__call__ == prefill == prefill in two calls == step by step`, outputs and states;
- packed documents (`resets`) equal the documents run separately, values and
  gradients.

With the option off the layers are unchanged; tests/test_layers_diagonal.py,
tests/test_layers_matrix.py and tests/test_packing.py cover that.
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
import train

from .helpers import assert_close, assert_gradient_reaches_every_parameter, numpy_rules
from .test_layers_diagonal import ref_mamba
from .test_layers_matrix import ref_delta_rule, ref_mamba2
from .test_packing import _documents, _resets, _undocument

D_MODEL = 6
LENGTHS = (5, 1, 7)  # packed documents; boundaries inside the chunks of 4 steps
STARTS = np.cumsum((0,) + LENGTHS[:-1])
T = sum(LENGTHS)  # 13: odd, not a multiple of the chunk size
SPLIT = 6
f64 = jnp.float64

CASES = {  # large enough steps (`dt_min`, `dt_max`) that 2 exp(Δ A) - 1 goes negative
    "mamba": dict(d_state=4, chunk_size=4, dt_min=0.1, dt_max=0.9),
    "mamba2": dict(d_state=4, num_heads=2, chunk_size=4, dt_min=0.05, dt_max=0.5),
    "deltanet": dict(num_heads=2, chunk_size=4),
    "gated_deltanet": dict(num_heads=2, head_dim=3, chunk_size=4),
}


def _f64(tree):
    def cast(v):
        return v.astype(f64) if eqx.is_inexact_array(v) else v

    return jax.tree.map(cast, tree)


@functools.cache
def make(name):
    kwargs = dict(CASES[name], allow_neg_eigval=True)
    build = lambda key: _f64(layers.MIXERS[name](D_MODEL, **kwargs, key=key))
    return eqx.filter_jit(build)(jr.key(zlib.crc32(name.encode())))


def draw(name, shape, salt):
    rng = np.random.default_rng(zlib.crc32((name + salt).encode()))
    return jnp.asarray(rng.standard_normal(shape))


# ---------------------------------------------------------------- references (float64)
# The layers' plain loops (tests/test_layers_diagonal.py, test_layers_matrix.py), which
# follow `allow_neg_eigval`, with the transitions returned too.

REFERENCES = {
    name: functools.partial(ref, transitions=True)
    for name, ref in (
        ("mamba", ref_mamba),
        ("mamba2", ref_mamba2),
        ("deltanet", ref_delta_rule),
        ("gated_deltanet", ref_delta_rule),
    )
}


# ---------------------------------------------------------------------------- tests


@eqx.filter_jit
def _everything(m, x, w, reference):
    """All the comparisons of one case in one compiled program."""

    def grad(f):
        def loss(mx):
            y = f(*mx)
            return jnp.sum(y * w), y

        return eqx.filter_grad(loss, has_aux=True)((m, x))

    ref = numpy_rules(reference)
    out = dict(
        layer=grad(lambda m, x: m(x)),
        reference=grad(lambda m, x: ref(m, x)[0]),
        eig=ref(m, x)[1],
    )
    # the recurrent forms, in float64 states
    init = _f64(m.init_state())
    y, s = m.prefill(x, init)
    y1, s1 = m.prefill(x[:SPLIT], init)
    y2, s2 = m.prefill(x[SPLIT:], s1)
    s_step, y_step = jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], init, x)
    out["forms"] = dict(
        y=y, y_split=jnp.concatenate([y1, y2]), y_step=y_step, s=s, s2=s2, s_step=s_step
    )
    # packed documents against separate ones
    resets = _resets(False)
    out["packed"] = grad(lambda m, x: m(x, resets=resets))
    out["separate"] = grad(lambda m, x: _undocument(jax.vmap(m)(_documents(x))))
    y_a, state = m.prefill(x[:SPLIT], init, resets=resets[:SPLIT])
    y_b, _ = m.prefill(x[SPLIT:], state, resets=resets[SPLIT:])
    out["packed_split"] = jnp.concatenate([y_a, y_b])
    out["dropped"] = m.prefill(x, state, resets=_resets(True))[0]  # `state` is not zero
    return out


@pytest.mark.parametrize("name", CASES)
def test_neg_eigval(name):
    m = make(name)
    assert m.allow_neg_eigval
    x = draw(name, (T, D_MODEL), "x")
    w = draw(name, (T, D_MODEL), "w")
    r = _everything(m, x, w, REFERENCES[name])

    # the layer is the equations: values, and gradients to the input and parameters
    (g, y), (g_ref, y_ref) = r["layer"], r["reference"]
    assert y.dtype == f64 and y.shape == (T, D_MODEL)
    assert_close(y, y_ref, 1e-10, f"{name} values")
    assert_close(g, g_ref, 1e-9, f"{name} gradients")
    assert_gradient_reaches_every_parameter(g[0], m)
    # ... and the option is in use: some eigenvalue is negative, none outside (-1, 1)
    eig = np.asarray(r["eig"])
    assert eig.min() < -0.1, eig.min()
    assert np.all(np.abs(eig) < 1)

    # __call__ == prefill == prefill in two calls == step by step
    f = r["forms"]
    assert_close(f["y"], y, 1e-12, f"{name}: prefill against __call__")
    assert_close(f["y_split"], y, 1e-12, f"{name}: prefill in two calls")
    assert_close(f["y_step"], y, 1e-12, f"{name}: step by step")
    assert_close(f["s2"], f["s"], 1e-12, f"{name}: state after two prefills")
    assert_close(f["s_step"], f["s"], 1e-12, f"{name}: state after the steps")

    # packed documents equal separate ones, values and gradients
    (g_p, y_p), (g_s, y_s) = r["packed"], r["separate"]
    assert_close(y_p, y_s, 1e-10, f"{name}: packed outputs")
    assert_close(g_p, g_s, 1e-9, f"{name}: packed gradients")
    assert_close(r["packed_split"], y_p, 1e-10, f"{name}: packed prefill in two calls")
    assert_close(r["dropped"], y_p, 1e-10, f"{name}: reset at token 0")
    assert float(jnp.max(jnp.abs(y - y_s))) > 1e-3  # without resets the documents mix


@pytest.mark.parametrize("name", CASES)
def test_neg_eigval_reaches_the_layer_from_a_config(name):
    """`model.mixer_kwargs: {allow_neg_eigval: true}` builds the model's mixers with it;
    the default is off."""

    def mixer(**options):
        config = train.config.parse(
            {
                "model": dict(mixer=name, d_model=8, n_layers=1, mixer_kwargs=options),
                "task": {"name": "parity"},
            }
        )
        task = train.build_task(config.task)
        model = eqx.filter_eval_shape(train.build_model, config, task, jr.key(0))
        return model.blocks[0].mixer

    assert mixer(allow_neg_eigval=True).allow_neg_eigval
    assert not mixer().allow_neg_eigval


def test_mamba_memory_is_not_the_state_history():
    """With the option on, Mamba scans through `ssm.linear_scan` one rematerialised
    chunk at a time: forward+backward at T = 4096 holds less than the `T x d_inner x
    d_state` state history (which a scan over the whole sequence stores, besides its
    transitions), one compilation. Mamba-2's path is the same `chunked` helper."""
    m = layers.Mamba(16, d_state=128, chunk_size=32, allow_neg_eigval=True, key=jr.key(0))
    params, static = eqx.partition(m, eqx.is_array)
    f = jax.jit(jax.grad(lambda p, x: jnp.sum(eqx.combine(p, static)(x) ** 2)))
    T_long = 4096
    x = jax.ShapeDtypeStruct((T_long, 16), jnp.float32)
    temp = f.lower(params, x).compile().memory_analysis().temp_size_in_bytes
    history = T_long * m.d_inner * m.d_state * 4
    assert temp < history, (temp, history)  # measured: 0.43 of it
