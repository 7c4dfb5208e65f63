"""Eval data errors are UserErrors that name the path or the sample (exit code 2)."""

from __future__ import annotations

import pytest

from mmscale.cli import main
from mmscale.errors import UserError
from mmscale.eval.samples import read_eval_samples


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "eval-{000000..000003}.tar"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path), "--data", str(missing)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "mmscale eval: error: --data:" in err and "eval-000000.tar does not exist" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path), "--data", str(tmp_path / "empty")])
    assert exit_.value.code == 2 and "holds no .tar shards" in capsys.readouterr().err


def test_training_samples_are_not_eval_samples(demo_data):
    shards = [str(p) for p in sorted((demo_data / "val").glob("*.tar"))]
    with pytest.raises(UserError, match=r"sample demo-val-caption-0000000 is not an eval sample: .*question_type"):
        list(read_eval_samples(shards))


def test_max_samples_reads_across_shards_in_order(eval_shards):
    shards = [str(p) for p in sorted(eval_shards.glob("*.tar"))]
    everything = [s.id for s in read_eval_samples(shards)]
    assert len(everything) == 12 and len(shards) == 3
    assert [s.id for s in read_eval_samples(shards, 7)] == everything[:7]
    assert {s.question_type for s in read_eval_samples(shards)} >= {"name", "count"}


def test_the_demo_eval_split_follows_the_contract(demo_data):
    if not (demo_data / "eval").is_dir():
        pytest.skip("this demo build has no eval split")
    shards = [str(p) for p in sorted((demo_data / "eval").glob("*.tar"))]
    samples = list(read_eval_samples(shards))
    assert {s.question_type for s in samples} >= {"count", "left_right", "above_below", "name"}
