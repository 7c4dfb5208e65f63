"""Release code: `mmscale convert` between mmscale models and Hugging Face `transformers` folders.

    trained.py         a training run's weights, read back from a DeepSpeed checkpoint
    export.py          `--to hf`: a transformers folder, written and then verified
    verify.py          the numerical proof that the export computes what the mmscale model computes
    release_files.py   processor, generation config, model card; the folder written whole
    mmscale_folder.py  `--from hf --to mmscale`: a transformers folder as an mmscale model folder

The mapping of configs and weights is the model families' adapters (mmscale.models.hf), which
training's `model.pretrained` loading uses too: training never imports this package.
"""
