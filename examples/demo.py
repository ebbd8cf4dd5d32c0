"""`make demo`: SLQ's claim end to end, offline, in a few minutes on 2 CPU cores.

The toy backbone (``examples/toy/backbone``: a real Qwen3-VL architecture of 1M parameters, trained by
``examples/toy/train_toy_backbone.py``) captions procedurally drawn scenes and knows facts such as "a triangle is the
shape with three corners" and "red is the colour of blood". On 150 held-out scenes the demo compares:

1. zero-shot last token: the backbone's final hidden state at the last prompt token (the paper's pilot study);
2. SLQ with untrained (random) queries;
3. SLQ: 8 latent queries trained on the FROZEN backbone with explicit captions only, by `slq-hf train` (the
   product's own path: SLQTrainer + SLQDataCollator) on a fixed corpus of 64 drawings per combination, keeping the
   checkpoint with the best validation recall;
4. LoRA r=8 on q,k,v,o with last-token pooling, trained on the same corpus with the same batch size, steps, schedule
   and checkpoint rule;

on text->image and image->text Recall@1 with explicit captions ("a red triangle in the top left") and with knowledge
captions ("the shape with three corners and the colour of blood in the top left") that no method trained on — a
KARR-Bench-style test in miniature. SLQ keeps the backbone untouched, so what it knows still reaches the embedding.

It then saves the SLQ folder (queries only), reloads it through ``AutoModel`` and ``SentenceTransformer`` and checks
the recall is unchanged, and writes the modality-gap figures. Outputs go to ``outputs/demo/``.

    .venv/bin/python examples/demo.py [--steps 1000] [--num-queries 8] [--out outputs/demo]

Extra rows (another method, a reranker) or pictures are one function appended to ``EXTRA_STEPS``: it gets the
demo's state (``DemoState``) and may add rows with ``state.add_row``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

import slq_hf  # noqa: F401  (registers "slq" with AutoConfig/AutoModel)
from slq_hf import SLQModel
from slq_hf.evaluation import RetrievalDataset, evaluate_retrieval
from slq_hf.modeling.modeling_slq import MAX_LOGIT_SCALE
from slq_hf.processing import collate, to_items
from slq_hf.testing.toy_scenes import TRAIN_SEED, Scene, combinations, heldout_scenes
from slq_hf.training import SLQDataCollator, symmetric_infonce

# The demo's sibling scripts (demo_rerank.py, demo_search.py) and examples/toy/corpus.py, also when demo.py is loaded
# by path from elsewhere (the tests do).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "toy")]
from corpus import DRAWINGS_PER_COMBINATION, write_corpus  # noqa: E402  (examples/toy/corpus.py)

TOY_BACKBONE = Path(__file__).resolve().parent / "toy" / "backbone"
CHANCE = 1 / len(combinations())
COLUMNS = [("caption", "t2i"), ("caption", "i2t"), ("knowledge", "t2i"), ("knowledge", "i2t")]


@dataclass
class DemoConfig:
    """Everything the demo's numbers depend on (all seeds pinned)."""

    backbone: str = str(TOY_BACKBONE)
    steps: int = 1000
    batch_size: int = 32
    num_queries: int = 8
    query_init: str = "normal"
    pooling: str = "mean"
    projection_dim: int | None = None
    slq_lr: float = 3e-2
    slq_weight_decay: float = 1.0  # on the queries: 3.3 epochs over one corpus (BENCHMARKS.md "Training recipe")
    temperature: float = 0.07
    lora_rank: int = 8
    lora_lr: float = 3e-3
    warmup: int = 50
    lr_scheduler: str = "cosine"
    eval_steps: int = 100  # validation recall every N steps; the best checkpoint is kept (SLQ and LoRA alike)
    drawings: int = DRAWINGS_PER_COMBINATION  # training corpus: this many drawings of each of the 150 combinations
    seed: int = TRAIN_SEED
    eval_scenes: int | None = None  # None: all 150 held-out scenes (one per combination)
    eval_batch_size: int = 64
    log_every: int = 100
    out: str = "outputs/demo"


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class DemoState:
    """What an extra demo step can use: the loaded backbone and processor, the trained SLQ model, the evaluation sets,
    the config, the output folder, and the table's rows."""

    config: DemoConfig
    out: Path
    backbone: Any
    processor: Any
    slq_model: Any
    datasets: dict
    rows: dict[str, dict[str, Any]]

    def add_row(self, name: str, results: dict[str, dict], params: int = 0, seconds: float | None = None) -> None:
        """Add a method's evaluation (``evaluate(...)`` output) as a table row."""
        self.rows[name] = {**recall_row(results), "params": params, "seconds": seconds}
        log("   " + _short(self.rows[name]))


def rerank_step(state: DemoState) -> None:
    """SLQ's top 10 reranked by the same frozen backbone (``SLQModel.rerank`` through ``evaluate_retrieval``)."""
    from demo_rerank import rerank_rows  # examples/demo_rerank.py

    log("7. Rerank SLQ's top 10 with the same frozen backbone (likelihood of the caption given the image): no "
        "training, no second model")
    for name, row in rerank_rows(state.slq_model, evaluation_scenes(state.config)).items():
        if name == "SLQ":  # the SLQ row above, on the same model and scenes
            continue
        cost = f", {row['ms per query']:.0f} ms per query" if "ms per query" in row else ""
        state.rows[f"{name}{cost}"] = {**{f"{p} {d}": row[f"{p} {d}"] for p, d in COLUMNS}, "params": 0}
        log(f"   {name}: " + _short(row) + cost)


def search_step(state: DemoState) -> None:
    """Index the held-out scenes with the saved SLQ folder, search them in words, save a picture of the hits."""
    from demo_search import run as search  # examples/demo_search.py

    log("8. Index the held-out scenes with the saved SLQ folder (slq_hf.retrieval) and search them in words")
    result = search(state.out / "slq-toy", state.out / "search")
    log(f"   {100 * result['top1']:.0f}% of {len(result['queries'])} queries (explicit and knowledge captions) put "
        f"their scene first; each query with its top 5: {result['grid']}")


# Extra steps run after the built-in ones, in order: each is fn(state: DemoState) -> None.
EXTRA_STEPS: list[Callable[[DemoState], None]] = [rerank_step, search_step]


# -------------------------------------------------------------------------------------------------------- data
def training_corpus(config: DemoConfig) -> dict[str, Path]:
    """The fixed toy corpus as JSONL + PNG files (``examples/toy/corpus.py``): what `slq-hf train` reads."""
    return write_corpus(Path(config.out) / "data", config.drawings)


def evaluation_scenes(config: DemoConfig) -> list[Scene]:
    """The fixed held-out split (or the same subset of it every time, with ``--eval-scenes``)."""
    scenes: list[Scene] = heldout_scenes()
    if config.eval_scenes is not None:
        scenes = random.Random(0).sample(scenes, config.eval_scenes)
    return scenes


def evaluation_sets(config: DemoConfig) -> dict[str, RetrievalDataset]:
    """The fixed held-out split, once with explicit captions and once with knowledge captions."""
    scenes = evaluation_scenes(config)
    images = [s.image for s in scenes]
    return {
        "caption": RetrievalDataset.from_pairs(images, [s.caption for s in scenes], name="toy held-out, captions"),
        "knowledge": RetrievalDataset.from_pairs(images, [s.knowledge_caption for s in scenes],
                                                 name="toy held-out, knowledge captions"),
    }


# ----------------------------------------------------------------------------------------------- last token
def last_token_states(backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, H) float32 L2-normalised final (post-norm) hidden state at each row's last real token."""
    out = backbone.model(**batch, use_cache=False, return_dict=True).last_hidden_state  # (B, L, H)
    mask = batch["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (B,) works for left and right padding
    states = out[torch.arange(out.shape[0]), last].float()
    return torch.nn.functional.normalize(states, dim=-1)


def last_token_encoder(backbone, processor, batch_size: int = 64) -> Callable[[list], torch.Tensor]:
    """An encoder for ``evaluate_retrieval``: same chat-template prompts as SLQ, no queries, last-token pooling."""

    @torch.inference_mode()
    def encode(inputs: list, **_: Any) -> torch.Tensor:
        items = to_items(inputs)
        parts = []
        for start in range(0, len(items), batch_size):
            batch = dict(collate(processor, items[start : start + batch_size]))
            parts.append(last_token_states(backbone, batch))
        return torch.cat(parts)

    return encode


# ------------------------------------------------------------------------------------------------------ train
def slq_train_argv(config: DemoConfig, files: dict[str, Path], out: Path) -> list[str]:
    """The `slq-hf train` command line the demo runs (printed, so it can be re-run as is)."""
    return ["train", "--backbone", config.backbone, "--train-data", str(files["train"]), "--eval-data",
            str(files["validation"]), "--output-dir", str(out), "--num-queries", str(config.num_queries),
            "--query-init", config.query_init, "--pooling", config.pooling, "--temperature", str(config.temperature),
            "--lr", str(config.slq_lr), "--weight-decay", str(config.slq_weight_decay), "--lr-scheduler",
            config.lr_scheduler, "--warmup", str(config.warmup),
            "--max-steps", str(config.steps), "--batch-size", str(config.batch_size), "--eval-steps",
            str(config.eval_steps), "--logging-steps", str(config.log_every), "--seed", str(config.seed),
            "--save-total-limit", "1", "--overwrite-output-dir", "--use-cpu", "--dtype", "float32"]


def train_slq(config: DemoConfig, files: dict[str, Path], out: Path) -> float:
    """Train SLQ exactly as a user does: `slq-hf train` (SLQTrainer + SLQDataCollator), best checkpoint by
    validation recall; returns seconds. The trained folder is ``out``."""
    from slq_hf.cli import main as cli

    argv = slq_train_argv(config, files, out)
    log("   $ slq-hf " + " ".join(argv))
    started = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit("slq-hf train failed (see the error above).")
    return time.perf_counter() - started


def train_lora(backbone, processor, config: DemoConfig, files: dict[str, Path]) -> float:
    """LoRA on the backbone's attention (q,k,v,o) with last-token pooling: the same corpus, batch size, steps,
    schedule and best-checkpoint rule as SLQ (the product has no LoRA path, so this is a plain loop); returns
    seconds."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import get_scheduler

    from slq_hf.training import read_jsonl

    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    get_peft_model(backbone, lora)  # injects the adapters into ``backbone`` in place and freezes the rest
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / config.temperature)))
    params = [p for p in backbone.parameters() if p.requires_grad] + [logit_scale]
    optimizer = torch.optim.AdamW(params, lr=config.lora_lr, weight_decay=0.0)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup,
                              num_training_steps=config.steps)
    collator = SLQDataCollator(processor, strict=True)
    data = read_jsonl(files["train"])
    loader = DataLoader(data, batch_size=config.batch_size, collate_fn=collator,
                        sampler=RandomSampler(data, generator=torch.Generator().manual_seed(config.seed)))
    validation = _validation_set(files)
    best = (-1.0, None)
    started = time.perf_counter()
    step = 0
    while step < config.steps:
        for batch in loader:
            backbone.train()
            images = last_token_states(backbone, {k: v for k, v in batch.items() if not k.startswith("positive_")})
            texts = last_token_states(backbone, {k[len("positive_"):]: v for k, v in batch.items()
                                                 if k.startswith("positive_")})
            out = symmetric_infonce(images, texts, logit_scale, max_logit_scale=MAX_LOGIT_SCALE)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            _progress("LoRA", step - 1, config, out.loss, out.accuracy, logit_scale, started)
            if step % config.eval_steps == 0 or step == config.steps:
                backbone.eval()
                recall = _mean_r1(evaluate_retrieval(last_token_encoder(backbone, processor, config.eval_batch_size),
                                                     validation, batch_size=config.eval_batch_size,
                                                     show_progress_bar=False))
                if recall > best[0]:
                    best = (recall, {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad})
            if step == config.steps:
                break
    with torch.no_grad():  # the best validation checkpoint, as SLQ's run keeps
        for name, param in backbone.named_parameters():
            if name in best[1]:
                param.copy_(best[1][name])
    backbone.eval()
    return time.perf_counter() - started


def _validation_set(files: dict[str, Path]) -> RetrievalDataset:
    from slq_hf.evaluation import load_retrieval_dataset

    return load_retrieval_dataset(str(files["validation"]), "jsonl", None)


def _mean_r1(result: dict) -> float:
    return (result["metrics"]["t2i"]["R@1"] + result["metrics"]["i2t"]["R@1"]) / 2


def _progress(name: str, step: int, config: DemoConfig, loss, accuracy, logit_scale, started: float) -> None:
    if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
        log(f"   {name} step {step + 1:>4}/{config.steps}  loss {loss.item():.3f}  in-batch acc "
            f"{accuracy.item():.2f}  temperature {math.exp(-logit_scale.item()):.3f}  "
            f"{time.perf_counter() - started:.0f}s")


# ------------------------------------------------------------------------------------------------------- eval
def evaluate(encoder, datasets: dict[str, RetrievalDataset], config: DemoConfig,
             gap_plot: Path | None = None) -> dict[str, dict]:
    """Recall on both caption sets; the modality-gap PNG is drawn from the explicit-caption set."""
    return {name: evaluate_retrieval(encoder, data, batch_size=config.eval_batch_size, show_progress_bar=False,
                                     gap_plot=gap_plot if name == "caption" else None)
            for name, data in datasets.items()}


def recall_row(results: dict[str, dict]) -> dict[str, float]:
    """{"caption t2i": R@1 %, ...} of one method."""
    return {f"{part} {direction}": 100 * results[part]["metrics"][direction]["R@1"] for part, direction in COLUMNS}


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per method, R@1 % in both directions on both caption sets."""
    header = ["method (R@1 %, held-out scenes)", "caption t2i", "caption i2t", "knowledge t2i", "knowledge i2t",
              "trainable params", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, row in rows.items():
        cells = [name, *[f"{row[f'{p} {d}']:.1f}" for p, d in COLUMNS],
                 f"{row['params']:,}" if row.get("params") else "0",
                 f"{row['seconds']:.0f}" if row.get("seconds") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_same(name: str, reference: dict[str, dict], other: dict[str, dict], tolerance: float = 0.5) -> bool:
    """Reloaded models must reproduce the in-memory recall (to within ``tolerance`` points: float noise can flip a
    near tie)."""
    a, b = recall_row(reference), recall_row(other)
    worst = max(abs(a[k] - b[k]) for k in a)
    ok = worst <= tolerance
    log(f"   {name}: " + ", ".join(f"{k} {b[k]:.1f}" for k in b) + f"  -> {'same as in memory' if ok else 'DIFFERS'}"
        f" (max diff {worst:.2f} points)")
    return ok


# ------------------------------------------------------------------------------------------------------- main
def run(config: DemoConfig) -> dict[str, Any]:
    """The whole demo; returns the rows of the table plus the reload checks (also written to results.json)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    total_started = time.perf_counter()
    torch.manual_seed(config.seed)
    datasets = evaluation_sets(config)
    num_scenes = datasets["caption"].num_images
    log(f"1. Toy backbone {config.backbone}")
    backbone = AutoModelForImageTextToText.from_pretrained(config.backbone, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(config.backbone)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    sample = heldout_scenes()[0]
    log(f"   {backbone_params:,} parameters; it captions a held-out scene of {sample.caption!r} as "
        f"{_caption(backbone, processor, sample)!r}")
    log(f"   evaluation: {num_scenes} held-out scenes x (explicit caption, knowledge caption); chance R@1 = "
        f"{100 / num_scenes:.1f}%")
    log(f"   e.g. {sample.caption!r} / {sample.knowledge_caption!r}")

    rows: dict[str, dict[str, Any]] = {}
    log("2. Zero-shot last token (no training): the final state of the last prompt token")
    last_token_results = evaluate(last_token_encoder(backbone, processor, config.eval_batch_size), datasets, config,
                                  gap_plot=out / "modality_gap_last_token.png")
    rows["zero-shot last token"] = {**recall_row(last_token_results), "params": 0, "seconds": 0}
    log("   " + _short(rows["zero-shot last token"]))

    files = training_corpus(config)
    model = SLQModel.from_backbone(backbone, num_queries=config.num_queries, processor=processor,
                                   query_init=config.query_init, temperature=config.temperature,
                                   pooling=config.pooling, projection_dim=config.projection_dim)
    slq_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"3. SLQ with {config.num_queries} random queries (untrained, {slq_params:,} trainable parameters)")
    rows["SLQ, random queries"] = {**recall_row(evaluate(model, datasets, config)), "params": 0, "seconds": 0}
    log("   " + _short(rows["SLQ, random queries"]))
    del model

    folder = out / "slq-toy"
    log(f"4. Training SLQ with `slq-hf train` on a fixed corpus ({config.drawings} drawings x 150 combinations, "
        f"explicit captions only): {config.steps} steps x {config.batch_size} pairs, lr {config.slq_lr} "
        f"{config.lr_scheduler}, weight decay {config.slq_weight_decay}, best of the checkpoints by validation "
        "recall, backbone frozen")
    seconds = train_slq(config, files, folder)
    # The trained folder on the SAME backbone object: SLQ never changed it, so it still generates below.
    model = SLQModel.from_pretrained(folder, backbone=backbone, processor=processor)
    slq_results = evaluate(model, datasets, config, gap_plot=out / "modality_gap_slq.png")
    rows["SLQ trained (frozen backbone)"] = {**recall_row(slq_results), "params": slq_params, "seconds": seconds}
    log("   " + _short(rows["SLQ trained (frozen backbone)"]))
    log(f"   the same backbone object still generates: {_caption(model.backbone, processor, sample)!r}")

    log("5. Reload the SLQ folder")
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    log(f"   {folder}: model.safetensors {sizes.get('model.safetensors', 0):,} bytes (queries + temperature); "
        f"{len(sizes)} files, {sum(sizes.values()) / 1024:.0f} KB in all")
    reload_checks = {}
    # float32 like the in-memory run: left alone, the backbone would load in its stored dtype (bf16), which moves
    # embeddings by ~1e-2 and can flip near ties.
    reloaded = AutoModel.from_pretrained(folder, dtype=torch.float32)
    reload_checks["AutoModel"] = check_same("AutoModel.from_pretrained", slq_results,
                                            evaluate(reloaded, datasets, config))
    del reloaded
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        log("   sentence-transformers is not installed: skipping the SentenceTransformer reload")
    else:
        st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu",
                                 model_kwargs={"dtype": torch.float32})
        reload_checks["SentenceTransformer"] = check_same("SentenceTransformer", slq_results,
                                                          evaluate(st, datasets, config))
        del st

    log(f"6. Training LoRA r={config.lora_rank} on q,k,v,o (last-token pooling): same corpus, {config.steps} steps x "
        f"{config.batch_size} pairs, lr {config.lora_lr} {config.lr_scheduler}, best validation checkpoint")
    lora_backbone = AutoModelForImageTextToText.from_pretrained(config.backbone, dtype=torch.float32)
    seconds = train_lora(lora_backbone, processor, config, files)
    lora_params = sum(p.numel() for p in lora_backbone.parameters() if p.requires_grad) + 1
    rows[f"LoRA r={config.lora_rank} q,k,v,o, last token"] = {
        **recall_row(evaluate(last_token_encoder(lora_backbone, processor, config.eval_batch_size), datasets,
                              config)), "params": lora_params, "seconds": seconds}
    log("   " + _short(rows[f"LoRA r={config.lora_rank} q,k,v,o, last token"]))

    state = DemoState(config, out, backbone, processor, model, datasets, rows)
    for extra in EXTRA_STEPS:
        extra(state)

    table = format_table(rows)
    minutes = (time.perf_counter() - total_started) / 60
    log(f"\nResults on {num_scenes} held-out scenes (chance {100 / num_scenes:.1f}%); knowledge captions were never "
        "used to train SLQ or LoRA:\n")
    log(table)
    slq_row, lora_row = rows["SLQ trained (frozen backbone)"], rows[f"LoRA r={config.lora_rank} q,k,v,o, last token"]
    lead = {part: slq_row[f"{part} t2i"] - lora_row[f"{part} t2i"] for part in ("knowledge", "caption")}
    log(f"\nSLQ minus LoRA, text->image R@1: knowledge captions {lead['knowledge']:+.1f} points, explicit captions "
        f"{lead['caption']:+.1f} points")
    log(f"\nModality-gap figures: {out / 'modality_gap_slq.png'}, {out / 'modality_gap_last_token.png'}")
    log(f"Reload checks: {reload_checks}; total {minutes:.1f} min")
    summary = {"config": asdict(config), "rows": rows, "reload_checks": reload_checks, "minutes": minutes,
               "table": table, "modality_gap_slq": slq_results["caption"]["modality_gap"],
               "modality_gap_last_token": last_token_results["caption"]["modality_gap"]}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _short(row: dict[str, float]) -> str:
    return ", ".join(f"{p} {d} R@1 {row[f'{p} {d}']:.1f}%" for p, d in COLUMNS)


@torch.inference_mode()
def _caption(backbone, processor, scene: Scene) -> str:
    """The backbone's own greedy caption: SLQ never changed it, so it still generates."""
    messages = [{"role": "user", "content": [{"type": "image", "image": scene.image}]}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    tokens = backbone.generate(**batch, max_new_tokens=12, do_sample=False)
    return processor.decode(tokens[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default."""


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--backbone", default=defaults.backbone, help="toy backbone folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps for SLQ and for LoRA")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per step (<= 150)")
    parser.add_argument("--num-queries", type=int, default=defaults.num_queries, help="SLQ latent queries")
    parser.add_argument("--query-init", default=defaults.query_init, choices=["normal", "vocab"],
                        help="SLQ query initialisation")
    parser.add_argument("--slq-lr", type=float, default=defaults.slq_lr, help="SLQ peak learning rate")
    parser.add_argument("--slq-weight-decay", type=float, default=defaults.slq_weight_decay,
                        help="weight decay on the SLQ queries (several epochs over one corpus need it)")
    parser.add_argument("--lora-lr", type=float, default=defaults.lora_lr, help="LoRA peak learning rate")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="initial temperature")
    parser.add_argument("--eval-scenes", type=int, default=None, help="evaluate on a subset of the 150 scenes")
    parser.add_argument("--eval-steps", type=int, default=defaults.eval_steps,
                        help="validation recall every N steps; the best checkpoint is kept")
    parser.add_argument("--drawings", type=int, default=defaults.drawings,
                        help="training corpus: drawings of each of the 150 combinations")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training-data and init seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1; a 1M-parameter model gains little from more)")
    parser.add_argument("--out", default=defaults.out, help="output folder (SLQ folder, PNGs, results.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or 1)
    return DemoConfig(backbone=args.backbone, steps=args.steps, batch_size=args.batch_size,
                      num_queries=args.num_queries, query_init=args.query_init, slq_lr=args.slq_lr,
                      slq_weight_decay=args.slq_weight_decay,
                      lora_lr=args.lora_lr, temperature=args.temperature, eval_scenes=args.eval_scenes,
                      eval_steps=args.eval_steps, drawings=args.drawings, seed=args.seed, out=args.out)


def quiet_libraries() -> None:
    """Keep the demo's own progress readable: no weight-loading bars, no notices that do not concern the user
    (bitsandbytes, imported by sentence-transformers, announces an optional CPU kernel; peft calls a deprecated
    transformers property)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    config = parse_args(argv)
    if not (Path(config.backbone) / "config.json").is_file():
        sys.exit(f"No toy backbone in {config.backbone}; train one with examples/toy/train_toy_backbone.py.")
    run(config)


if __name__ == "__main__":
    main()
