"""slq_hf: Shared Latent Queries (SLQ) embedding models on frozen Hugging Face vision-language backbones."""

from transformers import AutoConfig, AutoModel

from .modeling import SLQConfig, SLQModel, SLQModelOutput
from .modeling.version import SLQ_HF_VERSION

# One source of truth: the modeling package (copied into checkpoints) stamps the same version into config.json.
__version__ = SLQ_HF_VERSION

# Registering makes AutoConfig/AutoModel.from_pretrained(slq_dir) work without trust_remote_code once slq_hf is
# imported; exist_ok because remote-code loading may already have registered the same names.
AutoConfig.register("slq", SLQConfig, exist_ok=True)
AutoModel.register(SLQConfig, SLQModel, exist_ok=True)

__all__ = ["SLQConfig", "SLQModel", "SLQModelOutput", "__version__"]
