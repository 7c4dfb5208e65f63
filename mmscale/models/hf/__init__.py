"""mmscale's models in Hugging Face transformers' terms: one adapter per model family, in one table.

And the reading of local transformers folders. Training (`model.pretrained`), `mmscale convert` and
`mmscale eval` all go through the table here.

    adapter.py   what an adapter offers: config and state dict both ways, problems, classes
    llava.py     DecoderVLM <-> LlavaForConditionalGeneration (CLIP/SigLIP tower + Llama/Qwen LLM);
                 the CLIP/SigLIP tower's config (model.pretrained.vision folders)
    mllama.py    CrossAttentionVLM <-> MllamaForConditionalGeneration
    molmo2.py    Molmo2VLM <-> Molmo2ForConditionalGeneration
    llama.py     LlamaLM <-> Llama/Qwen2/Qwen3ForCausalLM (model.pretrained.llm folders, the VLMs' LLMs)
    folder.py    config.json and safetensors of a local folder, fingerprints, weight-fit messages
"""

from __future__ import annotations

from pathlib import Path

from mmscale.config.model import ModelConfig
from mmscale.errors import UserError
from mmscale.models.hf.adapter import Adapter
from mmscale.models.hf.llava import LLAVA
from mmscale.models.hf.mllama import MLLAMA
from mmscale.models.hf.molmo2 import MOLMO2

ADAPTERS: dict[str, Adapter] = {adapter.model_type: adapter for adapter in (LLAVA, MLLAMA, MOLMO2)}


def adapter_for(cfg: ModelConfig) -> Adapter:
    """The family a recipe's model is (and releases as): Molmo2 for connector.type=molmo2, else
    LLaVA or Mllama by model.arch."""
    if cfg.is_molmo2:
        return MOLMO2
    return LLAVA if cfg.arch == "decoder" else MLLAMA


def adapter_for_hf(hf_config: dict, folder: str | Path) -> Adapter:
    """The adapter of a transformers folder's config.json, by its model_type; UserError naming
    the families mmscale reads if it is none of them."""
    kind = hf_config.get("model_type")
    if kind not in ADAPTERS:
        known = ", ".join(f"{adapter.name} ({adapter.model_type!r})" for adapter in ADAPTERS.values())
        raise UserError(f"{folder} holds a model_type={kind!r} model; mmscale reads {known} folders")
    return ADAPTERS[kind]
