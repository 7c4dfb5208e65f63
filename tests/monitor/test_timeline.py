"""Time accounting: what each attempt keeps and loses, goodput, and the recorder's clock."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import pytest

from mmscale.monitor.timeline import (
    PHASES,
    Attempt,
    Timeline,
    account,
    attempts_table,
    process_started_at,
    read_attempts,
)


def _attempt(number: int, resumed_from: int, last_step: int, saved: list[tuple[int, float]], train_s: float,
             other_s: float = 10.0, ranks: int = 8) -> Attempt:
    phases = dict.fromkeys(PHASES, 0.0) | {"train": train_s, "build": other_s}
    return Attempt(number, ranks, 0.0, 0.0, None, resumed_from, last_step, phases, saved, "stopped")


def test_a_run_preempted_twice_keeps_what_each_next_start_resumed_from():
    # Attempt 1 trains steps 1-40 (4 s each), saves at 20 and 40, preempted after its save at 40.
    # Attempt 2 trains 41-70, saves at 60, and is killed after 70: steps 61-70 are lost.
    # Attempt 3 resumes from 60 and trains to 100, its final checkpoint.
    first = _attempt(1, 0, 40, [(20, 80.0), (40, 160.0)], 160.0)
    second = _attempt(2, 40, 70, [(60, 80.0)], 120.0)
    third = _attempt(3, 60, 100, [(80, 80.0), (100, 160.0)], 160.0)
    accounting = account([first, second, third])
    assert [(k.kept_until, k.kept_s, k.lost_steps) for k in accounting.attempts] == [
        (40, 160.0, 0), (60, 80.0, 10), (100, 160.0, 0)]
    assert accounting.attempts[1].lost_s == 40.0
    allocated = 8 * (170 + 130 + 170)
    assert accounting.allocated_rank_s == allocated
    assert accounting.goodput == pytest.approx(8 * (160 + 80 + 160) / allocated)
    hours = accounting.rank_hours()
    assert hours["train_kept"] == pytest.approx(8 * 400 / 3600) and hours["train_lost"] == pytest.approx(8 * 40 / 3600)
    assert sum(hours.values()) == pytest.approx(allocated / 3600)


def test_a_rollback_loses_every_step_after_the_checkpoint_it_went_back_to():
    # Attempt 3 resumes from step 20 (say, the checkpoints after it were bad): attempt 2 kept
    # nothing and attempt 1 only its steps up to 20.
    first = _attempt(1, 0, 40, [(20, 80.0), (40, 160.0)], 160.0)
    second = _attempt(2, 40, 70, [(60, 80.0)], 120.0)
    third = _attempt(3, 20, 50, [(50, 120.0)], 120.0)
    kept = account([first, second, third]).attempts
    assert [(k.kept_until, k.kept_s, k.lost_steps) for k in kept] == [(20, 80.0, 20), (40, 0.0, 30), (50, 120.0, 0)]


def test_a_running_attempt_counts_its_steps_since_its_newest_checkpoint_as_lost():
    running = _attempt(1, 0, 35, [(20, 80.0)], 140.0)
    (kept,) = account([running]).attempts
    assert (kept.kept_until, kept.kept_s, kept.lost_steps, kept.lost_s) == (20, 80.0, 15, 60.0)


def test_a_resume_from_a_checkpoint_the_attempt_did_not_write_interpolates_its_train_time():
    first = _attempt(1, 0, 40, [(40, 160.0)], 160.0)
    second = _attempt(2, 30, 45, [(45, 60.0)], 60.0)
    assert account([first, second]).attempts[0].kept_s == pytest.approx(120.0)


def test_the_clock_charges_every_second_to_one_phase_and_writes_a_readable_record(tmp_path):
    started = time.time() - 2.0
    timeline = Timeline(started_at=started)
    timeline.switch("build")
    timeline.attach(tmp_path, rank=0, ranks=2)
    with timeline.phase("train"):
        timeline.stepped(1)
        with timeline.phase("save"):
            time.sleep(0.05)
            timeline.saved(1)
        timeline.stepped(2)
    timeline.end("finished")
    (attempt,) = read_attempts(tmp_path)
    assert attempt.number == 1 and attempt.ranks == 2 and attempt.ended == "finished" and attempt.last_step == 2
    assert attempt.phases["startup"] == pytest.approx(2.0, abs=0.05)
    assert attempt.phases["save"] >= 0.05 and attempt.saved[0][0] == 1
    assert attempt.wall_s == pytest.approx(attempt.updated_at - started, abs=1e-6)
    # A second attempt in the same run directory is number 2; other ranks write nothing.
    second = Timeline(started_at=time.time())
    second.attach(tmp_path, rank=0, ranks=2)
    Timeline(started_at=time.time()).attach(tmp_path, rank=1, ranks=2)
    assert [p.name for p in sorted((tmp_path / "attempts").iterdir())] == ["001.json", "002.json"]
    assert json.loads((tmp_path / "attempts" / "002.json").read_text())["number"] == 2


def test_the_launchers_start_counts_as_launch(monkeypatch):
    monkeypatch.setenv("MMSCALE_LAUNCHED_AT", str(process_started_at() - 100))
    timeline = Timeline()  # this process's start, and its launcher's before it
    assert timeline.attempt.phases["launch"] == pytest.approx(100)
    assert timeline.attempt.launched_at == pytest.approx(process_started_at() - 100)


def test_the_attempts_table_has_a_row_per_attempt_and_the_goodput():
    first = _attempt(1, 0, 40, [(40, 160.0)], 160.0)
    second = _attempt(2, 40, 70, [(60, 80.0)], 120.0)
    text = attempts_table(account([first, second]))
    rows = text.splitlines()
    assert rows[0].split()[:6] == ["attempt", "job", "ranks", "steps", "lost", "train"]
    assert rows[1].split()[:7] == ["1", "-", "8", "1-40", "0", "160.0", "160.0"]
    assert rows[2].split()[:7] == ["2", "-", "8", "41-70", "10", "120.0", "80.0"]
    assert rows[-1] == f"goodput {240 / 300:.1%} of {8 * 300 / 3600:.3g} allocated rank-hours"


def test_a_new_attempt_follows_the_newest_record_and_unreadable_records_are_left_out(tmp_path):
    folder = tmp_path / "attempts"
    folder.mkdir()
    for number in (1, 9, 10):  # 2-8 were deleted; 10 sorts before 9 as text
        (folder / f"{number:03d}.json").write_text(json.dumps(asdict(_attempt(number, 0, number, [], 1.0))))
    (folder / "011.json").write_text("{not json")
    timeline = Timeline(started_at=time.time())
    with pytest.warns(UserWarning, match=r"011.json is not an attempt record"):
        timeline.attach(tmp_path, rank=0, ranks=1)
    timeline.attach(tmp_path, rank=0, ranks=1)  # the trainer's call after train.py's changes nothing
    assert timeline.path.name == "012.json"
    assert [k.attempt.number for k in timeline.accounting().attempts] == [1, 9, 10, 12]
    with pytest.warns(UserWarning, match=r"011.json is not an attempt record"):
        assert [a.number for a in read_attempts(tmp_path)] == [1, 9, 10, 12]


def test_an_attempts_accounting_counts_the_attempts_before_it(tmp_path):
    for number, (resumed, last) in enumerate(((0, 4), (4, 6)), start=1):
        timeline = Timeline(started_at=time.time() - 1)
        timeline.attach(tmp_path, rank=0, ranks=2)
        timeline.switch("train")
        timeline.resumed(resumed)
        timeline.stepped(last)
        timeline.saved(last)
        kept = timeline.accounting().attempts
        assert [k.attempt.number for k in kept] == list(range(1, number + 1))
        assert [k.kept_until for k in kept] == [4, 6][:number]
        timeline.end("finished")
