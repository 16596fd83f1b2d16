"""Fine-tune the top layers of a frozen encoder from an HDF5 cache of the lower layers' hidden states."""
from .config import Config, make_config
from .errors import PipelineError

__all__ = ["Config", "make_config", "PipelineError"]
