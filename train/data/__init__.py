"""Datasets and batching for training: MNIST-1D, synthetic recall tasks, language modelling.

A task is chosen by a frozen config dataclass (one per task, registered in `TASKS`
under the name that configs use) and built with `build_task(config)` into a
[`Task`][]: the shapes a model needs (`kind`, `vocab_size`, `d_input`, `n_outputs`,
`seq_len`), the split names and sizes, and `examples(split, idx)`, which returns numpy
arrays for any set of example indices. Batches are numpy; the trainer puts them on
devices.

**Tasks:**

- `"mnist1d"`: MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with
  MNIST-1D", ICML 2024). Ten 1-D digit templates, padded, scaled, translated,
  sheared and noised into length-40 real-valued sequences; classify the digit.
  Generated locally by the `mnist1d` package (never downloaded): by default 5000
  examples, the first 4000 the generator's training portion (of which the last
  `num_val` become the validation split) and the last 1000 the test split.
- `"copying"`: the copy-memory task (Hochreiter & Schmidhuber 1997; Arjovsky, Shah
  and Bengio, "Unitary evolution recurrent neural networks", ICML 2016). `num_tokens`
  data tokens, then `lag` noise tokens, then `num_tokens` marker tokens; at the
  markers the model outputs the data tokens in order.
- `"selective_copying"`: selective copying (Gu & Dao, "Mamba: linear-time sequence
  modeling with selective state spaces", 2023, Sec. 3.1). As copying, but the data
  tokens sit at random positions among noise tokens in a context of `context_len`
  positions, so the spacing must be filtered out by content.
- `"mqar"`: multi-query associative recall (Arora et al., "Zoology: measuring and
  improving recall in efficient language models", 2023). `num_kv_pairs` key-value
  pairs, then the keys again, one at a time, at power-law distributed positions
  among random tokens; at each query the target is the value bound to that key.
- `"induction_heads"`: induction heads (Olsson et al., "In-context learning and
  induction heads", 2022; the synthetic task of Fu et al., H3, 2023, and of the Mamba
  paper, Sec. 4.1). Random tokens with a trigger token somewhere followed by an
  answer token; the sequence ends with the trigger again and the target is the answer.
- `"parity"`, `"modular_addition"`: state tracking (Deletang et al., "Neural networks
  and the Chomsky hierarchy", ICLR 2023, as used by the xLSTM paper and by Grazzi et
  al., "Unlocking state-tracking in linear RNNs through negative eigenvalues", ICLR
  2025). Tokens in `Z_m` (bits for parity) of lengths uniform in `[min_len, max_len]`,
  padded; the label is their sum mod `m`, at the last token (`supervision: final`, an
  accuracy over sequences) or at every token (`running`). Train short, test long with
  `eval_lengths`.
- `"lm"`: language modelling over local text files, by default the Python standard
  library of the running interpreter (`stdlib:**/*.py`, less its test suites and
  installed packages). Tokens are UTF-8 bytes, byte-level BPE trained on the training
  split, or a `tokenizer.json`; documents (files or paragraphs) are packed into
  windows of `seq_len` with an end-of-document token between them, with `resets` at
  document starts and no loss on a prediction across a boundary. Text is tokenized
  once into memory-mapped shards in a cache directory. The last `val_fraction` of the
  bytes is held out for validation.
- `"lm_bytes"`: the same task with the defaults it always had: bytes of this
  working directory's `README.md` and `**/*.py` as one stream, no document tokens.

The synthetic tasks whose length is a parameter (copying's `lag`, selective copying's
`context_len`, MQAR's and induction heads' `seq_len`, the state-tracking tasks'
`min_len = max_len`) take `eval_lengths`: for each length `L` two more splits,
`val_len{L}` and `test_len{L}`, generated from a copy of the config with the length
set to `L` and a seed derived from `(seed, L)`; the trainer evaluates them at the end
with the chosen checkpoint and reports them in `summary.json`.

The synthetic tasks' configs share their split keys (`num_train`, `num_val`,
`num_test`) by subclassing one dataclass, [`SplitSizes`][train.data.SplitSizes].
For the synthetic tasks every example is a pure function of (config seed, split,
example index), computed with a counter-based hash, so splits are independent streams,
any example can be regenerated alone and a batch is generated in one vectorised pass.

**Batching:** `train_batch(task, seed, step, batch_size)` is a pure function of
`(seed, step)`: example `step * batch_size + i` of an endless stream in which each
epoch is a fresh permutation of the training split drawn from `(seed, epoch)`; so a
resumed run needs only the step. `eval_batches(task, split, batch_size)` walks a split
in order in batches of one shape, the last one padded, with a per-example `"weight"`
(0 for padding).
"""

import os

from ._base import (
    Batch as Batch,
    DataError as DataError,
    Kind as Kind,
    SplitSizes as SplitSizes,
    Task as Task,
)
from ._batching import (
    eval_batches as eval_batches,
    train_batch as train_batch,
    train_indices as train_indices,
)
from ._lm import BytesLMConfig as BytesLMConfig, LMConfig as LMConfig, LMTask as LMTask
from ._mnist1d import MNIST1DConfig as MNIST1DConfig, MNIST1DTask as MNIST1DTask
from ._state_tracking import (
    ModularAdditionConfig as ModularAdditionConfig,
    ParityConfig as ParityConfig,
    RunningSumTask as RunningSumTask,
)
from ._synthetic import (
    CopyingConfig as CopyingConfig,
    CopyingTask as CopyingTask,
    InductionHeadsConfig as InductionHeadsConfig,
    InductionHeadsTask as InductionHeadsTask,
    MQARConfig as MQARConfig,
    MQARTask as MQARTask,
    SelectiveCopyingConfig as SelectiveCopyingConfig,
    SelectiveCopyingTask as SelectiveCopyingTask,
    at_length as at_length,
    length_split as length_split,
)
from ._tokenizer import (
    BytesTokenizer as BytesTokenizer,
    HFTokenizer as HFTokenizer,
    decode as decode,
    encode as encode,
    load_tokenizer_file as load_tokenizer_file,
    train_bpe as train_bpe,
)

TaskConfig = (
    MNIST1DConfig
    | CopyingConfig
    | SelectiveCopyingConfig
    | MQARConfig
    | InductionHeadsConfig
    | ParityConfig
    | ModularAdditionConfig
    | LMConfig
)

TASKS: dict[str, type] = {
    "mnist1d": MNIST1DConfig,
    "copying": CopyingConfig,
    "selective_copying": SelectiveCopyingConfig,
    "mqar": MQARConfig,
    "induction_heads": InductionHeadsConfig,
    "parity": ParityConfig,
    "modular_addition": ModularAdditionConfig,
    "lm": LMConfig,
    "lm_bytes": BytesLMConfig,
}

_BUILDERS: dict[type, type[Task]] = {
    MNIST1DConfig: MNIST1DTask,
    CopyingConfig: CopyingTask,
    SelectiveCopyingConfig: SelectiveCopyingTask,
    MQARConfig: MQARTask,
    InductionHeadsConfig: InductionHeadsTask,
    ParityConfig: RunningSumTask,
    ModularAdditionConfig: RunningSumTask,
    LMConfig: LMTask,
    BytesLMConfig: LMTask,
}


def build_task(config: TaskConfig, *, run_dir: str | os.PathLike | None = None) -> Task:
    """Build the task a config describes.

    **Arguments:**

    - `config`: one of the config classes in `TASKS`.
    - `run_dir`: a run directory whose saved state the task reuses: the LM task's
      `tokenizer.json` (so resume, evaluation and generation use the run's tokenizer).
      Other tasks ignore it.

    **Returns:**

    A [`Task`][]. MNIST-1D arrays are cached in memory and LM corpora as token shards
    on disk, so building the same config again is cheap.

    **Raises:**

    `DataError` (a `ConfigError`) for a mistake in the data a config names: its message
    starts with the config key and names the file.

    !!! example

        ```python
        task = build_task(MQARConfig(seq_len=128, num_kv_pairs=8))
        batch = train_batch(task, seed=0, step=0, batch_size=64)
        batch["inputs"].shape  # (64, 128)
        ```
    """
    try:
        builder = _BUILDERS[type(config)]
    except KeyError:
        raise TypeError(
            f"build_task takes one of {[c.__name__ for c in _BUILDERS]}, got "
            f"{type(config).__name__}"
        ) from None
    if builder is LMTask:
        return LMTask(config, run_dir=run_dir)
    return builder(config)
