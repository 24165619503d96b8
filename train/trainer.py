"""The model, the optimiser, the train state and the jitted train and eval steps."""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Int, PyTree, UInt32

import layers

from .checkpoint import flatten, path_str
from .config import Config, ConfigError, OptimConfig


class TrainState(eqx.Module):
    """Everything a run needs to continue exactly: `step`, the parameters, the
    optimiser state, the base `key` (raw uint32 data; step keys are
    `fold_in(key, step)`) and the EMA of the parameters (or None)."""

    step: Int[Array, ""]
    params: PyTree
    opt_state: PyTree
    key: UInt32[Array, "2"]
    ema: PyTree | None


# ------------------------------------------------------------------------------ model


def pooling_of(config: Config, task) -> str | None:
    pooling = config.model.pooling
    if pooling == "auto":
        return "mean" if task.kind == "classification" else None
    if pooling == "none":
        if task.kind == "classification":
            raise ConfigError(
                "model.pooling: a classification task needs 'mean' or 'last', got 'none'"
            )
        return None
    if task.kind != "classification":
        raise ConfigError(
            f"model.pooling: task {task.config.name!r} predicts every step, so pooling "
            f"must be 'auto' or 'none', got {pooling!r}"
        )
    return pooling


def build_model(config: Config, task, key) -> layers.SequenceModel:
    """The `layers.SequenceModel` a config describes, sized for `task`: the model
    section's, or with `model.hf_config` (`init_from: hf:PATH`) the architecture of
    that Hugging Face `config.json` with the task's outputs and an untied head."""
    m = config.model
    if m.hf_config is None:  # a checkpoint's attention window is not ours to change
        m.check_for_task(task.seq_len)
    by_mixer = m.kwargs_by_mixer()  # a hybrid stack's options, by mixer name
    if config.distributed.seq > 1:
        from .distributed import SEQ_MIXERS

        if any(kind not in SEQ_MIXERS for kind in by_mixer):
            raise ConfigError(
                f"distributed.seq: sequence parallelism needs mixers in {SEQ_MIXERS}, "
                f"got model.mixer={m.mixer!r}"
            )
        for options in by_mixer.values():
            options["seq_axis"] = "seq"
    if m.hf_config is not None:
        from .hf import trainer_architecture

        structure = trainer_architecture(m.hf_config, by_mixer)
    else:
        structure = {
            "mixer": m.mixer,
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "mixer_kwargs": by_mixer[m.mixer] if isinstance(m.mixer, str) else by_mixer,
            "mlp_ratio": m.mlp_ratio,
        }
    try:
        return layers.SequenceModel(
            **structure,
            d_output=task.n_outputs,
            vocab_size=task.vocab_size,
            d_input=task.d_input,
            pooling=pooling_of(config, task),
            dropout=m.dropout,
            remat=m.remat,
            key=key,
        )
    except TypeError as e:
        raise ConfigError(f"model.mixer_kwargs: not accepted by {m.mixer!r}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


# -------------------------------------------------------------------------- optimiser


def learning_rate(optim: OptimConfig, steps: int) -> optax.Schedule:
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
    if optim.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(optim.lr)
        return optax.linear_schedule(0.0, optim.lr, warmup)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=optim.lr * optim.min_lr_ratio,
    )


def _base(
    optim: OptimConfig, lr, weight_decay: float, mask
) -> optax.GradientTransformation:
    if optim.name == "adamw":
        return optax.adamw(lr, optim.b1, optim.b2, weight_decay=weight_decay, mask=mask)
    if optim.name == "lion":
        return optax.lion(lr, optim.b1, optim.b2, weight_decay=weight_decay, mask=mask)
    decay = optax.add_decayed_weights(weight_decay, mask) if weight_decay else None
    inner = (
        optax.adam(lr, optim.b1, optim.b2)
        if optim.name == "adam"
        else optax.sgd(lr, momentum=optim.b1 or None)
    )
    return optax.chain(decay, inner) if decay is not None else inner


def param_labels(params, freeze: list[str]) -> PyTree[str]:
    """`"ssm"`, `"other"` or `"frozen"` for every parameter; frozen wins."""
    labels = layers.ssm_param_labels(params)
    if not freeze:
        return labels
    used = set()

    def relabel(path, label):
        name = path_str(path)
        for pattern in freeze:
            if fnmatch.fnmatchcase(name, pattern):
                used.add(pattern)
                return "frozen"
        return label

    labels = jax.tree_util.tree_map_with_path(relabel, labels)
    unused = [p for p in freeze if p not in used]
    if unused:
        names = sorted(flatten(params))
        raise ConfigError(
            f"train.freeze: pattern(s) {unused} match no parameter; parameters are named "
            f"like {names[:4]}"
        )
    return labels


def make_optimizer(config: Config, params) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW-style optimiser with warm-up + cosine, global-norm clipping, weight decay on
    matrices only, a lower rate and no decay for SSM parameters, frozen paths."""
    optim = config.optim
    schedule = learning_rate(optim, config.train.steps)
    labels = param_labels(params, config.train.freeze)

    def decay_mask(tree):
        return jax.tree.map(lambda p: p.ndim >= 2, tree)

    def ssm_schedule(step):
        return schedule(step) * optim.ssm_lr_factor

    transforms = {
        "other": _base(optim, schedule, optim.weight_decay, decay_mask),
        "ssm": _base(optim, ssm_schedule, optim.ssm_weight_decay, None),
        "frozen": optax.set_to_zero(),
    }
    parts = [optax.multi_transform(transforms, lambda _: labels)]  # labels is a Module
    if optim.clip_norm is not None:
        parts.insert(0, optax.clip_by_global_norm(optim.clip_norm))
    return optax.chain(*parts), schedule


def unalias(tree: PyTree) -> PyTree:
    """`tree` with a fresh copy of every array leaf that is the same array as an
    earlier leaf (two parameters built from one `zeros`, tied weights loaded twice):
    the donated training step cannot take one buffer as two arguments."""
    seen: set[int] = set()

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(one, tree)


def init_state(config: Config, params, optimizer, key) -> TrainState:
    params = unalias(params)
    ema = jax.tree.map(jnp.copy, params) if config.optim.ema_decay is not None else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        key=jr.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key,
        ema=ema,
    )


# ------------------------------------------------------------------------------ steps


def _cast_compute(params, dtype):
    if dtype == jnp.float32:
        return params
    return jax.tree.map(
        lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )


def takes_resets(model) -> bool:
    """Whether every block's mixer accepts `resets` (packed documents), as the mixer
    contract asks (`layers.AbstractMixer`); every registered mixer does."""
    blocks = getattr(model, "blocks", None)
    if not blocks:
        return False
    return all(
        "resets" in inspect.signature(type(b.mixer).__call__).parameters for b in blocks
    )


def _sums(static, params, batch, key, kind: str, compute_dtype):
    """Summed loss, correct predictions and count of one batch (weights/masks applied)."""
    model = eqx.combine(_cast_compute(params, compute_dtype), static)
    inputs = batch["inputs"]
    if jnp.issubdtype(inputs.dtype, jnp.floating):
        inputs = inputs.astype(compute_dtype)
    B = inputs.shape[0]
    resets = batch.get("resets")
    if resets is not None and not takes_resets(model):
        names = sorted({type(b.mixer).__name__ for b in model.blocks})
        raise TypeError(
            f"the task packs documents (its batches carry `resets`), but a mixer of "
            f"this model ({', '.join(names)}) does not accept `resets=`: its "
            "`__call__(x, *, resets=None, key=None)` must restart its state at them "
            "(see layers.AbstractMixer)."
        )
    if resets is None:
        resets = jnp.zeros(inputs.shape[:2], bool)
        call = lambda m, x, r, k: m(x, key=k)
    else:
        call = lambda m, x, r, k: m(x, resets=r, key=k)
    if key is None:
        frozen = eqx.nn.inference_mode(model)
        logits = jax.vmap(lambda x, r: call(frozen, x, r, None))(inputs, resets)
    else:
        logits = jax.vmap(lambda x, r, k: call(model, x, r, k))(
            inputs, resets, jr.split(key, B)
        )
    logits = logits.astype(jnp.float32)
    targets = batch["targets"]
    weight = batch.get("weight")
    weight = jnp.ones((B,), jnp.float32) if weight is None else weight
    if kind == "classification":
        w = weight
    else:
        w = batch["mask"].astype(jnp.float32) * weight[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1).astype(targets.dtype) == targets).astype(
        jnp.float32
    )
    return {
        "loss": jnp.sum(ce * w),
        "correct": jnp.sum(correct * w),
        "count": jnp.sum(w),
    }


def make_train_step(
    config: Config, static, optimizer, kind: str, state_sharding=None, metrics_sharding=None
):
    """`step(state, batch) -> (state, metrics)`, jitted, with the state donated.

    Gradient accumulation splits the batch into `optim.grad_accum` micro-batches whose
    summed gradients equal the full batch's. A non-finite loss or gradient leaves the
    parameters, optimiser state and EMA as they were (`metrics["finite"]` is False).
    """
    accum = config.optim.grad_accum
    ema_decay = config.optim.ema_decay
    compute_dtype = jnp.dtype(config.model.compute_dtype)
    dropout = config.model.dropout > 0

    def micro_loss(params, batch, key, total):
        sums = _sums(static, params, batch, key, kind, compute_dtype)
        return sums["loss"] / total, sums

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        key = jr.fold_in(jr.wrap_key_data(state.key), state.step) if dropout else None
        total = jnp.maximum(_count(batch, kind), 1.0)
        if accum == 1:
            grads, sums = grad_fn(state.params, batch, key, total)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch
            )
            keys = None if key is None else jr.split(key, accum)

            def body(carry, inputs):
                i, mb = inputs
                k = None if keys is None else keys[i]
                g, s = grad_fn(state.params, mb, k, total)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = (
                jax.tree.map(jnp.zeros_like, state.params),
                {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")},
            )
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        loss = sums["loss"] / total
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = jax.tree.map(
                lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params
            )

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            key=state.key,
            ema=None if ema is None else keep(ema, state.ema),
        )
        metrics = {
            "loss": loss,
            "accuracy": sums["correct"] / total,
            "grad_norm": grad_norm,
            "finite": finite,
        }
        return new, metrics

    if state_sharding is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, metrics_sharding))


def _count(batch, kind):
    if kind == "classification":
        w = batch.get("weight")
        return jnp.asarray(batch["targets"].shape[0], jnp.float32) if w is None else w.sum()
    return batch["mask"].astype(jnp.float32).sum()


def make_eval_step(config: Config, static, kind: str):
    compute_dtype = jnp.dtype(config.model.compute_dtype)

    @jax.jit
    def step(params, batch):
        sums = _sums(static, params, batch, None, kind, compute_dtype)
        if "bytes" in batch:  # bytes of text per target, for bits per byte
            w = batch["mask"].astype(jnp.float32)
            if "weight" in batch:
                w = w * batch["weight"][:, None]
            sums["bytes"] = jnp.sum(batch["bytes"].astype(jnp.float32) * w)
        return sums

    return step


def evaluate(eval_step, params, batches, kind: str) -> dict[str, float]:
    """Loss and accuracy over a whole split (exact sums over the examples), and for a
    language model whose batches carry `bytes`, bits per byte: the summed loss in nats
    over the summed bytes of text of the targets, / ln 2 (comparable across
    tokenizers)."""
    total = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in batches:
        if isinstance(next(iter(batch.values())), np.ndarray):
            batch = device_batch(batch)
        sums = jax.device_get(eval_step(params, batch))
        for k in sums:
            total[k] = total.get(k, 0.0) + float(sums[k])
    count = max(total["count"], 1.0)
    out = {"loss": total["loss"] / count, "accuracy": total["correct"] / count}
    if kind == "lm" and total.get("bytes", 0.0) > 0:
        out["bits_per_byte"] = total["loss"] / total["bytes"] / math.log(2)
    return out


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: jnp.asarray(v) for k, v in batch.items()}
