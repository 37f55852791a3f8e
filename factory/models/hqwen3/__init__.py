"""HQwen3 hybrid model, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from factory.models.hqwen3.configuration_hqwen3 import HQwen3Config
from factory.models.hqwen3.modeling_hqwen3 import HQwen3ForCausalLM, HQwen3Model

AutoConfig.register("hqwen3", HQwen3Config, exist_ok=True)
AutoModel.register(HQwen3Config, HQwen3Model, exist_ok=True)
AutoModelForCausalLM.register(HQwen3Config, HQwen3ForCausalLM, exist_ok=True)
# save_pretrained then writes auto_map and copies the modeling files (trust_remote_code loading).
HQwen3Config.register_for_auto_class()
HQwen3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["HQwen3Config", "HQwen3Model", "HQwen3ForCausalLM"]
