"""A tiny transformers Mllama config, the size of tests.helpers.cross_attention's model."""

from __future__ import annotations

from transformers import MllamaConfig

from tests.helpers.cross_attention import IMAGE_TOKEN, VOCAB


def tiny_hf_config() -> MllamaConfig:
    return MllamaConfig(
        vision_config={
            "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_global_layers": 1,
            "attention_heads": 4, "intermediate_size": 64, "vision_output_dim": 96,
            "intermediate_layers_indices": [0, 1], "max_num_tiles": 4,
        },
        text_config={
            "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 5, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "cross_attention_layers": [1, 3],
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        },
        image_token_index=IMAGE_TOKEN,
    )
