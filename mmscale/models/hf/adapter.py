"""What every model family's adapter to transformers offers (as torchtitan's per-model
`StateDictAdapter`): config and state dict both ways, what of an mmscale config the family
cannot express, and the transformers classes that hold it.

The state dicts on the transformers side use the names of the transformers model's own
`state_dict()` (transformers 5's in-memory layout); importing also reads the layouts released
checkpoints were saved in. Each family module (llava.py, mllama.py, molmo2.py) defines one
adapter; the table of them, and their lookup, is `mmscale.models.hf`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from mmscale.config.model import ModelConfig
from mmscale.data.multicrop import ImageTokenIds


class Adapter(ABC):
    """Between one family of mmscale models and the transformers model of that family."""

    name: str  # for messages, e.g. "LLaVA"
    model_type: str  # config.json's model_type
    model_class_name: str  # transformers' class, e.g. "LlavaForConditionalGeneration"
    config_class_name: str

    @property
    def model_class(self) -> type[PreTrainedModel]:
        # By name, through transformers' lazy module: a model class's module is imported where it
        # is used (conversion, evaluation), not by every import of the adapters (training).
        return getattr(transformers, self.model_class_name)

    @property
    def config_class(self) -> type[PretrainedConfig]:
        return getattr(transformers, self.config_class_name)

    @abstractmethod
    def config_from_hf(self, hf_config: dict, folder: Path | None = None) -> ModelConfig:
        """Our ModelConfig for a config.json of this family; `folder`, where the config came
        from, for the settings a family keeps beside it (Molmo2's processor configs). UserError
        for a setting mmscale does not support."""

    @abstractmethod
    def config_to_hf(
        self, cfg: ModelConfig, vocab_size: int, image_token_id: int | ImageTokenIds, token_ids: dict | None = None
    ) -> dict:
        """The config.json of our model; the inverse of `config_from_hf`. `token_ids`: the
        tokenizer's bos/eos/pad_token_id. UserError naming the `problems` of `cfg`, if it has any."""

    @abstractmethod
    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Our model's tensors, by our names, for a transformers state dict of `cfg`'s model."""

    @abstractmethod
    def state_dict_to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """transformers' names (in-memory layout) for our state dict; the inverse of `state_dict_from_hf`."""

    @abstractmethod
    def problems(self, cfg: ModelConfig) -> list[str]:
        """What of `cfg` this family cannot express, one phrase each; empty if it can be written."""
