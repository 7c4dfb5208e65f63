import pytest

from mmscale.data.shards import resolve_shards
from mmscale.errors import UserError


def test_missing_and_empty_shard_locations(tmp_path):
    with pytest.raises(UserError, match=f"data.train: {tmp_path / 'nope'}.* does not exist"):
        resolve_shards(str(tmp_path / "nope"), "data.train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .tar shards"):
        resolve_shards(str(tmp_path / "empty"), "data.val")
    assert resolve_shards("pipe:cat x-{0..2}.tar", "data.train") == [f"pipe:cat x-{i}.tar" for i in range(3)]
