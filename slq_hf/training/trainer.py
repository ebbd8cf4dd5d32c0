"""Trainer glue. The plain ``transformers.Trainer`` trains an SLQModel as is (see the README); SLQTrainer adds
conveniences: no need for ``remove_unused_columns=False``, a summary of skipped examples at the end of training,
and retrieval metrics (R@1 in both directions over the whole eval set) on evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..modeling.checkpoint import query_set_file, replace_folder, write_folder
from .collator import MICRO_BATCHES_KEY, ROWS_KEY, SKIPPED_KEY, SLQDataCollator, example_roles
from .gradcache import _average_gradients, contrastive_loss, embed_side, gradcache_backward, side_inputs

logger = logging.getLogger(__name__)

# Outputs of SLQModel.forward that evaluation should not collect: (B, N_q, H) per example is large and unused.
EVAL_IGNORE_KEYS = ["query_states"]
# Checkpoints are written here first and renamed to checkpoint-N when complete. The name never matches the
# Trainer's ^checkpoint-(\d+)$ pattern, so resume_from_checkpoint=True never picks a half-written one.
STAGING_DIR = ".checkpoint-staging"


# One letter per kind of item, used in metric names: "t2i_R@1" is text -> image Recall@1.
KIND_LETTERS = {"text": "t", "image": "i", "image+text": "it"}


def item_kind(item: Any) -> str | None:
    """"text", "image" or "image+text" for an example item (string, ``{"text"}``, PIL/path/``{"image"}``...)."""
    if isinstance(item, str):
        return "text"
    if isinstance(item, dict):
        if "image" in item:
            return "image+text" if item.get("text") else "image"
        if "text" in item:
            return "text"
        if set(item) <= {"bytes", "path"}:
            return "image"
        return None
    return "image"  # a PIL image


def metric_directions(example: Any) -> tuple[str, str]:
    """Names of the two retrieval directions of a pair example: (query -> positive, positive -> query).

    ``{"image", "text"}`` examples give ("i2t", "t2i"); ``{"query": "a red car", "positive": {"image": ...}}`` gives
    ("t2i", "i2t"). When both sides are of the same kind (text -> text), the names are ("query2positive",
    "positive2query").
    """
    roles = example_roles(example)
    query, positive = item_kind(roles["query"]), item_kind(roles["positive"])
    if query is None or positive is None or query == positive:
        return "query2positive", "positive2query"
    q, p = KIND_LETTERS[query], KIND_LETTERS[positive]
    return f"{q}2{p}", f"{p}2{q}"


def retrieval_metrics(eval_pred: Any, directions: tuple[str, str] = ("query2positive", "positive2query")
                      ) -> dict[str, float]:
    """``compute_metrics`` for pair datasets: Recall@1 in both directions over the whole eval set, in percent.

    Expects the predictions SLQTrainer collects: ``pooler_output`` (N, D) and ``positive_pooler_output`` (N, D) as
    the two 2-D arrays (in that order) of ``eval_pred.predictions``. Duplicate texts/images count as misses.

    Returns:
        {"<q2p>_R@1", "<p2q>_R@1", "mean_R@1"} (the Trainer adds the ``eval_`` prefix); with ``directions`` from
        :func:`metric_directions`, image/text pairs give ``i2t_R@1`` and ``t2i_R@1``.
    """
    predictions = eval_pred.predictions if hasattr(eval_pred, "predictions") else eval_pred[0]
    if not isinstance(predictions, (tuple, list)):
        predictions = (predictions,)
    matrices = [np.asarray(p, dtype=np.float32) for p in predictions if np.ndim(p) == 2]
    if len(matrices) < 2:
        return {}
    query, positive = matrices[0], matrices[1]
    # NaN rows stand for examples a process could not load (SLQTrainer under torchrun): not part of the eval set.
    loaded = ~(np.isnan(query).any(axis=1) | np.isnan(positive).any(axis=1))
    query, positive = query[loaded], positive[loaded]
    if not len(query):
        return {}
    scores = query @ positive.T  # (N, N)
    target = np.arange(scores.shape[0])
    forward = 100 * float((scores.argmax(axis=1) == target).mean())
    backward = 100 * float((scores.argmax(axis=0) == target).mean())
    return {f"{directions[0]}_R@1": forward, f"{directions[1]}_R@1": backward, "mean_R@1": (forward + backward) / 2}


class SLQTrainer(Trainer):
    """``transformers.Trainer`` for SLQ models.

    Differences from the plain Trainer (which also works, given ``remove_unused_columns=False``):

    - example columns are always kept (the SLQ collator reads ``image``/``text``/``query``/... itself);
    - with an :class:`SLQDataCollator`, examples skipped because they could not be loaded (``strict=False``) are
      counted across dataloader workers and reported in one warning at the end of ``train()``
      (:attr:`skipped_examples` holds the descriptions);
    - ``compute_metrics`` defaults to :func:`retrieval_metrics` with the directions named after the eval data
      (``eval_t2i_R@1``, ``eval_i2t_R@1``, ``eval_mean_R@1``: use one as ``metric_for_best_model`` with
      ``load_best_model_at_end=True`` to keep the checkpoint with the best retrieval), and ``query_states`` are not
      collected;
    - weight decay (``TrainingArguments.weight_decay``) applies to the queries and a projection head's weight,
      never to ``logit_scale`` (decaying log(1 / temperature) would pull the temperature towards 1);
    - ``micro_batch_size=`` turns on GradCache (:mod:`slq_hf.training.gradcache`): the contrastive batch is
      ``per_device_train_batch_size`` (times the number of processes), embedded ``micro_batch_size`` examples at a
      time, with the exact gradient of the whole batch;
    - a contrastive batch of 1 is refused (no negatives: the loss is 0 and nothing is learned); a batch in which
      every example is unloadable (``strict=False``), or that is one pair without hard negatives (a last partial
      batch), is skipped and counted (:attr:`skipped_steps`), on every rank at once under torchrun;
    - checkpoints are atomic: ``checkpoint-N`` is written in a staging folder and renamed once complete (queries,
      optimizer, scheduler, RNG and trainer state), so a run killed at any moment leaves only complete checkpoints
      and ``resume_from_checkpoint=True`` (``slq-hf train --resume-from-checkpoint latest``) continues exactly.
    """

    def __init__(self, *args, micro_batch_size: int | None = None, **kwargs):
        # The directions evaluation reports R@1 for (``eval_<d>_R@1``); None when the caller gave compute_metrics.
        self.retrieval_directions: tuple[str, str] | None = None
        if kwargs.get("compute_metrics") is None:
            self.retrieval_directions = _directions(kwargs.get("eval_dataset"))
            kwargs["compute_metrics"] = functools.partial(retrieval_metrics, directions=self.retrieval_directions)
        super().__init__(*args, **kwargs)
        contrastive = self.args.per_device_train_batch_size * self.args.world_size
        if contrastive < 2:
            raise ValueError(f"The contrastive batch is {contrastive} pair(s) (per_device_train_batch_size="
                             f"{self.args.per_device_train_batch_size} x {self.args.world_size} process(es)): every "
                             "pair needs the others as negatives, and with one pair the loss is 0 and nothing is "
                             "learned. Use a batch of at least 2 (the paper uses 32 a device); when a large batch "
                             "does not fit in memory, set micro_batch_size (GradCache).")
        if micro_batch_size is not None:
            if not isinstance(self.data_collator, SLQDataCollator):
                raise ValueError("micro_batch_size (GradCache) needs an SLQDataCollator as data_collator.")
            self.data_collator.micro_batch_size = micro_batch_size
        self.micro_batch_size = micro_batch_size
        self.skipped_steps = 0
        if isinstance(self.data_collator, SLQDataCollator):
            self.data_collator.report_skips_in_batch = True
            if self.data_collator.max_length is None and hasattr(self.model, "max_prompt_length"):
                # Same truncation rule as SLQModel.encode: texts are cut so prompt + queries fit the backbone.
                self.data_collator.max_length = self.model.max_prompt_length()
        self.skipped_examples: dict[str, list[str]] = {"train": [], "eval": []}

    # The SLQ collator needs the raw example columns; the Trainer's column filtering would drop all of them.
    def _remove_unused_columns(self, dataset, description: str | None = None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description: str | None = None):
        return data_collator

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs.pop(ROWS_KEY, None)
        skipped = inputs.pop(SKIPPED_KEY, None)
        if skipped:
            self.skipped_examples["train" if self.model.training else "eval"].extend(skipped)
        return super()._prepare_inputs(inputs)

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if self._skip_step(inputs):
            unwrapped = self.accelerator.unwrap_model(model)
            if (self.args.world_size > 1 and self.micro_batch_size is None and self.accelerator.sync_gradients
                    and any(p.grad is not None for p in unwrapped.parameters() if p.requires_grad)):
                # DDP averages a gradient-accumulation window's gradients in the backward of its last batch; when
                # that batch is skipped, average them here, or every rank steps with its own and their queries part.
                _average_gradients(unwrapped)
            return torch.zeros((), device=self.args.device)
        if MICRO_BATCHES_KEY not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            # As the Trainer's own step does: schedule-free optimizers are switched to eval mode by evaluate() and
            # must be switched back (they refuse to step, or step from the wrong point, otherwise).
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        with self.compute_loss_context_manager():
            # Around the DDP wrapper: gradcache_backward averages the gradients across ranks itself.
            loss, _ = gradcache_backward(self.accelerator.unwrap_model(model), inputs[MICRO_BATCHES_KEY], scale)
        return loss * scale

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        with self._quiet_model_logger(model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_query_sets(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        with self._quiet_model_logger():
            super()._load_best_model()
        self._load_query_sets(self.state.best_model_checkpoint)

    @contextlib.contextmanager
    def _quiet_model_logger(self, model=None):
        # load_state_dict warns that the other query sets keep their values; _load_query_sets restores them next.
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        model_logger = logging.getLogger(type(model).__module__)
        level = model_logger.level
        model_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            model_logger.setLevel(level)

    def _load_query_sets(self, folder: str, model=None) -> None:
        """The Trainer restores a checkpoint's model.safetensors (the default set, the temperature); the other query
        sets are in its query_sets/ folder. Copied in place, so the optimizer's state still belongs to them."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        for name in getattr(model, "query_sets", [])[1:]:
            if not os.path.isfile(os.path.join(folder, query_set_file(name))):
                raise ValueError(f"{folder}: the model has query set {name!r} but the checkpoint does not; resume "
                                 "with the query sets the run was started with.")
            model.load_query_set(folder, name=name, query_set=name)

    def get_decay_parameter_names(self, model) -> list[str]:
        # logit_scale is log(1 / temperature), not a weight: decaying it would pull the temperature towards 1 (CLIP
        # and open_clip exclude it too). Weight decay applies to the queries (and a projection head's weight).
        names = super().get_decay_parameter_names(model)
        if not self.args.weight_decay:  # nothing decays: the Trainer's own groups, as in checkpoints of earlier runs
            return names
        return [name for name in names if name.split(".")[-1] != "logit_scale"]

    def _skip_step(self, inputs: dict[str, Any]) -> bool:
        """True when this batch (or, under torchrun, any rank's batch) lost every example, or when the whole
        contrastive batch is one pair without hard negatives (a last batch of ``N % batch == 1``): nothing to contrast
        it with, so its loss and gradient are 0, yet an optimizer step would still move the queries (momentum, weight
        decay). All ranks skip together, so the collectives of the loss and of DDP stay in step."""
        batches = inputs.get(MICRO_BATCHES_KEY) or ([inputs] if "input_ids" in inputs else [])
        pairs = sum(int(batch["input_ids"].shape[0]) for batch in batches)
        negatives = any("negative_input_ids" in batch for batch in batches)
        empty = pairs == 0
        if self.args.world_size > 1:
            import torch.distributed as dist

            flags = torch.tensor([int(empty), int(negatives)], device=self.args.device)
            total = torch.tensor([pairs], device=self.args.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            any_empty, negatives, pairs = bool(flags[0].item()), bool(flags[1].item()), int(total.item())
        else:
            any_empty = empty
        alone = pairs == 1 and not negatives
        if any_empty or alone:
            self.skipped_examples["train"].extend(inputs.pop(SKIPPED_KEY, None) or [])
            self.skipped_steps += 1
            reason = ("every example of the batch could not be loaded" if empty else
                      "another process's batch lost every example" if any_empty else
                      "the batch holds one pair and no hard negative, so there is nothing to contrast it with")
            logger.warning("Step %d skipped: %s", self.state.global_step + 1, reason)
        return any_empty or alone

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        if MICRO_BATCHES_KEY in inputs or self.args.world_size > 1:
            return self._micro_batched_prediction_step(model, inputs, prediction_loss_only)
        if "input_ids" not in inputs:  # every example of this eval batch was unloadable
            self.skipped_examples["eval"].extend(inputs.pop(SKIPPED_KEY, None) or [])
            return None, None, None
        if ignore_keys is None:
            ignore_keys = EVAL_IGNORE_KEYS
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _micro_batched_prediction_step(self, model, inputs, prediction_loss_only: bool):
        """Evaluation from the embeddings: of a GradCache batch's micro-batches, and of every batch under torchrun;
        one loss over the whole (global) batch.

        Returns what the plain path returns for a pair batch: (loss (), (query (B, D), positive (B, D)) of the set
        ``forward`` reports as ``pooler_output`` (the active set, else the first joint set), labels ``()``). The
        Trainer calls ``compute_metrics`` only when labels are not None; the plain path's label-free loss gives an
        empty tuple, so None here would silently drop every recall (and fail the best-checkpoint selection).

        Under torchrun the Trainer gathers every rank's predictions and drops the padding of the last batch by
        position, so each rank must join the same collectives and return one row per example it was given, whatever
        its batch lost: an example it could not load is a NaN row there (:func:`retrieval_metrics` leaves those
        out), and a batch that lost every example still joins the loss with no rows (B = 0 on that rank)."""
        rows = inputs.pop(ROWS_KEY, None)  # (examples given, positions skipped), from SLQDataCollator
        self.skipped_examples["eval"].extend(inputs.pop(SKIPPED_KEY, None) or [])
        model = self.accelerator.unwrap_model(model)
        batches = []
        if MICRO_BATCHES_KEY in inputs or "input_ids" in inputs:
            inputs = self._prepare_inputs(inputs)
            batches = inputs.get(MICRO_BATCHES_KEY) or [inputs]
        distributed = self.args.world_size > 1
        total = torch.tensor([sum(int(b["input_ids"].shape[0]) for b in batches)], device=self.args.device)
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(total)
        if not total.item():  # on every rank at once
            return None, None, None
        query_sets = list(getattr(model, "joint_query_sets", None) or []) or None
        no_rows = torch.zeros(0, model.config.embedding_dim, device=self.args.device)
        embeddings: dict[str, dict[str, list[torch.Tensor]]] = {
            side: {name: [no_rows] for name in query_sets or [""]} for side in ("query", "positive")}
        with torch.no_grad():
            for batch in batches:
                for side in ("query", "positive", "negative"):
                    if (side_batch := side_inputs(batch, side)) is not None:
                        for name, emb in embed_side(model, side_batch, query_sets).items():
                            embeddings.setdefault(side, {}).setdefault(name, []).append(emb.float())
            whole = {side: {name: torch.cat(parts) for name, parts in sets.items()}
                     for side, sets in embeddings.items()}
            loss, _ = contrastive_loss(whole, model.logit_scale)
        if prediction_loss_only:
            return loss, None, None
        names = list(whole["query"])
        active = getattr(model, "active_query_set", None)
        main = active if active in names else names[0]  # SLQModel.forward's choice of pooler_output
        query, positive = whole["query"][main], whole["positive"][main]
        if distributed and rows is not None:
            count, skipped = rows
            loaded = torch.tensor([i for i in range(count) if i not in set(skipped)], dtype=torch.long,
                                  device=query.device)
            query, positive = (torch.full((count, t.shape[1]), float("nan"), device=t.device).index_copy_(0, loaded, t)
                               for t in (query, positive))
        return loss, (query, positive), ()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # One atomic folder save (model, processor files, training_args.bin): a failed or killed save leaves the
        # previous folder as it was, and a folder holding another model (e.g. the backbone) is refused untouched.
        if not self.args.should_save:
            return super()._save(output_dir, state_dict)
        target = output_dir if output_dir is not None else self.args.output_dir
        write_folder(target, lambda staging: super(SLQTrainer, self)._save(str(staging), state_dict))

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being saved, the Trainer's own save code writes into the staging folder.
        staging = getattr(self, "_checkpoint_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written to ``<run>/.checkpoint-staging/checkpoint-N`` and renamed to
        ``<run>/checkpoint-N`` only when every file (and every rank's RNG state) is on disk."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # leftovers of a run killed while saving
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every rank has written its files (rng_state_<rank>.pth)
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            replace_folder(os.path.join(staging_root, name), final)  # one step, even when the step is saved again
            shutil.rmtree(staging_root, ignore_errors=True)
            if self._repoint_best_checkpoint(run_dir, staging_root):
                state_file = os.path.join(final, "trainer_state.json")
                self.state.save_to_json(state_file + ".tmp")
                os.replace(state_file + ".tmp", state_file)
            # The Trainer rotated inside the staging folder (a no-op there); rotate among the real checkpoints.
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save_rng_state(self, output_dir: str) -> None:
        # The main process writes the checkpoint's model files as one folder swapped in when complete; another rank's
        # rng_state_<rank>.pth written into the folder meanwhile went with the replaced one (lost in most checkpoints
        # of a 2-process run). Every rank writes its RNG state only once that folder is in place.
        self.accelerator.wait_for_everyone()
        super()._save_rng_state(output_dir)

    def _repoint_best_checkpoint(self, run_dir: str, staging_root: str) -> bool:
        """The Trainer looked for the best checkpoint inside the staging folder; point at the real folder instead.
        Returns True when ``state.best_model_checkpoint`` changed."""
        before = self.state.best_model_checkpoint
        best_step = self.state.best_global_step
        if best_step and os.path.isdir(best := os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")):
            self.state.best_model_checkpoint = best
        elif before and before.startswith(staging_root):
            self.state.best_model_checkpoint = None
        return self.state.best_model_checkpoint != before

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        self._report_skipped("train")
        if self.skipped_steps:
            logger.warning("%d training step(s) were skipped: a batch lost every example, or held one pair only.",
                           self.skipped_steps)
        return result

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        skipped = len(self.skipped_examples["eval"])
        self._report_skipped("eval")
        if self.retrieval_directions and skipped and not any(key.endswith("_R@1") for key in metrics):
            # Otherwise the run would go on with no recall to log or to pick the best checkpoint by.
            raise ValueError(f"None of the evaluation examples could be loaded ({skipped} skipped, listed in the "
                             "warning above), so no recall was computed. Fix or replace the eval data (e.g. "
                             "--eval-data).")
        return metrics

    def _report_skipped(self, phase: str) -> None:
        skipped = self.skipped_examples[phase]
        if not skipped:
            return
        rank = f" on rank {self.args.process_index}" if self.args.world_size > 1 else ""
        shown = "\n  ".join(skipped[:10]) + ("\n  ..." if len(skipped) > 10 else "")
        logger.warning("%d %s example(s) could not be loaded and were skipped%s:\n  %s", len(skipped), phase, rank,
                       shown)
        self.skipped_examples[phase] = []


def _directions(eval_dataset: Any) -> tuple[str, str]:
    """Metric direction names from the first eval example (default names when there is none to look at)."""
    try:
        dataset = next(iter(eval_dataset.values())) if isinstance(eval_dataset, dict) else eval_dataset
        return metric_directions(dataset[0])
    except (TypeError, IndexError, KeyError, ValueError, StopIteration):
        return "query2positive", "positive2query"


def trainable_parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters the optimizer will update (queries + temperature [+ head] for an SLQModel)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
