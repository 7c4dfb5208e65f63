"""`model.pretrained`: a recipe's model starts from local transformers folders, checked against them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mmscale.config.model import PretrainedConfig
from mmscale.errors import UserError
from mmscale.models import build_vlm
from mmscale.models.hf import llava
from mmscale.models.hf.llama import config_from_hf as llm_config_from_hf
from mmscale.models.pretrained import load_pretrained
from tests.helpers.cross_attention import TINY as CROSS_TINY
from tests.helpers.llava import IMAGE_ID, SAMPLES, TEXT, VISION, VOCAB, hf_config


def _with(cfg, **pretrained):
    return cfg.model_copy(update={"pretrained": PretrainedConfig(**pretrained)})


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(hf_config("clip")).eval()
    folder = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(folder)
    return hf, folder


def test_a_llava_folder_gives_transformers_logits(llava_folder):
    hf, folder = llava_folder
    cfg = _with(llava.config_from_hf(json.loads((folder / "config.json").read_text())), vlm=str(folder))
    torch.manual_seed(1)
    model = build_vlm(cfg, VOCAB, IMAGE_ID).eval()
    load_pretrained(model, cfg)
    ids, pixels = SAMPLES[1]
    with torch.no_grad():
        ours = model.logits(ids[None], pixels)
        theirs = hf(input_ids=ids[None], pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_a_bf16_folder_loads_into_an_fp32_model_exactly(llava_folder, tmp_path):
    """Releases are mostly bf16 (a bf16 run's own export among them): the model stays fp32 throughout,
    holding the bf16 values exactly, and its first forward sees one dtype."""
    hf, _ = llava_folder
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cfg = _with(llava.config_from_hf(json.loads((tmp_path / "bf16" / "config.json").read_text())), vlm=str(tmp_path / "bf16"))
    model = build_vlm(cfg, VOCAB, IMAGE_ID).eval()
    load_pretrained(model, cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    weight = model.language_model.layers[0].mlp.up_proj.weight
    expected = hf.model.language_model.layers[0].mlp.up_proj.weight.to(torch.bfloat16).float()
    assert torch.equal(weight, expected) and not torch.equal(weight, hf.model.language_model.layers[0].mlp.up_proj.weight)
    ids, pixels = SAMPLES[1]
    with torch.no_grad():
        assert torch.isfinite(model.logits(ids[None], pixels)).all()


def test_a_recipe_that_differs_from_the_folder_is_refused_naming_the_key(llava_folder):
    _, folder = llava_folder
    cfg = llava.config_from_hf(json.loads((folder / "config.json").read_text()))
    wrong = _with(cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"intermediate_size": 96})}), vlm=str(folder))
    with pytest.raises(UserError, match=r"model.llm.intermediate_size=96 but the folder has 128"):
        load_pretrained(build_vlm(wrong, VOCAB, IMAGE_ID), wrong)


def test_a_vision_tower_and_an_llm_from_separate_folders(llava_folder, tmp_path):
    """LLaVA stage 1: a CLIPModel folder (text half ignored) and a LlamaForCausalLM folder."""
    _, folder = llava_folder
    torch.manual_seed(2)
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config={"hidden_size": 16, "intermediate_size": 32,
                                                                   "num_hidden_layers": 1, "num_attention_heads": 2}))
    clip.save_pretrained(tmp_path / "clip")
    llama = LlamaForCausalLM(LlamaConfig(**TEXT, tie_word_embeddings=False)).eval()
    llama.save_pretrained(tmp_path / "llama")
    cfg = llava.config_from_hf(json.loads((folder / "config.json").read_text()))
    cfg = _with(cfg, vision=str(tmp_path / "clip"), llm=str(tmp_path / "llama"))
    model = build_vlm(cfg, VOCAB, IMAGE_ID).eval()
    load_pretrained(model, cfg)
    ours, theirs = model.vision_tower.state_dict(), clip.vision_model.state_dict()
    assert ours and all(torch.equal(t, theirs[k]) for k, t in ours.items())
    ids = SAMPLES[0][0][None].clamp(min=IMAGE_ID + 1)  # text only
    with torch.no_grad():
        embeds = model.language_model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        diff = (model.language_model(embeds, positions) - llama(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_qwen_llm_folder_starts_a_decoder_vlm(llava_folder, tmp_path, family):
    """A Qwen2 or Qwen3 ForCausalLM folder as model.pretrained.llm: the VLM's LLM gives its logits;
    a recipe whose model.llm is a Llama is refused, naming the keys that differ."""
    _, folder = llava_folder
    config_class, model_class, extra = {"qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
                                        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32})}[family]
    torch.manual_seed(3)
    qwen = model_class(config_class(**TEXT, **extra, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, p in qwen.named_parameters():  # transformers starts biases at 0 and norms at 1
            if name.endswith("bias") or "_norm" in name:
                p.normal_(1 if "_norm" in name else 0, 0.5)
    qwen.save_pretrained(tmp_path / family)
    llama_recipe = _with(llava.config_from_hf(json.loads((folder / "config.json").read_text())),
                         llm=str(tmp_path / family))
    differs = "qkv_bias=False but the folder has True" if family == "qwen2" else "qk_norm=False but the folder has True"
    with pytest.raises(UserError, match=f"model.llm.{differs}"):
        load_pretrained(build_vlm(llama_recipe, VOCAB, IMAGE_ID), llama_recipe)
    cfg = llama_recipe.model_copy(update={"llm": llm_config_from_hf(qwen.config.to_dict())})
    model = build_vlm(cfg, VOCAB, IMAGE_ID).eval()
    load_pretrained(model, cfg)
    ids = SAMPLES[0][0][None].clamp(min=IMAGE_ID + 1)  # text only
    with torch.no_grad():
        embeds = model.language_model.embed_tokens(ids)
        got = model.language_model(embeds, torch.arange(ids.shape[1])[None])
        diff = (got - qwen(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_a_llama_folder_starts_a_cross_attention_model_that_equals_it(tmp_path):
    """Llama 3.2 Vision from a text LLM: fresh cross-attention layers with closed gates leave
    the imported LLM's logits unchanged, whatever the images."""
    llm = CROSS_TINY.llm
    hf_cfg = LlamaConfig(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                         num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
                         num_key_value_heads=llm.num_kv_heads, vocab_size=VOCAB, rope_theta=llm.rope_theta,
                         rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=False)
    torch.manual_seed(3)
    LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    cfg = _with(CROSS_TINY.model_copy(update={"llm": llm_config_from_hf(llama.config.to_dict())}),
                llm=str(tmp_path / "llama"))
    model = build_vlm(cfg, VOCAB, IMAGE_ID).eval()
    load_pretrained(model, cfg)
    ids = torch.randint(10, VOCAB, (1, 20))
    with torch.no_grad():
        diff = (model.logits(ids) - llama(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_missing_folder_is_a_user_error(tmp_path):
    cfg = _with(CROSS_TINY, vlm=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="nowhere is not a Hugging Face model folder"):
        load_pretrained(build_vlm(cfg, VOCAB, IMAGE_ID), cfg)


def test_an_llm_with_a_smaller_vocabulary_fills_the_first_rows(llava_folder, tmp_path):
    """LLaVA-1.5 over Vicuna: 32000 released rows in a 32064-row VLM vocabulary."""
    _, folder = llava_folder
    torch.manual_seed(4)
    llama = LlamaForCausalLM(LlamaConfig(**{**TEXT, "vocab_size": VOCAB - 8}, tie_word_embeddings=False)).eval()
    llama.save_pretrained(tmp_path / "llama")
    cfg = _with(llava.config_from_hf(json.loads((folder / "config.json").read_text())), llm=str(tmp_path / "llama"))
    model = build_vlm(cfg, VOCAB, IMAGE_ID).eval()
    fresh = model.language_model.embed_tokens.weight[VOCAB - 8 :].detach().clone()
    load_pretrained(model, cfg)
    assert torch.equal(model.language_model.embed_tokens.weight[VOCAB - 8 :], fresh)
    ids = torch.randint(IMAGE_ID + 1, VOCAB - 8, (1, 12))
    with torch.no_grad():
        ours = model.language_model(model.language_model.embed_tokens(ids), torch.arange(12)[None])
        assert (ours[..., : VOCAB - 8] - llama(input_ids=ids).logits).abs().max().item() <= 1e-5
    bigger = _with(cfg, llm=str(tmp_path / "llama")).model_copy()
    small_model = build_vlm(bigger, VOCAB - 16, IMAGE_ID)
    with pytest.raises(UserError, match="model.llm.vocab_size must be at least"):
        load_pretrained(small_model, bigger)
