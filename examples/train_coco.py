"""The paper's SLQ recipe on COCO: Qwen3-VL-2B, Karpathy train captions, lr 5e-4, 1 epoch, 32 pairs a device.

NEEDS a CUDA GPU (about 10 GB for Qwen3-VL-2B in bf16 with 32 pairs; --load-in-4bit for less) and the data on disk:
- COCO 2014 images: train2014/ and val2014/ under --coco-root (https://cocodataset.org);
- Karpathy's split file ``dataset_coco.json`` (from Karpathy's neuraltalk2 "caption_datasets" archive), whose
  entries carry ``filepath``, ``filename``, ``split`` and five ``sentences`` each.
Nothing is downloaded here.

    # one GPU
    python examples/train_coco.py --coco-root /data/coco --karpathy /data/coco/dataset_coco.json --out slq-qwen3vl-2b
    # 8 GPUs: every step contrasts 8 x 32 = 256 pairs (embeddings are all-gathered with gradient)
    torchrun --nproc_per_node 8 examples/train_coco.py --coco-root /data/coco --karpathy ... --out ...

Training pairs are (image, caption) for every caption of every image in Karpathy's "train" + "restval" splits
(~566k pairs, ~113k images). The held-out pairs are the first caption of each "val" image. Afterwards, evaluate
with ``slq-hf eval`` (COCO-5K, Flickr30K); paper Table 1 on Qwen3-VL-2B: COCO-5K R@1 I->T 62.7 / T->I 50.2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import TrainingArguments

from slq_hf import SLQModel
from slq_hf.training import PairDataset, SLQDataCollator, SLQTrainer


def karpathy_pairs(karpathy_json: Path, coco_root: Path, splits: tuple[str, ...], all_captions: bool) -> PairDataset:
    """(image path, caption) examples from Karpathy's dataset_coco.json; images are opened by the collator."""
    with open(karpathy_json, encoding="utf-8") as handle:
        images = json.load(handle)["images"]
    examples = []
    for entry in images:
        if entry["split"] not in splits:
            continue
        path = str(coco_root / entry["filepath"] / entry["filename"])
        sentences = entry["sentences"] if all_captions else entry["sentences"][:1]
        examples += [{"image": path, "text": s["raw"].strip(), "_source": entry["filename"]} for s in sentences]
    if not examples:
        raise ValueError(f"{karpathy_json}: no images in splits {splits}.")
    return PairDataset(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", type=Path, required=True, help="folder holding train2014/ and val2014/")
    parser.add_argument("--karpathy", type=Path, required=True, help="Karpathy's dataset_coco.json")
    parser.add_argument("--out", default="slq-qwen3vl-2b-coco", help="output folder (queries-only SLQ model)")
    parser.add_argument("--backbone", default="Qwen/Qwen3-VL-2B-Instruct")
    parser.add_argument("--num-queries", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per device (paper: 32)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 backbone (bitsandbytes); fp32 queries")
    parser.add_argument("--workers", type=int, default=8, help="dataloader processes that decode images")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("examples/train_coco.py is the full-size recipe and needs a CUDA GPU. For a CPU run on a "
                         "tiny backbone see the README's Training section (or `slq-hf train --help`).")

    # bf16 backbone weights; the queries and the temperature stay fp32 parameters and the loss runs in fp32.
    backbone_kwargs: dict = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if args.load_in_4bit:
        import os

        from transformers import BitsAndBytesConfig

        backbone_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        backbone_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = SLQModel.from_backbone(args.backbone, num_queries=args.num_queries, **backbone_kwargs)

    train = karpathy_pairs(args.karpathy, args.coco_root, ("train", "restval"), all_captions=True)
    val = karpathy_pairs(args.karpathy, args.coco_root, ("val",), all_captions=False)
    training_args = TrainingArguments(
        output_dir=args.out,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        logging_steps=20,
        save_steps=1000,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=2000,
        dataloader_num_workers=args.workers,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        report_to="none",
    )
    trainer = SLQTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                         data_collator=SLQDataCollator(model.processor))
    trainer.train()
    trainer.save_model()  # args.out: config.json + model.safetensors (queries, temperature) + code + processor
    print(json.dumps(trainer.evaluate(), indent=2))
    trainer.accelerator.end_training()  # under torchrun: close the process group before the interpreter exits


if __name__ == "__main__":
    main()
