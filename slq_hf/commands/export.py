"""`slq-hf export`: turn a saved SLQ folder into a hub-ready folder with a filled-in model card."""

from __future__ import annotations

import argparse

from .reporting import report

DESCRIPTION = """\
Make a hub-ready copy of a saved SLQ folder (from save_pretrained, the Trainer or `slq-hf convert-reference`).
The backbone is NOT loaded or copied. HUB_DIR gets:
  config.json            backbone id and revision pinned, slq_hf/transformers/torch versions stamped
  model.safetensors      the queries (+ temperature, optional head) only, checked against config.json
  *.py                   the SLQ modeling code, for AutoModel.from_pretrained(..., trust_remote_code=True)
  processor files        tokenizer, image processor, chat template
  sentence-transformers  modules.json, sentence_bert_config.json, config_sentence_transformers.json
  README.md              the model card, rendered from the MODEL_CARD.md template shipped with slq_hf
Everything else in DIR (optimizer state, training arguments, checkpoints) is left out.

The card's evaluation section and model-index hold exactly the numbers in --eval-results (one or several JSON
files `slq-hf eval --output` writes, e.g. explicit and knowledge captions; recall values are fractions, shown as
percent). Without it the card says that no evaluation results were provided: no number is ever made up. The
training section shows what `slq-hf train` recorded in DIR/training_summary.json (else the newest
checkpoint-*/trainer_state.json), or --training-info.
"""

EPILOG = """\
example:
  slq-hf eval --model runs/slq-qwen3vl-2b --data flickr30k/dataset_flickr30k.json --output results.json
  slq-hf export runs/slq-qwen3vl-2b --out hub/slq-qwen3vl-2b --eval-results results.json karr.json \\
      --backbone Qwen/Qwen3-VL-2B-Instruct --backbone-revision <commit> --repo-id my-org/slq-qwen3vl-2b
  slq-hf push hub/slq-qwen3vl-2b --repo-id my-org/slq-qwen3vl-2b
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="make a hub-ready folder (queries only + model card)",
                                   description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("model_dir", metavar="DIR", help="saved SLQ folder (config.json + model.safetensors)")
    parser.add_argument("--out", required=True, metavar="HUB_DIR", help="folder to write (new or empty)")
    parser.add_argument("--eval-results", metavar="JSON", nargs="+", action="extend",
                        help="results JSON file(s) from `slq-hf eval --output`; all of them reach the card")
    parser.add_argument("--training-info", metavar="JSON",
                        help="JSON object of training facts for the card (dataset, steps, learning_rate...); "
                             "default: what `slq-hf train` recorded in DIR")
    parser.add_argument("--backbone", metavar="ID", help="re-pin the backbone Hub id (e.g. replace a local path)")
    parser.add_argument("--backbone-revision", metavar="REV", help="pin the backbone revision (a commit sha)")
    parser.add_argument("--repo-id", metavar="ORG/NAME", help="Hub id the card's usage snippets load")
    parser.add_argument("--model-name", help="title of the model card (default: name of HUB_DIR)")
    parser.add_argument("--license", help="licence id for the card (default: placeholder pointing at the backbone's)")
    parser.add_argument("--template", metavar="PATH",
                        help="model card template (default: the MODEL_CARD.md that ships with slq_hf)")
    parser.add_argument("--overwrite", action="store_true", help="replace HUB_DIR if it holds a previous export")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub import export

    def done(files: list[str]) -> None:
        print(f"Exported {args.model_dir} -> {args.out} ({len(files)} files):")
        print("".join(f"  {name}\n" for name in files), end="")

    return report("export", lambda: export(
        args.model_dir, args.out, eval_results=args.eval_results, training_info=args.training_info,
        backbone=args.backbone, backbone_revision=args.backbone_revision, repo_id=args.repo_id,
        model_name=args.model_name, license=args.license, template=args.template, overwrite=args.overwrite,
    ), done)
