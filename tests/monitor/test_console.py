"""Readable logs: known noise filtered by its message only, progress as whole lines off a terminal."""

from __future__ import annotations

import warnings

from mmscale.monitor.console import LineProgress, progress, quiet_known_noise


def test_deepspeeds_deprecated_collective_names_are_dropped_and_other_warnings_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated. Please use `x` instead.", FutureWarning)
        warnings.warn("`torch.distributed.scatter` is deprecated.", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", UserWarning)
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "`torch.distributed.scatter` is deprecated."),
        (UserWarning, "`torch.distributed.all_gather_into_tensor` is deprecated."),
    ]


def test_progress_off_a_terminal_prints_one_whole_line_per_log(capsys):
    bar = progress(total=100, initial=10, unit="steps", desc="train", enabled=True)  # pytest's stderr: no terminal
    assert isinstance(bar, LineProgress)
    with bar:
        bar.update(5)
        bar.set_postfix(loss="2.5000", lr="1.00e-04")
        bar.update(5)
        bar.set_postfix(loss="2.2500", lr="1.00e-04")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train 15/100 steps (15%) loss=2.5000 lr=1.00e-04 ")
    assert lines[1].startswith("train 20/100 steps (20%) loss=2.2500 ") and "eta" in lines[1]


def test_other_ranks_print_no_progress(capsys):
    with progress(total=10, initial=0, unit="steps", desc="train", enabled=False) as bar:
        bar.update(1)
        bar.set_postfix(loss="1")
    assert capsys.readouterr().err == ""
