from pathlib import Path

import pytest
import yaml

from mmscale.config import RecipeError, dump_recipe, load_recipe
from tests.helpers.recipes import REPO

DEMO = REPO / "recipes" / "demo.yaml"


def test_demo_recipe_validates_and_round_trips(tmp_path):
    recipe = load_recipe(DEMO)
    assert recipe.model.vision.num_patches == 16  # 4 x 4 patches of 32 px at 128 px
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_recipe(recipe))
    assert load_recipe(resolved) == recipe


def test_overrides_are_typed_and_nested():
    recipe = load_recipe(DEMO, ["train.steps=50", "train.lr=3e-4", "data.val=null", "model.llm.tie_embeddings=false"])
    assert recipe.train.steps == 50
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.data.val is None
    assert recipe.model.llm.tie_embeddings is False


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_typo_in_recipe_names_the_key_and_suggests_the_fix(tmp_path):
    tree = yaml.safe_load(DEMO.read_text())
    tree["model"]["llm"]["hiden_size"] = tree["model"]["llm"].pop("hidden_size")
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, tree))
    assert "unknown key 'model.llm.hiden_size'" in str(err.value)
    assert "did you mean 'hidden_size'" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=5", "unknown key 'train.stepz'"),
        ("trian.steps=5", "unknown key 'trian'"),
        ("train.steps=many", "'train.steps'"),
        ("train.zero_stage=4", "'train.zero_stage'"),
        ("model.llm.num_kv_heads=3", "not a multiple of num_kv_heads"),
        ("model.vision.patch_size=15", "not a multiple of patch_size"),
        ("data.max_seq_len=16", "data.max_seq_len=16 leaves no room"),
        ("train.warmup_steps=1500", "train.warmup_steps=1500 must be below"),
        ("train.steps", "not of the form key.sub=value"),
        ("model.llm.head_dim=15", "the head dimension 15 must be even for RoPE"),
        ("model.arch=cross_attention model.llm.tie_embeddings=false model.llm.qkv_bias=true",
         "qkv_bias, qk_norm, head_dim, norm_after and additional_vocab_size (Qwen, OLMo and Molmo2 LLMs) are for"),
        ("model.llm.additional_vocab_size=8", "additional_vocab_size=8 needs tie_embeddings=false"),
        ("model.connector.type=molmo2 model.vision.post_norm=false model.attention=flash2",
         "model.attention=flash2 cannot serve connector.type=molmo2"),
        ("model.connector.type=molmo2 model.vision.post_norm=false model.crops.overlap_margins=[8,8]",
         "leave no patch"),
        ("model.connector.type=molmo2 model.vision.post_norm=false model.crops.overlap_margins=[1,1]",
         "connector.type=molmo2 is transformers' Molmo2, which needs model.vision.activation=gelu_tanh, "
         "model.connector.bias=false (the projector has none), model.llm.qk_norm=true"),
        ("model.llm.norm_after=true", "model.llm.norm_after, qk_norm_over=projection, additional_vocab_size and"),
        ("model.llm.qkv_bias=true model.llm.qk_norm=true", "qkv_bias with qk_norm are Molmo2's"),
    ],
)
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(DEMO, override.split(" "))
    assert message in str(err.value)


def test_missing_required_section_and_file(tmp_path):
    with pytest.raises(RecipeError, match="missing required key 'data'"):
        load_recipe(_write(tmp_path, {"train": {"steps": 3}}))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "recipe, override, message",
    [
        ("demo.yaml", "model.tiled_vision.max_num_tiles=2", "'model.tiled_vision' needs model.arch=cross_attention"),
        ("demo_cross_attention.yaml", "model.vision.image_size=64", "'model.vision' needs model.arch=decoder"),
        ("demo_cross_attention.yaml", "model.crops.max_crops=2", "'model.crops' needs model.arch=decoder"),
    ],
)
def test_a_section_of_the_other_arch_is_an_error_naming_it_and_its_arch(recipe, override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(REPO / "recipes" / recipe, [override])
    assert message in str(err.value)


def test_an_arch_override_replaces_the_recipe_files_arch_sections():
    recipe = load_recipe(DEMO, ["model.arch=cross_attention", "model.llm.tie_embeddings=false"])
    assert recipe.model.arch == "cross_attention" and not hasattr(recipe.model, "vision")
    assert recipe.model.llm == load_recipe(DEMO, ["model.llm.tie_embeddings=false"]).model.llm


def test_an_unknown_arch_is_explained():
    with pytest.raises(RecipeError, match="'model.arch': should be one of 'decoder', 'cross_attention' \\(got 'x'\\)"):
        load_recipe(DEMO, ["model.arch=x"])


def test_a_typo_inside_a_cross_attention_section_lists_that_sections_keys():
    with pytest.raises(RecipeError) as err:
        load_recipe(REPO / "recipes" / "demo_cross_attention.yaml", ["model.cross_attention.layerz=[1]"])
    assert "unknown key 'model.cross_attention.layerz': did you mean 'layers'?" in str(err.value)


def test_the_default_tower_is_a_released_one_and_a_preset_fills_what_is_unset():
    from mmscale.config.towers import VISION_PRESETS, VisionConfig

    default = VisionConfig()
    assert default.preset == "siglip-base-patch16-224"
    assert default.model_dump(include=set(VISION_PRESETS[default.preset])) == VISION_PRESETS[default.preset]
    clip = VisionConfig(preset="clip-vit-large-patch14-336", image_size=224)
    assert (clip.family, clip.image_size, clip.hidden_size, clip.activation) == ("clip", 224, 1024, "quick_gelu")


def test_a_tower_without_preset_must_state_its_fields(tmp_path):
    tree = yaml.safe_load(DEMO.read_text())
    assert tree["model"]["vision"]["preset"] is None
    del tree["model"]["vision"]["layer_norm_eps"]
    with pytest.raises(RecipeError, match="missing required key 'model.vision.layer_norm_eps'"):
        load_recipe(_write(tmp_path, tree))


# ---- recipes an earlier mmscale wrote -----------------------------------------------------
# tests/config/earlier/: recipes/*.yaml as the mmscale before one model class per arch dumped them
# (into every run's recipe.yaml): both archs' sections, every tower field, a fraction as alignment.layer.


@pytest.mark.parametrize("name", ["demo_viral", "demo_cross_attention"])
def test_a_recipe_an_earlier_version_dumped_reads_as_the_same_recipe(name):
    earlier = load_recipe(Path(__file__).parent / "earlier" / f"{name}.yaml", dumped=True)
    assert earlier.model_dump() == load_recipe(REPO / "recipes" / f"{name}.yaml").model_dump()
    # As a user's recipe it is refused: a float block number, the other arch's sections.
    with pytest.raises(RecipeError, match="is a block number|needs model.arch"):
        load_recipe(Path(__file__).parent / "earlier" / f"{name}.yaml")
