"""`slq-hf train`: train SLQ latent queries on a frozen backbone from a JSONL file of pairs."""

from __future__ import annotations

import argparse
import json
import math
import os

from .common import check_model_source

DESCRIPTION = """\
Train SLQ latent queries on a FROZEN vision-language backbone with symmetric InfoNCE (the paper's recipe:
--lr 5e-4, 1 epoch, 32 pairs a device; under torchrun, negatives are gathered from all devices). Only the
queries and the temperature are trained; --output-dir receives a queries-only SLQ folder (a few hundred KB)
that loads with AutoModel.from_pretrained / SentenceTransformer, plus checkpoint-* folders that
--resume-from-checkpoint continues from.

Training data (--train-data, --eval-data): a JSONL file, one pair per line; image paths are relative to the file:
  {"image": "images/0001.jpg", "text": "a dog running on a beach"}
  {"query": "a red car", "positive": {"image": "cars/17.jpg"}, "negative": {"image": "cars/18.jpg"}}
  {"query": {"image": "ref.jpg", "text": "same shirt in blue"}, "positive": {"image": "target.jpg"}}
An item is a text string, {"image": path} or {"image": path, "text": str}; "negative" (a hard negative) is
optional. A folder saved with datasets' save_to_disk (columns --image-column/--text-column) also works, and
so does a Karpathy-split JSON (dataset_coco.json): it trains on its train split (with restval) and evaluates on
its val split unless --split / --eval-split say otherwise, so its test images never reach training.
Unreadable images are skipped and counted (a warning at the end) unless --strict is given; an image file
missing from --eval-data is an error before training (it would make the held-out set silently smaller).
"""

EPILOG = """\
recipes (what they measured is in the README's "Training" section):
  # the paper's recipe on a real backbone (Qwen3-VL-2B: 85.8 / 76.4 Flickr30K R@1 i2t / t2i in the paper)
  slq-hf train --backbone Qwen/Qwen3-VL-2B-Instruct --train-data coco_train.jsonl --output-dir slq-qwen3vl-2b \\
      --num-queries 40 --epochs 1 --lr 5e-4 --batch-size 32 --eval-data coco_val.jsonl
  # the toy backbone (examples/toy/backbone), several epochs over a fixed corpus
  slq-hf train --backbone examples/toy/backbone --train-data toy/train.jsonl --eval-data toy/validation.jsonl \\
      --output-dir slq-toy --num-queries 8 --lr 3e-2 --max-steps 1000 --warmup 50 --batch-size 32 --eval-steps 100 \\
      --weight-decay 1.0
  torchrun --nproc_per_node 8 -m slq_hf.cli train ...      # 8 GPUs, 8 x 32 negatives per step
  slq-hf train ... --batch-size 256 --micro-batch-size 32  # GradCache: 256 negatives, memory of 32
  slq-hf train ... --load-in-4bit                          # NF4 backbone (bitsandbytes), fp32 queries
"""

# --metric-for-best-model's default: SLQTrainer's mean of the two Recall@1 directions.
DEFAULT_METRIC = "mean_R@1"
SCHEDULERS = ["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "warmup_stable_decay"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _finite_float(text: str) -> float:
    # float() reads "inf": --lr inf saved Inf/NaN queries with exit status 0, --epochs inf crashed inside the Trainer.
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train SLQ queries on a frozen backbone (JSONL pairs)",
                                   description=DESCRIPTION, epilog=EPILOG)
    need = parser.add_argument_group("required")
    need.add_argument("--backbone", required=True, metavar="ID_OR_PATH",
                      help="Hub id or local folder of the vision-language backbone (e.g. Qwen/Qwen3-VL-2B-Instruct)")
    need.add_argument("--train-data", required=True, metavar="PATH", help="JSONL file of training pairs (see above)")
    need.add_argument("--output-dir", required=True, metavar="DIR", help="where the SLQ folder and checkpoints go")
    model = parser.add_argument_group("model")
    model.add_argument("--num-queries", type=_positive_int, default=40, help="latent queries N_q (default: 40)")
    model.add_argument("--temperature", type=_positive_float, default=0.07,
                       help="initial softmax temperature, learned during training (default: 0.07)")
    model.add_argument("--pooling", default="mean", choices=["mean", "last"],
                       help="embedding = mean of the query states (default, the paper) or the last query's state")
    model.add_argument("--query-init", default="normal", choices=["normal", "vocab"],
                       help="initial queries: small normal noise (default) or rows of the backbone's token embeddings")
    model.add_argument("--projection-dim", type=_positive_int, default=None, metavar="D",
                       help="add a trainable linear head to D dimensions (default: none, embedding = hidden size)")
    model.add_argument("--load-in-4bit", action="store_true",
                       help="load the backbone in 4-bit NF4 (bitsandbytes); queries stay fp32")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="backbone weight dtype (default: auto = as saved on a GPU, float32 on the CPU, where "
                       "bfloat16 matmuls are slower); queries are always fp32")
    model.add_argument("--training-path", default="prefix_cache", choices=["prefix_cache", "full"],
                       help="prefix_cache (default: prompt without grad, only the queries with grad) or full")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_float, default=1.0, help="epochs over --train-data (default: 1)")
    # -1 (the default, also what earlier runs recorded in slq_run.json) means "run --epochs"; 0 or another negative
    # number would silently save untrained queries or fall back to --epochs.
    train.add_argument("--max-steps", type=_positive_int, default=-1,
                       help="stop after this many steps (overrides --epochs; default: run --epochs)")
    train.add_argument("--lr", type=_positive_float, default=5e-4, help="learning rate (default: 5e-4)")
    train.add_argument("--batch-size", type=_positive_int, default=32,
                       help="contrastive batch per device: pairs per step, each a negative for the others; under "
                       "torchrun the negatives of every device are gathered (default: 32; at least 2 in all)")
    train.add_argument("--micro-batch-size", type=_positive_int, default=None, metavar="N",
                       help="GradCache: embed the --batch-size pairs N at a time (memory of N pairs, the exact "
                       "gradient of the whole batch, about 1.3x-2x the compute); default: the whole batch at once")
    train.add_argument("--lr-scheduler", default="cosine", choices=SCHEDULERS,
                       help="learning-rate schedule after the warmup (default: cosine, to zero)")
    train.add_argument("--warmup", type=_non_negative_float, default=0.0,
                       help="linear warmup: a fraction of the steps if < 1, else a step count (default: 0)")
    train.add_argument("--weight-decay", type=_non_negative_float, default=0.0,
                       help="AdamW weight decay on the queries (and a --projection-dim head's weight), never on the "
                       "temperature (default: 0, the paper's single epoch; for several epochs over the same data, 1.0 "
                       "keeps the queries generalising)")
    train.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    train.add_argument("--save-steps", type=_positive_int, default=500,
                       help="checkpoint every N steps (default: 500; with --eval-data, every --eval-steps)")
    train.add_argument("--save-total-limit", type=_positive_int, default=None, metavar="N",
                       help="keep only the N newest checkpoints (and the best one); default: keep all")
    train.add_argument("--overwrite-output-dir", action="store_true",
                       help="start a new run in an --output-dir that holds an earlier run: its checkpoints and model "
                       "wait in .slq-earlier-run/ and are deleted once the new run is saved, or come back if it fails "
                       "(without this, such a folder is refused unless resuming)")
    train.add_argument("--logging-steps", type=_positive_int, default=10, help="log every N steps (default: 10)")
    train.add_argument("--resume-from-checkpoint", metavar="DIR", default=None,
                       help="continue the run in --output-dir from one of its checkpoint-* folders ('latest': the "
                       "newest); the settings must be the run's own")
    train.add_argument("--dataloader-num-workers", type=_non_negative_int, default=0,
                       help="processes that load images (default: 0 = in the training process)")
    train.add_argument("--use-cpu", action="store_true", help="train on the CPU even when a GPU is available")
    data = parser.add_argument_group("data")
    data.add_argument("--eval-data", metavar="PATH", default=None,
                      help="held-out pairs: Recall@1 both ways (eval_t2i_R@1, eval_i2t_R@1, eval_mean_R@1) every "
                      "--eval-steps; the best checkpoint by --metric-for-best-model becomes the final model")
    data.add_argument("--split", metavar="NAME", default=None,
                      help="the split of --train-data to train on: a JSONL file's \"split\" value, a datasets split "
                      "or a Karpathy split ('all': every line; default: every line, for a Karpathy JSON its train "
                      "split with restval)")
    data.add_argument("--eval-split", metavar="NAME", default=None,
                      help="the same for --eval-data (default: every line, for a Karpathy JSON its val split)")
    data.add_argument("--eval-steps", type=_positive_int, default=None, metavar="N",
                      help="evaluate (and checkpoint) every N steps (default: --save-steps)")
    data.add_argument("--metric-for-best-model", default=DEFAULT_METRIC, metavar="NAME",
                      help="eval metric that picks the final model: a recall, higher is better (default: mean_R@1, "
                      "the mean of both directions; e.g. t2i_R@1), or loss, lower is better")
    data.add_argument("--keep-last", action="store_true",
                      help="with --eval-data: keep the last step's queries instead of the best checkpoint's")
    data.add_argument("--strict", action="store_true",
                      help="check every example before step 1 and stop at the first unreadable one (default: skip "
                      "and count unreadable examples)")
    data.add_argument("--image-column", help="image column of a save_to_disk folder (default: image)")
    data.add_argument("--text-column", help="text column of a save_to_disk folder (default: text)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .reporting import report

    return report("train", lambda: train(args))


def train(args: argparse.Namespace) -> dict:
    """The whole command; returns the training summary (also written to ``<output-dir>/training_summary.json``)."""
    import time

    import torch
    from transformers import AutoProcessor, TrainingArguments

    from slq_hf import SLQModel
    from slq_hf.hub.card import TRAINING_SUMMARY_NAME
    from slq_hf.training import SLQDataCollator, SLQTrainer, load_training_data
    from slq_hf.training.run import (
        RUN_FILE,
        PlanPrinter,
        check_output_dir,
        check_strict,
        drop_earlier_run,
        earlier_run,
        restore_earlier_run,
        resume_checkpoint,
        set_aside_earlier_run,
        write_run_file,
    )

    started = time.time()
    check_options_apply(args)
    resume = resume_checkpoint(args.output_dir, args.resume_from_checkpoint, run_settings(args))
    check_output_dir(args.output_dir, args.backbone, resuming=resume is not None, overwrite=args.overwrite_output_dir)
    columns = (args.image_column or "image", args.text_column or "text")
    train_data = load_training_data(args.train_data, *columns, split=_split(args.train_data, args.split, "train"))
    # Held-out data is read like `slq-hf eval` reads it: a missing image is an error now, not a smaller eval set.
    eval_data = load_training_data(args.eval_data, *columns, split=_split(args.eval_data, args.eval_split, "val"),
                                   check_files=True) if args.eval_data else None

    use_cpu = args.use_cpu or not torch.cuda.is_available()
    backbone_kwargs = {}
    if args.dtype != "auto":
        backbone_kwargs["dtype"] = getattr(torch, args.dtype)
    elif use_cpu and not args.load_in_4bit:
        backbone_kwargs["dtype"] = torch.float32  # bf16 matmuls on a CPU are slower than fp32 ones
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = backbone_kwargs.get("dtype", torch.float32 if use_cpu else torch.bfloat16)
        backbone_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        if not use_cpu:
            # Quantize straight onto this process's GPU (torchrun sets LOCAL_RANK), not on the CPU first.
            backbone_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    # The processor first: --strict checks every file before the (possibly large) backbone is loaded.
    check_model_source(args.backbone, "--backbone")
    processor = AutoProcessor.from_pretrained(args.backbone)
    collator = SLQDataCollator(processor, strict=args.strict)
    if args.strict:
        check_strict(train_data, collator, "--train-data")
        if eval_data is not None:
            check_strict(eval_data, collator, "--eval-data")
    model = SLQModel.from_backbone(args.backbone, num_queries=args.num_queries, temperature=args.temperature,
                                   training_path=args.training_path, pooling=args.pooling, processor=processor,
                                   query_init=args.query_init, projection_dim=args.projection_dim, **backbone_kwargs)

    evaluating = eval_data is not None
    eval_steps = args.eval_steps or args.save_steps
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        weight_decay=args.weight_decay,
        per_device_train_batch_size=args.batch_size,
        # The eval loss of a contrastive batch depends on its size, so evaluation uses --batch-size with or without
        # GradCache (the collator splits eval batches into micro-batches too: the memory stays that of one).
        per_device_eval_batch_size=args.batch_size,
        warmup_steps=args.warmup,
        seed=args.seed,
        # Best-checkpoint selection needs a checkpoint at every evaluation.
        save_steps=eval_steps if evaluating else args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=eval_steps if evaluating else None,
        load_best_model_at_end=evaluating and not args.keep_last,
        metric_for_best_model=f"eval_{args.metric_for_best_model.removeprefix('eval_')}" if evaluating else None,
        greater_is_better=_greater_is_better(args.metric_for_best_model) if evaluating else None,
        logging_steps=args.logging_steps,
        dataloader_num_workers=args.dataloader_num_workers,
        remove_unused_columns=False,
        # Every trainable tensor (queries, temperature) is used in every step: skip DDP's unused-parameter search.
        ddp_find_unused_parameters=False,
        report_to="none",
        use_cpu=use_cpu,
        # The embeddings of the last, smaller batch still see all of its in-batch negatives; nothing to drop.
        dataloader_drop_last=False,
    )
    plan = PlanPrinter(args, len(train_data), len(eval_data) if evaluating else 0, resume)
    trainer = SLQTrainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                         data_collator=collator, micro_batch_size=args.micro_batch_size, callbacks=[plan])
    if evaluating:
        reported = {f"{d}_R@1" for d in trainer.retrieval_directions or ()} | {"mean_R@1", "loss"}
        if training_args.metric_for_best_model.removeprefix("eval_") not in reported:
            raise ValueError(f"--metric-for-best-model {args.metric_for_best_model}: this eval data reports "
                             f"{sorted(reported)}.")
    main_process = trainer.is_world_process_zero()
    try:
        if main_process and resume is None:
            if args.overwrite_output_dir:  # only now: every check above passed
                set_aside_earlier_run(args.output_dir)
            write_run_file(args.output_dir, run_settings(args))
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
    except BaseException:  # Ctrl-C too: an overwritten run comes back when the new one does not finish
        if main_process and args.overwrite_output_dir:
            restore_earlier_run(args.output_dir)
        elif main_process and resume is None and earlier_run(args.output_dir) == [RUN_FILE]:
            # Stopped before its first checkpoint: nothing to resume, and a lone run file would make the same command
            # refuse this folder as "an earlier run" whose --resume-from-checkpoint then finds no checkpoint.
            os.remove(os.path.join(args.output_dir, RUN_FILE))
        raise
    if main_process:
        drop_earlier_run(args.output_dir)
    summary = {
        "output_dir": args.output_dir, "backbone": args.backbone, "steps": result.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4), "train_loss": result.training_loss,
        "contrastive_batch": args.batch_size * training_args.world_size, "micro_batch_size": args.micro_batch_size,
        "batch_size_per_device": args.batch_size, "processes": training_args.world_size, "lr": args.lr,
        "lr_scheduler": args.lr_scheduler, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "num_queries": args.num_queries, "pooling": args.pooling, "query_init": args.query_init,
        "projection_dim": args.projection_dim, "seed": args.seed,
        "train_data": {"path": str(args.train_data), "examples": len(train_data)},
        "eval_data": {"path": str(args.eval_data), "examples": len(eval_data)} if evaluating else None,
        "temperature": float(1.0 / model.logit_scale.detach().float().exp().clamp(max=1e6)),
        "skipped_steps": trainer.skipped_steps, "resumed_from": resume,
        "seconds": round(time.time() - started, 1),
    }
    if evaluating:
        summary["best_metric"] = {"name": training_args.metric_for_best_model,
                                  "value": trainer.state.best_metric,
                                  # the folder name only: the card shows the summary, not this machine's paths
                                  "checkpoint": os.path.basename(trainer.state.best_model_checkpoint or "") or None,
                                  "used_for_final_model": not args.keep_last}
        summary["final_eval"] = trainer.evaluate()
    if trainer.is_world_process_zero():
        from slq_hf.training.run import write_json

        # Written next to the final model; `slq-hf export` / the model card read it under the same name.
        write_json(os.path.join(args.output_dir, TRAINING_SUMMARY_NAME), summary)
        print(json.dumps(summary, indent=2))
    # Under torchrun: end the process group the Trainer started. Left alive, gloo's threads can outlive the
    # interpreter and abort a finished run at exit (SIGABRT), which torchrun reports as a failure.
    trainer.accelerator.end_training()
    return summary


def check_options_apply(args: argparse.Namespace) -> None:
    """Refuse options that would be silently ignored or contradict each other: evaluation settings without
    --eval-data, column names without a datasets folder to read them from, resuming and overwriting the same run, a
    GradCache micro-batch that is the whole batch."""
    eval_only = (("--eval-steps", args.eval_steps, None), ("--keep-last", args.keep_last, False),
                 ("--metric-for-best-model", args.metric_for_best_model, DEFAULT_METRIC))
    unused = [flag for flag, value, default in eval_only if value != default and not args.eval_data]
    if unused:
        raise ValueError(f"{', '.join(unused)} only apply with --eval-data (held-out pairs to evaluate on); add "
                         "--eval-data PATH or drop them.")
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        raise ValueError("--resume-from-checkpoint continues the run in --output-dir, --overwrite-output-dir deletes "
                         "it to start over: pass one of them.")
    if args.micro_batch_size is not None and args.micro_batch_size >= args.batch_size:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size} is not smaller than --batch-size "
                         f"{args.batch_size}: GradCache would embed the whole batch at once, twice (no memory saved, "
                         "double the compute). Use a smaller --micro-batch-size, or drop it.")
    columns = [flag for flag, value in (("--image-column", args.image_column), ("--text-column", args.text_column))
               if value is not None]
    if columns and not any(path and os.path.isdir(path) for path in (args.train_data, args.eval_data)):
        raise ValueError(f"{', '.join(columns)} name columns of a datasets folder (save_to_disk); --train-data and "
                         "--eval-data are files, whose keys are fixed (see `slq-hf train --help`).")


def _greater_is_better(metric: str) -> bool:
    """Recalls are better high, the eval loss low (transformers' own rule for ``metric_for_best_model``)."""
    return not metric.endswith("loss")


def _split(path: str, given: str | None, karpathy_default: str) -> str | None:
    """The split to read from ``path``: as given ('all': every line), else every line, except that a Karpathy JSON
    reads ``karpathy_default`` (it holds train, restval, val and test: all of them would train on the test set)."""
    from slq_hf.data import detect_format

    if given is not None:
        return None if given == "all" else given
    return karpathy_default if detect_format(path) == "karpathy" else None


def run_settings(args: argparse.Namespace) -> dict:
    """What defines a run: a resumed run must have the same (data, model and optimisation settings).

    Not ``micro_batch_size``: GradCache gives the whole batch's gradient at any micro-batch size, so a run that ran out
    of memory may resume with a smaller one (earlier runs' slq_run.json still records it; only keys named here are
    compared)."""
    keys = ("backbone", "train_data", "num_queries", "pooling", "query_init", "projection_dim", "training_path",
            "batch_size", "lr", "lr_scheduler", "warmup", "weight_decay", "epochs", "max_steps",
            "seed", "temperature", "eval_data", "split", "eval_split")
    return {key: str(getattr(args, key)) if key in ("backbone", "train_data", "eval_data") else getattr(args, key)
            for key in keys}
