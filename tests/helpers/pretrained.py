"""Random `model.pretrained` folders, as transformers saves them, for the tiny recipes' models."""

from __future__ import annotations

from pathlib import Path


def write_pretrained_folders(cfg, vocab_size: int, out: Path) -> dict[str, Path]:
    """Random `model.pretrained` folders for model config `cfg`, as transformers saves them: a
    SigLIP or CLIP tower (`vision`, for a decoder VLM) and a Llama LLM whose vocabulary is 8 rows
    short of the VLM's (`llm`: the VLM adds tokens, as LLaVA and Mllama do)."""
    import torch
    import transformers

    from mmscale.models.hf import llama, llava

    torch.manual_seed(0)
    folders = {"llm": out / "llm"}
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**llama.config_to_hf(cfg.llm, vocab_size - 8))).save_pretrained(folders["llm"])
    if cfg.arch == "decoder":
        vision = llava.vision_config_to_hf(cfg.vision)
        folders["vision"] = out / "vision"
        transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**vision)).save_pretrained(folders["vision"])
    return folders
