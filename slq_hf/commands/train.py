"""`slq-hf train`: train SLQ latent queries on a frozen backbone from a JSONL file of pairs."""

from __future__ import annotations

import argparse
import json
import os

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
optional. A folder saved with datasets' save_to_disk (columns --image-column/--text-column) also works.
Unreadable images are skipped and counted (a warning at the end) unless --strict is given.
"""

EPILOG = """\
examples:
  slq-hf train --backbone Qwen/Qwen3-VL-2B-Instruct --train-data coco_train.jsonl --output-dir slq-qwen3vl-2b \\
      --num-queries 40 --epochs 1 --lr 5e-4 --batch-size 32 --eval-data coco_val.jsonl
  torchrun --nproc_per_node 8 -m slq_hf.cli train ...      # 8 GPUs, 8 x 32 negatives per step
  slq-hf train ... --load-in-4bit                          # NF4 backbone (bitsandbytes), fp32 queries
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train SLQ queries on a frozen backbone (JSONL pairs)",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    need = parser.add_argument_group("required")
    need.add_argument("--backbone", required=True, metavar="ID_OR_PATH",
                      help="Hub id or local folder of the vision-language backbone (e.g. Qwen/Qwen3-VL-2B-Instruct)")
    need.add_argument("--train-data", required=True, metavar="PATH", help="JSONL file of training pairs (see above)")
    need.add_argument("--output-dir", required=True, metavar="DIR", help="where the SLQ folder and checkpoints go")
    model = parser.add_argument_group("model")
    model.add_argument("--num-queries", type=_positive_int, default=40, help="latent queries N_q (default: 40)")
    model.add_argument("--temperature", type=_positive_float, default=0.07,
                       help="initial softmax temperature, learned during training (default: 0.07)")
    model.add_argument("--load-in-4bit", action="store_true",
                       help="load the backbone in 4-bit NF4 (bitsandbytes); queries stay fp32")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="backbone weight dtype (default: auto = as saved); queries are always fp32")
    model.add_argument("--training-path", default="prefix_cache", choices=["prefix_cache", "full"],
                       help="prefix_cache (default: prompt without grad, only the queries with grad) or full")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_float, default=1.0, help="epochs over --train-data (default: 1)")
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    train.add_argument("--lr", type=_positive_float, default=5e-4, help="learning rate (default: 5e-4)")
    train.add_argument("--batch-size", type=_positive_int, default=32,
                       help="pairs per device per step; every pair is a negative for the others (default: 32)")
    train.add_argument("--warmup", type=float, default=0.0,
                       help="linear warmup: a fraction of the steps if < 1, else a step count (default: 0)")
    train.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    train.add_argument("--save-steps", type=_positive_int, default=500, help="checkpoint every N steps (default: 500)")
    train.add_argument("--logging-steps", type=_positive_int, default=10, help="log every N steps (default: 10)")
    train.add_argument("--resume-from-checkpoint", metavar="DIR", default=None,
                       help="continue from a checkpoint-* folder of an earlier run ('latest': the newest one in "
                       "--output-dir)")
    train.add_argument("--dataloader-num-workers", type=int, default=0,
                       help="processes that load images (default: 0 = in the training process)")
    train.add_argument("--use-cpu", action="store_true", help="train on the CPU even when a GPU is available")
    data = parser.add_argument_group("data")
    data.add_argument("--eval-data", metavar="PATH", default=None,
                      help="JSONL of held-out pairs: loss and R@1 (both directions) after training")
    data.add_argument("--strict", action="store_true",
                      help="fail on the first unreadable example instead of skipping and counting it")
    data.add_argument("--image-column", default="image", help="image column of a save_to_disk folder")
    data.add_argument("--text-column", default="text", help="text column of a save_to_disk folder")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TrainingArguments

    from slq_hf import SLQModel
    from slq_hf.training import SLQDataCollator, SLQTrainer, load_training_data

    train_data = load_training_data(args.train_data, args.image_column, args.text_column)
    eval_data = load_training_data(args.eval_data, args.image_column, args.text_column) if args.eval_data else None

    backbone_kwargs = {}
    if args.dtype != "auto":
        backbone_kwargs["dtype"] = getattr(torch, args.dtype)
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = backbone_kwargs.get("dtype", torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        backbone_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        if torch.cuda.is_available() and not args.use_cpu:
            # Quantize straight onto this process's GPU (torchrun sets LOCAL_RANK), not on the CPU first.
            backbone_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = SLQModel.from_backbone(args.backbone, num_queries=args.num_queries, temperature=args.temperature,
                                   training_path=args.training_path, **backbone_kwargs)

    resume = args.resume_from_checkpoint
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
        if resume is None:
            raise SystemExit(f"--resume-from-checkpoint latest: no checkpoint-* folder in {args.output_dir!r}.")

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        warmup_steps=args.warmup,
        seed=args.seed,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        dataloader_num_workers=args.dataloader_num_workers,
        remove_unused_columns=False,
        # Every trainable tensor (queries, temperature) is used in every step: skip DDP's unused-parameter search.
        ddp_find_unused_parameters=False,
        report_to="none",
        use_cpu=args.use_cpu,
        # The embeddings of the last, smaller batch still see all of its in-batch negatives; nothing to drop.
        dataloader_drop_last=False,
    )
    trainer = SLQTrainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                         data_collator=SLQDataCollator(model.processor, strict=args.strict))
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    summary = {"output_dir": args.output_dir, "steps": result.global_step, "train_loss": result.training_loss,
               "temperature": float(1.0 / model.logit_scale.detach().exp())}
    if eval_data is not None:
        summary.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        print(json.dumps(summary, indent=2))
    return 0
