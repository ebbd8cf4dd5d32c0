"""What `slq-hf train` checks and prints around ``SLQTrainer.train()``: the output folder (never mix or lose runs),
which checkpoint a resume continues, the ``--strict`` pre-check of every file, and the plan printed before step 1."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..modeling.checkpoint import atomic_write
from ..modeling.processing_slq import SLQInputError
from ..set_aside import put_back, set_aside
from .collator import SLQDataCollator, example_roles
from .trainer import STAGING_DIR

RUN_FILE = "slq_run.json"
# Files `save_model` writes into the output folder; their presence means a finished earlier run.
MODEL_FILES = ("model.safetensors", "config.json", "training_summary.json")
# Where --overwrite-output-dir keeps the earlier run until the new one is saved (hidden: not a checkpoint-* folder).
EARLIER_RUN_DIR = ".slq-earlier-run"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _checkpoints(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()
                   and p.name[len(PREFIX_CHECKPOINT_DIR) + 1:].isdigit()),
                  key=lambda p: int(p.name[len(PREFIX_CHECKPOINT_DIR) + 1:]))


def earlier_run(folder: str | os.PathLike) -> list[str]:
    """What in ``folder`` belongs to an earlier training run (checkpoints, a final model, the run file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p.name for p in _checkpoints(folder)]
    found += [name for name in (*MODEL_FILES, RUN_FILE) if (folder / name).exists()]
    return found


def check_output_dir(output_dir: str | os.PathLike, backbone: str, resuming: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, an output folder that would lose or mix data.

    Refused: the backbone's own folder or another model's folder (always); a folder holding an earlier run unless
    resuming it or ``overwrite``. Nothing is moved here: :func:`set_aside_earlier_run` does that once every other
    check of the command has passed, so a mistyped option never touches the earlier run.
    """
    from ..modeling.checkpoint import check_save_target

    folder = Path(output_dir)
    if Path(backbone).exists() and folder.resolve() == Path(backbone).resolve():
        raise ValueError(f"--output-dir {output_dir} is the backbone's folder: saving there would overwrite the "
                         "backbone's files. Pick a new folder; the SLQ folder only points at the backbone.")
    check_save_target(folder)
    found = [] if resuming else earlier_run(folder)
    if found and not overwrite:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(f"--output-dir {output_dir} holds an earlier run ({shown}). Continue it with "
                         "--resume-from-checkpoint latest, pass --overwrite-output-dir to delete it and start over, "
                         "or pick a new folder.")


def _run_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that make up a run: checkpoints, the staging folder, model files, the run file."""
    entries = [*(_checkpoints(folder) if folder.is_dir() else []), folder / STAGING_DIR,
               *(folder / name for name in (*MODEL_FILES, RUN_FILE))]
    return [path for path in entries if os.path.lexists(path)]


def set_aside_earlier_run(output_dir: str | os.PathLike) -> None:
    """``--overwrite-output-dir``, once every check passed: move the earlier run into ``EARLIER_RUN_DIR``, so the
    folder never mixes two runs, and the earlier run comes back if the new one fails (:func:`restore_earlier_run`)
    and goes only once the new one is saved (:func:`drop_earlier_run`). A killed overwrite's partial output goes."""
    folder = Path(output_dir)
    set_aside(_run_entries(folder), folder / EARLIER_RUN_DIR)


def restore_earlier_run(output_dir: str | os.PathLike) -> None:
    """Undo :func:`set_aside_earlier_run` when the new run failed: its partial output goes, the earlier run is back."""
    folder = Path(output_dir)
    put_back(_run_entries(folder), folder / EARLIER_RUN_DIR)


def drop_earlier_run(output_dir: str | os.PathLike) -> None:
    """Delete the run :func:`set_aside_earlier_run` kept, now that the new run is saved."""
    shutil.rmtree(Path(output_dir) / EARLIER_RUN_DIR, ignore_errors=True)


def write_run_file(output_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record the run's settings in ``<output_dir>/slq_run.json`` (what a resume must match)."""
    write_json(Path(output_dir) / RUN_FILE, settings)


def resume_checkpoint(output_dir: str | os.PathLike, requested: str | None, settings: dict[str, Any]) -> str | None:
    """The checkpoint to resume from (``requested``: None, "latest" or a folder), checked to belong to the run in
    ``output_dir`` with the same settings; prints which one. None when not resuming."""
    if requested is None:
        return None
    folder = Path(output_dir)
    if requested == "latest":
        found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if found is None:
            raise ValueError(f"--resume-from-checkpoint latest: no checkpoint-* folder in {str(output_dir)!r}.")
        checkpoint = Path(found)
    else:
        checkpoint = Path(requested)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ValueError(f"--resume-from-checkpoint {requested}: not a complete checkpoint folder (no "
                             "trainer_state.json).")
        if checkpoint.resolve().parent != folder.resolve():
            raise ValueError(f"--resume-from-checkpoint {requested} is not a checkpoint of --output-dir "
                             f"{output_dir}; a resumed run continues in its own folder.")
    run_file = folder / RUN_FILE
    if run_file.is_file():
        recorded = json.loads(run_file.read_text(encoding="utf-8"))
        changed = {k: (recorded.get(k), v) for k, v in settings.items() if k in recorded and recorded[k] != v}
        if changed:
            shown = "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"--resume-from-checkpoint: {checkpoint} belongs to a run with other settings ({shown}). "
                             "Resume with the run's own settings, or start a new run in another folder.")
    print(f"Resuming from {checkpoint} (step {checkpoint.name.rsplit('-', 1)[-1]} of the run in {output_dir}).",
          flush=True)
    return str(checkpoint)


def check_strict(dataset: Any, collator: SLQDataCollator, what: str) -> None:
    """``--strict``: load every item of every example before step 1; the first unreadable one is an error that
    names it (and its line), instead of a failure in the middle of an epoch."""
    from tqdm.auto import tqdm

    for index in tqdm(range(len(dataset)), desc=f"checking {what}", unit="example", mininterval=2.0):
        example = dataset[index]
        for role, value in example_roles(example, index).items():
            try:
                collator._load(role, value)
            except SLQInputError as err:
                source = example.get("_source") if isinstance(example, dict) else None
                where = source or f"example {index}"
                raise SLQInputError(f"{what}: {where}: {err} (--strict: fix or remove the example, or train without "
                                    "--strict to skip and count such examples).") from err


class PlanPrinter(TrainerCallback):
    """Prints the run's plan once the Trainer knows its step count, before step 1."""

    def __init__(self, args: Any, train_size: int, eval_size: int, resume: str | None):
        self.args, self.train_size, self.eval_size, self.resume = args, train_size, eval_size, resume

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        a = self.args
        contrastive = a.batch_size * args.world_size
        # An epoch's last, smaller batch is a step too: 33 pairs in batches of 32 are 2 steps an epoch, not 1.03.
        steps_per_epoch = math.ceil(math.ceil(self.train_size / contrastive) / args.gradient_accumulation_steps)
        epochs = state.max_steps / max(steps_per_epoch, 1)
        lines = [
            f"Plan: {self.train_size:,} training pairs ({a.train_data}), {state.max_steps:,} steps "
            f"= {epochs:.2f} epochs",
            f"  contrastive batch {contrastive} pairs ({a.batch_size} a process x {args.world_size} process(es)"
            + (f", GradCache micro-batches of {a.micro_batch_size}" if a.micro_batch_size else "") + ")",
            f"  lr {a.lr} {a.lr_scheduler}, warmup {a.warmup}, weight decay {a.weight_decay}; {a.num_queries} queries "
            f"({a.pooling} pooling, {a.query_init} init)",
        ]
        if self.eval_size:
            every = a.eval_steps or a.save_steps
            final = "the last step" if a.keep_last else f"the best checkpoint by eval_{a.metric_for_best_model}"
            lines.append(f"  eval every {every} steps on {self.eval_size:,} pairs ({a.eval_data}); final: {final}")
        if self.resume:
            lines.append(f"  resuming from {self.resume} (step {state.global_step})")
        if epochs > 1.5 and not a.weight_decay:
            # Several passes over the same pairs grow the queries' norms until they outweigh what they read from the
            # prompt, and the transfer to unseen phrasings drops (on the toy: knowledge-caption t2i R@1 56 -> 84
            # with --weight-decay 1.0, three seeds).
            lines.append(f"  note: {epochs:.1f} epochs over the same pairs without weight decay; on repeated data "
                         "--weight-decay 1.0 keeps the queries small and generalising (README, Training)")
        if math.ceil(self.train_size / contrastive) < 1 or contrastive < 2:
            lines.append("  warning: fewer than 2 pairs a step")
        print("\n".join(lines), flush=True)
