"""Run directory and crash-safe checkpoints.

    RUN_DIR/recipe.yaml                          the fully resolved recipe the run was started with
    RUN_DIR/metrics.jsonl                        one JSON line per logged step and per validation
    RUN_DIR/checkpoints/step_0000100/            one committed checkpoint: every rank's DeepSpeed shards,
    RUN_DIR/checkpoints/step_0000100/complete.json   and, written last, the world size and each file's size and CRC32
    RUN_DIR/checkpoints/latest                   the tag of the newest committed checkpoint
    RUN_DIR/checkpoints/.tmp-step_0000200/       a save in progress, or one a crash interrupted

A save is a commit. Every rank writes its shards into a `.tmp-` directory; once all have
finished, rank 0 writes complete.json, makes every file durable, and renames the directory to
its step_ name. One rename makes the checkpoint visible, so a process killed at any moment
leaves at worst a `.tmp-` directory, which resume never reads and the next save removes.

A run whose frozen weights all come from `model.pretrained`'s folders (training.freeze.FrozenWeights)
saves without them: complete.json records the folders' fingerprints (`frozen_from`), resume
refuses folders that changed, and conversion reads the weights back from them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import deepspeed
import torch.distributed as dist
from torch import nn

from mmscale.errors import UserError
from mmscale.models.hf.folder import fingerprint_change
from mmscale.training.distributed import gather_objects, rank0_object
from mmscale.training.freeze import FrozenWeights, restore_new_rows
from mmscale.utils.files import TMP_PREFIX, commit_folder, crc32_of, fsync, write_durably

log = logging.getLogger(__name__)

MARKER = "complete.json"
LATEST = "latest"
STEP_DIR = re.compile(r"step_(\d+)")
STARTED_IN = "started_in"  # complete.json: the working directory of the start that saved it
FROZEN_FROM = "frozen_from"  # complete.json: folder -> file -> size:crc32 of the left-out frozen weights
NEW_ROWS = "frozen_new_rows"  # client state: the frozen weights' rows that no folder holds
PARENT = "parent"  # complete.json: the checkpoint this one continues from (None: the run's first)
# How long the other ranks wait for rank 0's conversion of a checkpoint for another number of ranks:
# it reads and writes the optimizer states once (~84 GB at 7B), far less than this on any disk.
CONVERSION_TIMEOUT_S = 3 * 3600


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_tag(step: int) -> str:
    return f"step_{step:07d}"


# ---- durability ----------------------------------------------------------------------------


WRITER = re.compile(r"zero_pp_rank_(\d+)_")


def written_by(name: str) -> int:
    """The rank that wrote checkpoint file `name`: DeepSpeed names each rank's ZeRO partition
    files by its rank, and rank 0 writes the others (the module states of ZeRO-1/2)."""
    match = WRITER.search(name)
    return int(match.group(1)) if match else 0


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER
    }


# ---- which checkpoints are complete --------------------------------------------------------


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is one.

    Complete means: complete.json is there and every file it lists has the size it lists.
    That catches an interrupted save, a partial copy of a run directory and a truncated shard
    without reading the (possibly huge) shards themselves.
    """
    if not path.is_dir():
        return "does not exist"
    try:
        files = dict(json.loads((path / MARKER).read_text())["files"])
    except FileNotFoundError:
        return f"has no {MARKER} (its save did not finish, or it was not written by mmscale)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"has an unreadable {MARKER} ({type(e).__name__}: {e})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"lacks {name}, listed in its {MARKER}"
        if file.stat().st_size != size:
            return f"has {name} of {file.stat().st_size} bytes where its {MARKER} says {size}"
    return None


def checksum_problem(path: Path, share: Callable[[list[str]], list[str]] = list) -> str | None:
    """Why the files of complete checkpoint `path` (those `share` picks of them: all, by default)
    are not the bytes its save wrote, or None.

    Reads every file it checks; a marker from before checksums were recorded passes.
    """
    sums = json.loads((path / MARKER).read_text()).get("crc32", {})
    for name in share(sorted(sums)):
        if crc32_of(path / name) != sums[name]:
            return f"has {name} with contents other than its save wrote (CRC32 mismatch): the file is corrupt"
    return None


def _step_dirs(folder: Path) -> list[Path]:
    """The step_ directories, newest step first (a `.tmp-` directory never matches)."""
    found = [p for p in folder.glob("step_*") if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)), reverse=True)


def _named_by_latest(folder: Path) -> Path | None:
    try:
        tag = (folder / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    if not STEP_DIR.fullmatch(tag):
        log.warning("%s names %r, not a step_ directory; ignoring it", folder / LATEST, tag)
        return None
    return folder / tag


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it is complete, else the
    complete step_ directory with the highest step; None if the run never saved one.

    `latest` wins over a newer step_ directory so that pointing it at an earlier checkpoint
    rolls a run back (DeepSpeed's convention). Each checkpoint passed over is named in a warning.
    Raises UserError if checkpoints were saved but none is complete: starting again from step 0
    over a long run's broken checkpoints must be a decision, not an accident.
    """
    folder = checkpoint_dir(run_dir)
    named = _named_by_latest(folder)
    if named is not None:
        problem = checkpoint_problem(named)
        if problem is None:
            return named
        log.warning("%s names %s, which %s; resuming from the newest complete checkpoint instead",
                    folder / LATEST, named.name, problem)
    for path in _step_dirs(folder):
        if path == named:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: it %s", path, problem)
    if named is not None or _step_dirs(folder):
        raise UserError(
            f"{folder} holds no complete checkpoint (see the warnings above); remove the broken "
            f"step_ directories and {LATEST} to start the run again from step 0, or choose another run.dir"
        )
    return None


# ---- save ----------------------------------------------------------------------------------


def _remove_leftovers(folder: Path) -> None:
    """Remove what interrupted saves and prunes left: `.tmp-` directories and files."""
    for path in folder.glob(TMP_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _commit(folder: Path, tag: str, marker: dict) -> None:
    """Rank 0, after every rank wrote its shards: make the `.tmp-` directory the checkpoint `tag`."""
    tmp = folder / (TMP_PREFIX + tag)
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    # The shards are durable already: each rank synced those it wrote (`_sync_and_sum`).
    fsync(tmp / MARKER)
    # A step saved again (a run resumed from an earlier checkpoint) replaces the old one whole.
    commit_folder(tmp, folder / tag)
    write_durably(folder / LATEST, tag)


def _parent(folder: Path, tag: str) -> str | None:
    """The checkpoint a save continues from: the one `latest` names (resume points it at the
    checkpoint it restored), if complete; None for a run's first."""
    named = _named_by_latest(folder)
    return named.name if named is not None and named.name != tag and checkpoint_problem(named) is None else None


def _lineage(folder: Path, newest: Path) -> list[Path]:
    """`newest` and the complete checkpoints it descends from, newest first, through each
    marker's parent (also through an ancestor damaged since, whose marker still reads). A marker
    from before parents were recorded, or an unreadable one: the older complete ones by step."""
    chain, seen, path = [], set(), newest
    while path is not None and path not in seen:
        seen.add(path)
        if checkpoint_problem(path) is None:
            chain.append(path)
        try:
            parent = json.loads((path / MARKER).read_text())[PARENT]
        except (OSError, ValueError, KeyError):
            step = int(STEP_DIR.fullmatch(path.name).group(1))
            return chain + [p for p in _step_dirs(folder) if int(STEP_DIR.fullmatch(p.name).group(1)) < step
                            and checkpoint_problem(p) is None]
        path = folder / parent if parent else None
    return chain


def _prune(folder: Path, keep: int, newest: Path) -> None:
    """Keep the `keep` newest checkpoints of `newest`'s lineage (`newest`, just written, among
    them); delete the other complete ones: older ones, and those of a branch a rollback left
    (a run resumed from an earlier checkpoint through `latest`), whatever their step.

    Only complete checkpoints count and go: a broken step_ directory is left for a person to
    look at. Each is renamed away before it is deleted, so a crash mid-delete leaves a
    `.tmp-` directory (removed by the next save) rather than a half-deleted checkpoint.
    """
    lineage = _lineage(folder, newest)
    kept = set(lineage[:keep])
    for path in _step_dirs(folder):
        if path in kept or checkpoint_problem(path) is not None:
            continue
        if path not in lineage:
            log.warning("removing checkpoint %s: a rollback to an earlier checkpoint left its branch", path)
        doomed = folder / f"{TMP_PREFIX}pruned-{path.name}"
        path.rename(doomed)
        shutil.rmtree(doomed)


class SaveFailed(UserError):
    """A checkpoint could not be written (a full disk, a lost mount); raised on every rank alike."""


def _agree_on_failure(errors: list[str | None], folder: Path, tag: str, step: int) -> None:
    """If any rank failed, remove the partial save (it may hold the space the next one needs)
    and raise SaveFailed on every rank, naming the first failure and what is still intact."""
    failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(folder / (TMP_PREFIX + tag), ignore_errors=True)
    rank, error = failed[0]
    latest = _named_by_latest(folder)
    intact = f"the newest complete checkpoint, {latest.name}, is intact" if latest else "no earlier checkpoint exists"
    free = shutil.disk_usage(folder).free / 2**20
    raise SaveFailed(
        f"saving checkpoint step {step} failed on rank {rank} ({error}; the file system of {folder} has "
        f"{free:.1f} MiB free); its partial files were removed and {intact}. Free space there (or set run.dir "
        "elsewhere) and run again to resume"
    )


def _attempt(action: Callable[[], object]) -> str | None:
    """None if `action` ran, else why writing failed. torch.save reports a full disk as a
    RuntimeError from its zip writer ("unexpected pos ..."), not as ENOSPC."""
    try:
        action()
    except (OSError, RuntimeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _share(names: list[str]) -> list[str]:
    """This rank's share of a checkpoint's files for reading them all once between the ranks:
    every world_size-th name from its rank on (about one shard each)."""
    return names[dist.get_rank() :: dist.get_world_size()]


def _sync_and_sum(tmp: Path, names: list[str]) -> tuple[dict[str, int], str | None]:
    """fsync the files this rank wrote (on a shared file system only the writing host can make
    them durable), then the CRC32s of its share of the files."""
    sums: dict[str, int] = {}
    error = _attempt(lambda: [fsync(tmp / name) for name in names if written_by(name) == dist.get_rank()])
    error = error or _attempt(lambda: sums.update({name: crc32_of(tmp / name) for name in _share(names)}))
    return sums, error


def save_checkpoint(
    engine: deepspeed.DeepSpeedEngine, run_dir: Path, step: int, client_state: dict, keep: int = 0,
    frozen: FrozenWeights | None = None,
) -> Path:
    """Collective: save and commit checkpoint `step`; returns its directory.

    Every rank writes its shards into checkpoints/.tmp-step_NNNNNNN; the ranks checksum the
    files between them; rank 0 then commits it (see the module docstring) and points `latest`
    at it; no rank returns before the commit. Leftovers of interrupted saves are removed first.
    With `keep` > 0, rank 0 then deletes the oldest complete checkpoints beyond the newest `keep`.

    With `frozen`, the frozen weights are left out (see the module docstring).

    A write that fails on any rank (OSError: a full disk, a lost mount) raises SaveFailed on
    every rank once all have reached the same point, and nothing of the save is left behind.
    A failure inside DeepSpeed's own collectives can still leave the other ranks waiting until
    train.dist_timeout_s; on one shared file system all ranks meet a full disk alike.
    """
    folder, tag = checkpoint_dir(run_dir), checkpoint_tag(step)
    tmp = folder / (TMP_PREFIX + tag)
    rank0 = dist.get_rank() == 0
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(folder)
    dist.barrier()  # no rank writes into a .tmp- directory that rank 0 is still removing
    if frozen is not None:
        client_state = {**client_state, NEW_ROWS: frozen.new_rows}
    error = _attempt(lambda: engine.save_checkpoint(
        str(folder), tag=TMP_PREFIX + tag, client_state=client_state, save_latest=False,
        exclude_frozen_parameters=frozen is not None,
    ))
    # Every rank's shards are written (ours to rely on, whatever DeepSpeed does inside), or some failed.
    _agree_on_failure(gather_objects(error), folder, tag, step)
    # Sizes catch a cut file cheaply at every resume; the CRC32s catch bytes changed in place,
    # for readers that check them (conversion). Each rank reads its share, so a save of N ranks'
    # shards costs every rank about one shard's read, mostly from the page cache DeepSpeed filled.
    sizes = rank0_object(_file_sizes(tmp) if rank0 else None)
    sums, error = _sync_and_sum(tmp, sorted(sizes))
    shares = gather_objects((sums, error))
    _agree_on_failure([e for _, e in shares], folder, tag, step)
    if rank0:
        crc32 = {name: crc for part, _ in shares for name, crc in part.items()}
        # dtype: what the model computed in; a release of the run defaults to it (mmscale convert).
        # started_in: where the recipe's relative paths pointed when this state was trained
        # (mmscale.convert.trained.run_paths).
        marker = {"step": step, "world_size": dist.get_world_size(), "files": sizes, "crc32": crc32,
                  "dtype": "bf16" if engine.bfloat16_enabled() else "fp32", PARENT: _parent(folder, tag),
                  STARTED_IN: os.getcwd()}
        if frozen is not None:
            marker[FROZEN_FROM] = frozen.folders
        error = _attempt(lambda: _commit(folder, tag, marker))
        if error is None and keep:
            _prune(folder, keep, folder / tag)
    # Nobody goes on, or exits, before the checkpoint is committed (or its commit failed).
    _agree_on_failure(gather_objects(error if rank0 else None), folder, tag, step)
    return folder / tag


# ---- resume --------------------------------------------------------------------------------


class Restored(NamedTuple):
    """What `load_latest_checkpoint` restored: the trainer's state saved with it, where from, and
    by how many ranks it was written."""

    client_state: dict
    path: Path
    world_size: int


def _agreed_checkpoint(run_dir: Path, frozen: FrozenWeights | None) -> tuple[Path, int] | None:
    """Rank 0 chooses (and checks the frozen weights' folders) and tells the others the
    checkpoint and the number of ranks that wrote it: on a shared file system other hosts may
    briefly see an older listing, and all ranks must load the same checkpoint. Rank 0's
    UserError is raised on every rank, so that all stop at once instead of waiting out the
    collective timeout."""
    choice: tuple[Path, int] | UserError | None = None
    if dist.get_rank() == 0:
        try:
            path = newest_complete_checkpoint(run_dir)
            if path is not None:
                marker = json.loads((path / MARKER).read_text())
                _check_frozen_from(path, marker.get(FROZEN_FROM), frozen)
                choice = (path, marker["world_size"])
        except UserError as e:
            choice = e
    choice = rank0_object(choice)
    if isinstance(choice, UserError):
        raise choice
    return choice


def _check_frozen_from(path: Path, recorded: dict | None, frozen: FrozenWeights | None) -> None:
    """UserError if checkpoint `path` left out frozen weights that this start does not load from
    the same, unchanged folders."""
    if recorded is None:
        return  # the checkpoint holds every weight
    if frozen is None:
        raise UserError(
            f"checkpoint {path} holds no frozen weights: they come from {', '.join(recorded)}, but this start "
            "does not load all its frozen weights from there; resume with the recipe the run started with"
        )
    # By position (model.pretrained's vlm, vision, llm, as named): a resume may move the folders
    # (run_dir.MAY_MOVE_ON_RESUME), as long as they hold the same files.
    now = dict(zip(recorded, frozen.folders.values())) if len(recorded) == len(frozen.folders) else frozen.folders
    change = fingerprint_change(recorded, now)
    if change is not None:
        raise UserError(
            f"checkpoint {path} holds no frozen weights, which the run loads from model.pretrained, and {change}; "
            "put back the folders the run started from (a different model there would train on silently)"
        )


def _module_loader(frozen: FrozenWeights | None) -> Callable[..., None]:
    """DeepSpeed's module load, strict but for the frozen weights a checkpoint may leave out."""
    allowed = frozen.names if frozen is not None else frozenset()

    def load(src: dict, dst: nn.Module) -> None:
        result = dst.load_state_dict(src, strict=False)
        missing = sorted(set(result.missing_keys) - allowed)
        if missing or result.unexpected_keys:
            raise RuntimeError(f"module weights missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")

    return load


def load_latest_checkpoint(
    engine: deepspeed.DeepSpeedEngine, run_dir: Path, frozen: FrozenWeights | None = None
) -> Restored | None:
    """Collective: restore the newest complete checkpoint (see `newest_complete_checkpoint`);
    returns its client state and directory, or None if the run has none. With `frozen` (the
    frozen weights this start loaded from model.pretrained), a checkpoint that left them out
    restores over them.

    A checkpoint that is complete but fails to load raises UserError rather than falling back
    to an earlier one: by then some ranks may have loaded part of it while others wait in a
    collective, and an unreadable file of the right size points to a changed DeepSpeed or torch
    more often than to bad bytes, which an earlier checkpoint would not cure.
    """
    agreed = _agreed_checkpoint(run_dir, frozen)
    if agreed is None:
        return None
    path, world = agreed
    _check_bytes(path)
    try:
        if world == dist.get_world_size():
            loaded, client_state = engine.load_checkpoint(
                str(path.parent), tag=path.name, custom_load_fn=_module_loader(frozen))
        else:
            loaded, client_state = _load_resharded(engine, path, _module_loader(frozen))
    except UserError:
        raise
    except Exception as e:  # bad bytes surface as any of KeyError, RuntimeError, UnpicklingError, EOFError...
        raise UserError(
            f"checkpoint {path} is complete but cannot be loaded ({type(e).__name__}: {e}); remove it "
            f"(or point {path.parent / LATEST} at an earlier step_ directory) and run again"
        ) from e
    if loaded is None:
        raise UserError(f"checkpoint {path} is complete but DeepSpeed found no model states in it; remove it")
    restore_new_rows(engine.module, client_state.pop(NEW_ROWS, {}))
    # `latest` names the checkpoint the run continues from: the next save's parent (`_prune`).
    if dist.get_rank() == 0 and _named_by_latest(path.parent) != path:
        write_durably(path.parent / LATEST, path.name)
    return Restored(client_state, path, world)


def _load_resharded(engine: deepspeed.DeepSpeedEngine, path: Path, load_fn: Callable) -> tuple[object, dict]:
    """Collective: load checkpoint `path`, written by another number of ranks, through DeepSpeed's
    universal checkpoint (every parameter's weights and optimizer states whole, which any number
    of ranks can load their partitions of). Rank 0 converts it into a `.tmp-` folder beside it
    (removed after the load, or by the next save), which costs about one read and one write of
    the optimizer states: minutes at 7B. The other ranks wait for its outcome file, named for this
    attempt, rather than in a collective, which would time out after train.dist_timeout_s."""
    universal = path.parent / f"{TMP_PREFIX}universal-{path.name}"
    attempt = rank0_object(secrets.token_hex(8))
    outcome = universal / f"outcome-{attempt}"  # empty: converted; else why not
    if dist.get_rank() == 0:
        started = time.perf_counter()
        shutil.rmtree(universal, ignore_errors=True)
        try:
            error = _convert_to_universal(path, universal / path.name)
        except Exception as e:  # noqa: BLE001  (whatever stops it, the other ranks must hear of it)
            error = f"converting {path} to a universal checkpoint failed ({type(e).__name__}: {e})"
        if error:
            shutil.rmtree(universal / path.name, ignore_errors=True)  # room for the outcome on a full disk
        universal.mkdir(exist_ok=True)
        write_durably(outcome, error)
        if not error:
            log.warning("checkpoint %s converted to a universal checkpoint in %.1f s", path,
                        time.perf_counter() - started)
    deadline = time.monotonic() + CONVERSION_TIMEOUT_S
    while not outcome.exists():
        if time.monotonic() > deadline:
            raise UserError(f"rank 0 did not convert {path} to a universal checkpoint within "
                            f"{CONVERSION_TIMEOUT_S // 3600} h; resume on the number of ranks that wrote it")
        time.sleep(1)
    error = outcome.read_text()
    if error:
        raise UserError(f"{error}; resume on the number of ranks that wrote the checkpoint")
    # DeepSpeed reads this setting only when loading (engine.load_checkpoint and the ZeRO
    # optimizers' load_state_dict), and a run knows which checkpoint it resumes only after its
    # engine exists: so it is switched on for this one load.
    engine._config.load_universal_checkpoint = True
    try:
        result = engine.load_checkpoint(str(universal), tag=path.name, custom_load_fn=load_fn)
    finally:
        engine._config.load_universal_checkpoint = False
    dist.barrier()  # every rank has read it
    if dist.get_rank() == 0:
        shutil.rmtree(universal, ignore_errors=True)
    return result


def _convert_to_universal(checkpoint: Path, out: Path) -> str:
    """Run DeepSpeed's converter; returns why it failed, or ''. A script (argparse, process pools):
    run as one, as a user would. --inject_missing_state: mmscale does not register the metadata
    that Megatron-style tensor parallelism needs; with none, the converter fills in its defaults."""
    workers = str(min(8, os.cpu_count() or 1))
    done = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
         "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", workers,
         "--num_merge_workers", workers],
        capture_output=True, text=True, check=False,
    )
    if not done.returncode:
        return ""
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]  # the exception, not the whole traceback
    return f"DeepSpeed's ds_to_universal failed on {checkpoint} ({last})"


def _check_bytes(path: Path) -> None:
    """Collective: UserError on every rank if a file of checkpoint `path` is not the bytes its
    save wrote (a CRC32 mismatch: sizes alone pass a byte flipped in place, which would then be
    trained on and saved again under fresh checksums). The ranks share the reading, about one
    shard each, as at the save."""
    found = [problem for problem in gather_objects(checksum_problem(path, _share)) if problem is not None]
    if not found:
        return
    earlier = _lineage(path.parent, path)[1:]
    fallback = (f"the newest earlier checkpoint is {earlier[0]}: resume from it with `echo {earlier[0].name} > "
                f"{path.parent / LATEST}`" if earlier else "no earlier checkpoint is complete")
    raise UserError(f"checkpoint {path} {found[0]}; {fallback}, and run again")
