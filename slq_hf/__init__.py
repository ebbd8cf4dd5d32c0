"""slq_hf: Shared Latent Queries (SLQ) embedding models on frozen Hugging Face vision-language backbones."""

from transformers import AutoConfig, AutoModel

from .modeling import SLQConfig, SLQModel, SLQModelOutput

__version__ = "0.1.0"

# Registering makes AutoConfig/AutoModel.from_pretrained(slq_dir) work without trust_remote_code once slq_hf is
# imported; exist_ok because remote-code loading may already have registered the same names.
AutoConfig.register("slq", SLQConfig, exist_ok=True)
AutoModel.register(SLQConfig, SLQModel, exist_ok=True)

__all__ = ["SLQConfig", "SLQModel", "SLQModelOutput", "__version__"]
