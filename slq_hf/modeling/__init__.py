"""Self-contained SLQ modeling code. Copied into every saved checkpoint, so it imports nothing else from slq_hf."""

from .configuration_slq import SLQConfig
from .modeling_slq import SLQModel, SLQModelOutput

__all__ = ["SLQConfig", "SLQModel", "SLQModelOutput"]
