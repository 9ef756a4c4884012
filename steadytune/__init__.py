"""steadytune: QLoRA fine-tuning of chat LLMs on MLX that finishes.

Importing steadytune loads a fast BLAS on Linux CPUs before MLX binds the slow reference one (see
backend.py) and sets MLX's CUDA graph cache size unless the environment sets it; nothing
else happens at import. The public API mirrors the CLI:

    import steadytune
    result = steadytune.train({"data": {"path": "train.jsonl"}, "training": {"epochs": 1}})
    print(result.run_dir, result.final_val_loss)
"""

from .backend import device_from_env as _device_from_env, tune_mlx_env as _tune_mlx_env, use_fast_blas as _use_fast_blas

_use_fast_blas()
_tune_mlx_env()
_device_from_env()  # only with STEADYTUNE_DEVICE set

from .config import Config, resolve  # noqa: E402
from .errors import UserError  # noqa: E402

__version__ = "0.1.0"


def train(config=None, **overrides):
    """Fine-tune; see steadytune.trainer.run. Accepts a Config, a nested dict, or a YAML path."""
    from .trainer import run

    return run(config, **overrides)


__all__ = ["Config", "resolve", "train", "UserError", "__version__"]
