"""The released Fun-Audio-Chat-8B: its configuration, its checkpoint layout, its processor, and the GPU check.

- :mod:`.config`: the released ``config.json`` as data, the parameter count, the model built on ``meta``;
- :mod:`.checkpoint`: ``load_released`` / ``save_released`` for a folder in the released (Hugging Face) layout;
- :mod:`.processing`: ``FunAudioChatProcessor``, the released input pipeline and chat template;
- :mod:`.gpu_check`: ``python -m fac_mini.released.gpu_check``, the checks to run when a GPU is at hand;
- :mod:`.load_benchmark`: ``python -m fac_mini bench load``, peak memory and time of loading a >= 1 GB checkpoint.

The names below are the package's API (``from fac_mini.released import load_released``).
"""
from .checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_FILE_NAME, load_released, parse_size, save_released
from .config import RELEASED_UNCONFIRMED, build_on_meta, count_parameters, released_config, tied_parameter_groups

__all__ = ["CONFIG_NAME", "SINGLE_FILE_NAME", "INDEX_NAME", "RELEASED_UNCONFIRMED", "released_config",
           "count_parameters", "build_on_meta", "tied_parameter_groups", "load_released", "save_released",
           "parse_size"]
