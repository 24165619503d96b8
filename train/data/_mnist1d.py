"""MNIST-1D (Greydanus & Kobak, ICML 2024), generated locally by the `mnist1d` package."""

import dataclasses
import functools
import random

import numpy as np

from ._base import Batch, Task, _check_int, _check_name, _help, _read_only, _require


@dataclasses.dataclass(frozen=True)
class MNIST1DConfig:
    """MNIST-1D classification (Greydanus & Kobak 2024), generated locally.

    Its split keys are not [`SplitSizes`][train.data.SplitSizes]: `num_train` is the
    generator's training portion, of which the last `num_val` are the validation split.
    """

    name: str = _help("task name", default="mnist1d")
    num_train: int = _help(
        "size of the generator's training portion; the last num_val of it become the "
        "validation split",
        default=4000,
    )
    num_val: int = _help("validation examples carved from the end of train", default=500)
    num_test: int = _help(
        "test examples (num_train + num_test must be a multiple of 10)", default=1000
    )
    seed: int = _help("seed of the mnist1d dataset generator", default=42)
    seq_len: int = _help("sequence length (the generator's final_seq_length)", default=40)
    shuffle_seq: bool = _help(
        "permute the time axis with one fixed permutation (the generator's shuffle_seq)",
        default=False,
    )
    train_shift: int = _help(
        "augmentation: circularly shift each training sequence by a random offset in "
        "[-train_shift, train_shift] (training batches only; 0 disables)",
        default=0,
    )
    train_noise: float = _help(
        "augmentation: standard deviation of Gaussian noise added to training inputs "
        "(training batches only; 0 disables)",
        default=0.0,
    )
    train_scale: float = _help(
        "augmentation: multiply each training sequence by 1 + a, a ~ U(-train_scale, "
        "train_scale) (training batches only; 0 disables)",
        default=0.0,
    )
    train_shear: float = _help(
        "augmentation: add c * t to each training sequence, c ~ U(-train_shear, "
        "train_shear), t = linspace(-0.5, 0.5, seq_len): a random linear ramp "
        "(training batches only; 0 disables)",
        default=0.0,
    )

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "num_train", 2)
        _check_int(self, "num_test", 1)
        total = self.num_train + self.num_test
        _require(
            total % 10 == 0,
            "num_test",
            "num_train + num_test must be a multiple of 10 (the generator makes equally "
            f"many of each digit), got {self.num_train} + {self.num_test} = {total}",
        )
        _check_int(self, "num_val", 1)
        _require(
            self.num_val < self.num_train,
            "num_val",
            f"must be < num_train ({self.num_train}), got {self.num_val}",
        )
        _check_int(self, "seed", 0, 2**32 - 1)
        _check_int(self, "seq_len", 1)
        _check_int(self, "train_shift", 0)
        _require(
            self.train_shift < self.seq_len,
            "train_shift",
            f"must be < seq_len ({self.seq_len}), got {self.train_shift}",
        )
        _require(
            float(self.train_noise) >= 0.0,
            "train_noise",
            f"must be >= 0, got {self.train_noise}",
        )
        for key in ("train_scale", "train_shear"):
            value = getattr(self, key)
            _require(
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and value >= 0,
                key,
                f"must be a number >= 0, got {value!r}",
            )


@functools.lru_cache(maxsize=8)
def _mnist1d_arrays(
    num_samples: int, seed: int, seq_len: int, shuffle_seq: bool
) -> tuple[np.ndarray, np.ndarray]:
    """All `num_samples` generated MNIST-1D examples, in the generator's order."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.final_seq_length = seq_len
    args.shuffle_seq = shuffle_seq
    # make_dataset seeds Python's and NumPy's global generators: put them back after.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[..., None]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
    return _read_only(x), _read_only(y)


class MNIST1DTask(Task):
    """MNIST-1D classification: `(B, seq_len, 1)` float inputs, 10 classes.

    The generator's examples `[0, num_train - num_val)` are the training split,
    `[num_train - num_val, num_train)` validation and `[num_train, num_train +
    num_test)` test. Generated arrays are cached in memory per generator settings.
    """

    kind = "classification"
    vocab_size = None
    d_input = 1
    n_outputs = 10
    splits = ("train", "val", "test")

    def __init__(self, config: MNIST1DConfig):
        self.config = config
        self.seq_len = config.seq_len
        self._x, self._y = _mnist1d_arrays(
            config.num_train + config.num_test, config.seed, config.seq_len,
            bool(config.shuffle_seq),
        )  # fmt: skip
        n_train = config.num_train - config.num_val
        self._offset = {"train": 0, "val": n_train, "test": config.num_train}
        self._size = {"train": n_train, "val": config.num_val, "test": config.num_test}

    def size(self, split: str) -> int:
        return self._size[self._check_split(split)]

    def examples(self, split: str, idx: np.ndarray) -> Batch:
        idx = self._indices(split, idx) + self._offset[split]
        return {"inputs": self._x[idx], "targets": self._y[idx]}

    def augment(
        self, batch: Batch, rng: np.random.Generator, rows: slice, batch_size: int
    ) -> Batch:
        """Random circular time shifts, Gaussian noise, scaling and linear ramps (in
        that order), as the config asks."""
        x = batch["inputs"]
        full = batch_size  # draws for the whole batch, then this share's rows
        shift, noise = self.config.train_shift, float(self.config.train_noise)
        if shift > 0:
            offsets = rng.integers(-shift, shift + 1, size=full)[rows]
            time = (np.arange(x.shape[1])[None, :] - offsets[:, None]) % x.shape[1]
            x = np.take_along_axis(x, time[:, :, None], axis=1)
        if noise > 0.0:
            shape = (full,) + x.shape[1:]
            x = x + np.float32(noise) * rng.standard_normal(shape, dtype=np.float32)[rows]
        scale, shear = float(self.config.train_scale), float(self.config.train_shear)
        if scale > 0.0:
            a = rng.uniform(-scale, scale, size=full)[rows].astype(np.float32)
            x = x * (1 + a)[:, None, None]
        if shear > 0.0:
            c = rng.uniform(-shear, shear, size=full)[rows].astype(np.float32)
            t = np.linspace(-0.5, 0.5, x.shape[1], dtype=np.float32)
            x = x + c[:, None, None] * t[None, :, None]
        return {**batch, "inputs": x.astype(np.float32)}
