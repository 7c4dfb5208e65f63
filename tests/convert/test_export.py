"""`mmscale convert`: 2-rank ZeRO-2/3 checkpoints of both architectures become transformers
folders that compute what the mmscale model computes; broken checkpoints convert to nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, MllamaForConditionalGeneration

from mmscale.cli import main
from mmscale.config import load_recipe
from mmscale.config.model import PretrainedConfig
from mmscale.convert.export import export_hf, from_run, verify_folder
from mmscale.convert.verify import probe_inputs
from mmscale.data.multicrop import ours_only
from mmscale.data.tokenizer import load_tokenizer, recipe_tokenizer
from mmscale.errors import UserError
from mmscale.models import build_model, vocab_size_for
from mmscale.models.hf import adapter_for, molmo2
from mmscale.models.hf.folder import read_state_dict
from mmscale.models.pretrained import load_pretrained
from mmscale.training.distributed import free_port
from mmscale.training.freeze import freeze
from tests.helpers.pretrained import write_pretrained_folders
from tests.helpers.processes import run_command, subprocess_env
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, MOLMO2_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with

FP32_MAX_ABS, FP32_MAX_KL = 1e-5, 1e-10
RECIPES = {"decoder": "demo.yaml", "cross_attention": "demo_cross_attention.yaml", "molmo2": "demo_molmo2.yaml"}
EXTRA = {"decoder": [], "cross_attention": CROSS_ATTENTION_OVERRIDES, "molmo2": MOLMO2_OVERRIDES}
# Parts frozen in each (the tower; the LLM), so consolidation covers DeepSpeed's frozen-parameter path too.
TRAINABLE = {"decoder": "finetune", "cross_attention": "adapter", "molmo2": "finetune"}
ARCHS = ["decoder", "cross_attention", "molmo2"]


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """trained(arch, stage): the run directory of a 4-step 2-rank run, checkpoints at steps 2 and 4."""
    runs: dict[tuple[str, int], Path] = {}

    def get(arch: str, stage: int) -> Path:
        if (arch, stage) not in runs:
            run_dir = tmp_path_factory.mktemp(f"{arch}-zero{stage}") / "run"
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
            overrides = [
                *tiny_with(TINY_OVERRIDES, EXTRA[arch]),
                f"data.train={demo_data / 'train'}", f"data.val={demo_data / 'val'}",
                f"data.tokenizer={demo_data / 'tokenizer'}", f"run.dir={run_dir}", f"train.zero_stage={stage}",
                "train.steps=4", "train.checkpoint_every=2", "train.val_every=4", "data.num_workers=0",
                f"train.trainable={TRAINABLE[arch]}",
            ]
            proc = run_command([*torchrun, "-m", "mmscale", "train", str(REPO / "recipes" / RECIPES[arch]), *overrides])
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[arch, stage] = run_dir
        return runs[arch, stage]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_checkpoint_exports_to_a_transformers_folder_with_equal_logits(trained, arch, stage, tmp_path):
    run_dir = trained(arch, stage)
    source = from_run(run_dir)
    assert source.facts["steps"] == "4"
    result = export_hf(source, tmp_path / "hf")
    print(f"{arch} ZeRO-{stage}: max abs {result.max_abs_diff:.2e}, KL {result.mean_kl:.2e}, {result.tokens_ours}")
    assert result.max_abs_diff <= FP32_MAX_ABS and result.mean_kl <= FP32_MAX_KL
    assert result.feature_diff <= FP32_MAX_ABS
    assert len(result.tokens_ours) == 10 and result.tokens_ours == result.tokens_theirs

    model_class = adapter_for(source.cfg).model_class
    hf = model_class.from_pretrained(tmp_path / "hf")
    # The files hold the names transformers itself writes for this model.
    model_class(hf.config).save_pretrained(tmp_path / "fresh")
    assert read_state_dict(tmp_path / "hf").keys() == read_state_dict(tmp_path / "fresh").keys()

    # The frozen parts hold their initial weights (DeepSpeed's frozen-parameter path), the
    # trained ones have moved (their fp32 master weights were gathered from both ranks).
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = source.tokenizer
    torch.manual_seed(recipe.run.seed)  # the trainer builds the model right after seeding
    initial = build_model(source.cfg, tokenizer)
    freeze(initial, recipe.trainable_parts)
    trained_state = source.model.state_dict()
    frozen = [k for k, p in initial.named_parameters() if not p.requires_grad]
    moved = [k for k, p in initial.named_parameters() if p.requires_grad]
    assert frozen and all(torch.equal(initial.state_dict()[k], trained_state[k]) for k in frozen)
    assert any(not torch.equal(initial.state_dict()[k], trained_state[k]) for k in moved)

    if arch == "molmo2":  # its processor needs torchvision: its files say what mmscale's crops are
        image_processor, processor = molmo2.processor_configs(tmp_path / "hf")
        assert molmo2.crops_from_hf(image_processor, processor) == source.cfg.crops
        assert image_processor["size"] == {"height": 24, "width": 24} and processor["processor_class"] == "Molmo2Processor"
        assert (tmp_path / "hf" / "chat_template.jinja").read_text() == tokenizer.chat_template
        return
    # AutoProcessor reads the released folder, with the run's chat template and image token.
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.chat_template == tokenizer.chat_template
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == source.image_token_id


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_zero2_and_zero3_runs_export_the_same_weights(trained, arch, tmp_path):
    """The same run under both stages: ZeRO-3's partitioned parameters are gathered whole and in order."""
    states = [from_run(trained(arch, stage)).model.state_dict() for stage in (2, 3)]
    assert states[0].keys() == states[1].keys()
    # The stages sum gradients in different orders (bucketed all-reduce, reduce-scatter): after 4
    # Adam steps the Molmo2 run's first q_proj differed by 6.3e-6 (weights up to 0.075). A gather
    # out of order or of the wrong shard is off by the weights' own size.
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_an_export_loads_back_through_model_pretrained_with_the_recipe_that_made_it(trained, arch, tmp_path):
    """The stage-1 -> stage-2 path: the export of a run is `model.pretrained.vlm` of a recipe equal
    to the run's (its defaults, e.g. a tower's intermediate_size: null, compared resolved), and the
    model starts from exactly the run's weights."""
    source = from_run(trained(arch, 2))
    export_hf(source, tmp_path / "hf")
    recipe = load_recipe(trained(arch, 2) / "recipe.yaml")
    cfg = recipe.model.model_copy(update={"pretrained": PretrainedConfig(vlm=str(tmp_path / "hf"))})
    model = build_model(cfg, source.tokenizer)
    load_pretrained(model, cfg)
    theirs = source.model.state_dict()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in model.state_dict().items()), arch
    if arch == "molmo2":  # the adapter was trained on its tower layers in their order
        layers = tuple(reversed(cfg.vision.feature_layers))
        swapped = cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"feature_layers": layers})})
        with pytest.raises(UserError, match="model.vision.feature_layers is"):
            load_pretrained(build_model(swapped, source.tokenizer), swapped)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_export_loads_and_matches_within_bf16_tolerance(trained, arch, tmp_path):
    source = from_run(trained(arch, 2))
    result = export_hf(source, tmp_path / "hf", dtype="bf16")
    # Against the mmscale model with its weights rounded to bf16: the conversion itself is exact.
    assert result.problems(FP32_MAX_ABS, FP32_MAX_KL) == []
    with safe_open(next((tmp_path / "hf").glob("*.safetensors")), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # Run in bf16, it stays within bf16's precision of the fp32 mmscale model.
    hf = adapter_for(source.cfg).model_class.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    inputs = probe_inputs(source.cfg, source.vocab_size, source.image_token_id, set())
    their_inputs = molmo2.inputs_to_hf(inputs, source.cfg, source.image_token_id) if arch == "molmo2" else inputs
    with torch.no_grad():
        ours = source.model.logits(**ours_only(inputs)).double()
        theirs = hf(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in their_inputs.items()}).logits.double()
    kl = (ours.softmax(-1) * (ours.log_softmax(-1) - theirs.log_softmax(-1))).sum(-1).mean().item()
    scale, diff = ours.abs().max().item(), (ours - theirs).abs().max().item()
    print(f"{arch} bf16 in bf16: max abs {diff:.3g} of logits up to {scale:.3g}, KL {kl:.2e}")
    assert diff <= 0.05 * scale and kl <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_export_that_releases_its_source_verifies_the_same(trained, dtype, tmp_path):
    """mmscale convert's way (release_source): the mmscale model is rounded or cast in place, run on
    the probe and let go before the folder loads; the verification and the files are those of the
    export that keeps it."""
    kept = export_hf(from_run(trained("decoder", 2)), tmp_path / "kept", dtype=dtype)
    source = from_run(trained("decoder", 2))
    released = export_hf(source, tmp_path / "released", dtype=dtype, release_source=True)
    assert released == kept and released.problems(FP32_MAX_ABS, FP32_MAX_KL) == []
    assert all(p.is_meta for p in source.model.parameters())  # let go
    with pytest.raises(ValueError, match="used up by an export with release_source=True"):
        export_hf(source, tmp_path / "again")
    assert read_state_dict(tmp_path / "released").keys() == read_state_dict(tmp_path / "kept").keys()
    assert all(torch.equal(t, read_state_dict(tmp_path / "kept")[k])
               for k, t in read_state_dict(tmp_path / "released").items())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
@pytest.mark.parametrize("part, weight, shows_in", [
    ("vision_tower", "patch_embedding", "image feature difference"),
    ("language_model", "layers.0.self_attn.q_proj", "max abs logit difference"),
])
def test_verification_catches_a_weight_the_export_got_wrong(trained, arch, part, weight, shows_in, tmp_path):
    """Negative controls: the export is right, then one weight of the mmscale side moves by ~1e-3
    (as a wrong mapping of that weight would); verification must notice. A vision weight must
    show even through cross-attention gates that 4 steps have barely opened (where the logits
    alone hardly move), and an attention projection of the LLM (a RoPE permutation gone wrong
    would look like this) in the logits."""
    source = from_run(trained(arch, 2))
    export_hf(source, tmp_path / "hf")
    with torch.no_grad():
        param = next(p for name, p in getattr(source.model, part).named_parameters() if weight in name)
        param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 1e-3)
    problems = verify_folder(source, tmp_path / "hf", torch.float32).problems(FP32_MAX_ABS, FP32_MAX_KL)
    assert any(shows_in in p for p in problems)


@pytest.mark.slow
def test_an_export_that_fails_verification_leaves_nothing(trained, tmp_path):
    source = from_run(trained("decoder", 2))
    with pytest.raises(UserError, match="does not compute what the mmscale model computes"):
        export_hf(source, tmp_path / "out" / "hf", max_abs_diff=-1.0)  # no difference is below -1
    assert not (tmp_path / "out" / "hf").exists() and not list((tmp_path / "out").glob(".tmp-*"))


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda ckpt: (ckpt / "complete.json").unlink(), "has no complete.json"),
        (lambda ckpt: next(ckpt.glob("zero_pp_rank_1_*optim_states.pt")).unlink(),
         "lacks zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        (lambda ckpt: _truncate(next(ckpt.glob("*model_states.pt"))), "mp_rank_00_model_states.pt of"),
        (lambda ckpt: _scramble(next(ckpt.glob("zero_pp_rank_0_*optim_states.pt"))),
         "zero_pp_rank_0_mp_rank_00_optim_states.pt with contents other than its save wrote"),
    ],
    ids=["unfinished save", "missing rank shard", "truncated file", "same-size corruption"],
)
def test_a_broken_checkpoint_converts_to_nothing_and_says_why(trained, tmp_path, damage, message):
    run_dir = _copy_run(trained("decoder", 2), tmp_path)
    checkpoint = run_dir / "checkpoints" / "step_0000004"
    damage(checkpoint)
    out = tmp_path / "hf"
    with pytest.raises(UserError, match=message):
        export_hf(from_run(checkpoint), out)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _scramble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 4 : len(data) // 2] = bytes(len(data) // 2 - len(data) // 4)
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_run_directory_step_choice_and_the_errors_that_name_it(trained, tmp_path):
    run_dir = trained("decoder", 2)
    assert from_run(run_dir, step=2).facts["steps"] == "2"
    with pytest.raises(UserError, match="step_0000003 does not exist"):
        from_run(run_dir, step=3)
    with pytest.raises(UserError, match="disagrees with the checkpoint"):
        from_run(run_dir / "checkpoints" / "step_0000004", step=2)
    with pytest.raises(UserError, match="never finished"):
        from_run(tmp_path / ".tmp-step_0000006")
    with pytest.raises(UserError, match="neither a run directory"):
        from_run(tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="exists"):
        export_hf(from_run(run_dir), tmp_path / "taken")


@pytest.mark.slow
def test_cli_converts_and_exits_2_with_the_reason(trained, tmp_path):
    run_dir = trained("cross_attention", 3)
    proc = run_command([sys.executable, "-m", "mmscale", "convert", str(run_dir), "--to", "hf", str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "greedy 10 tokens identical" in proc.stdout
    assert MllamaForConditionalGeneration.from_pretrained(tmp_path / "hf").config.text_config.cross_attention_layers
    again = run_command([sys.executable, "-m", "mmscale", "convert", str(run_dir), "--to", "hf", str(tmp_path / "hf")])
    assert again.returncode == 2 and "exists; choose a new folder" in again.stderr


def test_a_model_llava_cannot_express_is_refused_with_every_reason(demo_data, tmp_path):
    """Molmo-style: the attention-pooling connector and a final LayerNorm on the features."""
    from mmscale.convert.export import Source

    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "model.connector.type=molmo",
                                                         "model.vision.post_norm=true"])
    tokenizer = load_tokenizer(demo_data / "tokenizer")
    model = build_model(recipe.model, tokenizer).eval()
    source = Source(recipe.model, model, 3, {}, None, {"name": "x", "source": "a test"})
    with pytest.raises(UserError, match=r"connector.type=molmo .*post_norm=true"):
        export_hf(source, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()



@pytest.mark.slow
def test_viral_projector_is_left_out_and_listed(tiny_overrides, tmp_path):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    recipe = str(REPO / "recipes" / "demo_viral.yaml")
    proc = run_command([sys.executable, "-m", "mmscale", "train", recipe, *tiny_overrides, "train.steps=3",
                 "data.num_workers=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = from_run(run_dir)
    assert source.training_only and all(k.startswith("alignment_head.") for k in source.training_only)
    result = export_hf(source, tmp_path / "hf")
    assert result.problems(FP32_MAX_ABS, FP32_MAX_KL) == []
    assert not any("alignment" in k for k in read_state_dict(tmp_path / "hf"))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert all(f"`{k}`" in card for k in source.training_only)


@pytest.mark.slow
def test_a_run_with_relative_paths_converts_and_evaluates_from_another_directory(demo_data, tmp_path, monkeypatch):
    """Data, tokenizer and the frozen tower's folder given relative to where training started: the
    run records that directory, and eval and convert find them from anywhere."""
    start = tmp_path / "start"
    start.mkdir()
    (start / "data").symlink_to(demo_data)
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, f"data.tokenizer={demo_data / 'tokenizer'}"])
    vocab = vocab_size_for(recipe.model, recipe_tokenizer(recipe))
    write_pretrained_folders(recipe.model, vocab, start / "pretrained")
    command = [sys.executable, "-m", "mmscale", "train", str(REPO / "recipes" / "demo.yaml"), *TINY_OVERRIDES,
               "data.train=data/train", "data.val=data/val", "data.tokenizer=data/tokenizer", "run.dir=run",
               "data.num_workers=0", "train.steps=3", "train.checkpoint_every=3", "train.val_every=0",
               "train.trainable=finetune", "model.pretrained.vision=pretrained/vision"]
    proc = subprocess.run(command, cwd=start, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    source = from_run(start / "run")  # the tokenizer, and the frozen tower from its folder
    assert source.cfg.pretrained.vision == str(start / "pretrained" / "vision")
    export_hf(source, elsewhere / "hf")
    main(["eval", str(start / "run"), "--data", str(demo_data / "eval"), "--max-samples", "2", "--out", "eval.json"])
    assert (elsewhere / "eval.json").is_file()
