"""Batching: training batches as a pure function of (seed, step), evaluation walks."""

import functools
from collections.abc import Iterator

import numpy as np

from ._base import Batch, Task, _read_only


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0, epoch])
    return _read_only(rng.permutation(n))


def train_indices(num_examples: int, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The training-split indices of batch `step`: a pure function of its arguments.

    Position `s = step * batch_size + i` of the stream is example
    `perm(seed, s // num_examples)[s % num_examples]`, with one permutation of
    `range(num_examples)` per epoch; a batch may span an epoch boundary.

    **Returns:**

    A `(batch_size,)` int64 array.
    """
    if num_examples < 1 or batch_size < 1 or step < 0 or seed < 0:
        raise ValueError(
            "need num_examples >= 1, batch_size >= 1, step >= 0 and seed >= 0, got "
            f"{num_examples}, {batch_size}, {step}, {seed}"
        )
    position = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, offset = np.divmod(position, num_examples)
    idx = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        idx[sel] = _epoch_permutation(seed, int(e), num_examples)[offset[sel]]
    return idx


def train_batch(
    task: Task, seed: int, step: int, batch_size: int, rows: slice | None = None
) -> Batch:
    """Training batch number `step`, a pure function of `(seed, step)` for a task.

    **Arguments:**

    - `task`: the task.
    - `seed`: the data-order seed (separate from the task's generator seed).
    - `step`: the batch number, from 0.
    - `batch_size`: examples per batch (the global batch).
    - `rows`: only these rows of the batch (a process's share in a multi-process run);
      they equal the same rows of the whole batch.

    **Returns:**

    `task.examples("train", train_indices(...)[rows])` after the task's training
    augmentation (drawn from `(seed, step)`).
    """
    rows = slice(0, batch_size) if rows is None else rows
    if not 0 <= (rows.start or 0) <= rows.stop <= batch_size or rows.step not in (None, 1):
        raise ValueError(
            f"rows must be a contiguous slice of range({batch_size}), got {rows}"
        )
    rows = slice(rows.start or 0, rows.stop)
    idx = train_indices(task.size("train"), seed, step, batch_size)[rows]
    batch = task.examples("train", idx)
    return task.augment(batch, np.random.default_rng([seed, 1, step]), rows, batch_size)


def eval_batches(
    task: Task, split: str, batch_size: int, *, max_examples: int | None = None
) -> Iterator[Batch]:
    """Walk a split in order, in batches that all have `batch_size` rows.

    **Arguments:**

    - `task`: the task.
    - `split`: one of `task.splits`.
    - `batch_size`: rows per batch.
    - `max_examples`: evaluate only the first this many examples (all when `None`).

    **Returns:**

    An iterator of batches as `task.examples` gives them, plus `"weight"`: `(B,)`
    float32, 1 for real examples and 0 for the padding that fills the last batch
    (copies of the split's first example).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = task.size(split)
    if max_examples is not None:
        n = min(n, max_examples)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        idx = np.zeros(batch_size, np.int64)
        idx[:count] = np.arange(start, start + count)
        weight = np.zeros(batch_size, np.float32)
        weight[:count] = 1.0
        yield {**task.examples(split, idx), "weight": weight}
