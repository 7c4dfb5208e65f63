"""Evaluation: exact-match accuracy per question type, after training and during it.

`mmscale eval` answers shards of question samples (see samples.py for the contract) with an
mmscale run or an exported transformers folder.

    samples.py   read and check the eval samples
    prompts.py   a sample's prompt as training renders it, as model inputs
    models.py    the model under test: an mmscale checkpoint or a transformers folder
    answers.py   how answers are generated and read: token budget, batch size, stop ids
    score.py     normalisation, exact match, the table and the JSON report
    run.py       `evaluate`: the table of contents
    in_loop.py   evaluation during training (train.eval_every), which never loads conversion code
"""
