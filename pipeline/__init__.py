"""Fine-tune the top layers of a frozen encoder from an HDF5 cache of the lower layers' hidden states.

The Python API (pipeline/api.py): `from pipeline import Config, make_config, precompute, train, evaluate, search,
predict`. The submodules keep their names for imports (`from pipeline.train import train`), but as attributes of the
package these names are the API's functions."""
from .config import Config, make_config
from .errors import PipelineError
from .api import Evaluation, Precomputed, Predictions, SearchResult, Trained, evaluate, precompute, predict, search, \
    train

__all__ = ["Config", "make_config", "PipelineError", "precompute", "train", "evaluate", "search", "predict",
           "Precomputed", "Trained", "Evaluation", "SearchResult", "Predictions"]
