"""ds_interlock: interlocking backpropagation inside DeepSpeed's pipeline engine."""
from .config import InterlockingConfig, InterlockingConfigError
from .module import InterlockingPipelineModule
from .routing import Routing
from .initialize import initialize

__all__ = ["InterlockingPipelineModule", "initialize", "InterlockingConfig", "InterlockingConfigError",
           "Routing"]
__version__ = "0.1.0"
