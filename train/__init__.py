"""Config-driven training: YAML configs, data, the loop, orbax checkpoints, trackers.

Entry points: `ssm-train`, `ssm-eval`, `ssm-generate` (see `train.cli`), also
`python -m train`. From Python:

```python
import train
config = train.config.load("configs/mnist1d.yaml", ["train.steps=200"])
summary = train.run(config, "runs/try")
```
"""

from . import config as config, data as data, hooks as hooks
from .allocator import configure_allocator as configure_allocator
from .checkpoint import (
    Checkpointer as Checkpointer,
    CheckpointError as CheckpointError,
)
from .config import Config as Config, ConfigError as ConfigError
from .data import (
    TASKS as TASKS,
    Task as Task,
    build_task as build_task,
    eval_batches as eval_batches,
    train_batch as train_batch,
)
from .finetune import load_matching as load_matching
from .hooks import StepInfo as StepInfo
from .loop import (
    Interrupted as Interrupted,
    Trainer as Trainer,
    TrainingError as TrainingError,
    run as run,
)
from .trainer import (
    TrainState as TrainState,
    build_model as build_model,
    make_optimizer as make_optimizer,
)
