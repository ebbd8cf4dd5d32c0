"""Train the toy vision-language backbone that `make demo` embeds with SLQ (CPU, 2 cores, about 10-20 minutes).

The backbone is a real ``Qwen3VLForConditionalGeneration`` (about 1M parameters: text 128 wide x 4 layers, vision
64 wide x 2 layers) with its own word-level tokenizer and the real ``Qwen3VLProcessor``. It learns three things from
procedurally drawn scenes (``slq_hf.testing.toy_scenes``):

* image -> caption: a user turn holding only the image, answered with "a red triangle in the top left";
* facts from text-only lines: "a triangle is the shape with three corners", "red is the colour of blood";
* rewrites: a user turn holding a knowledge caption ("the shape with three corners and the colour of blood in the
  top left", sometimes followed by "describe") or an explicit caption, answered with the explicit caption.

The rewrite task is what lets an embedding of a knowledge caption land next to the image: both prompts end in a state
that is about to say the same caption. Seeds are pinned, so the same command re-makes the committed weights (up to
floating-point differences between machines).

    .venv/bin/python examples/toy/train_toy_backbone.py --out examples/toy/backbone

The folder is saved in bf16 with shards under 1 MB (the repository's per-file limit) and loads with
``AutoModelForImageTextToText.from_pretrained`` / ``AutoProcessor.from_pretrained`` or ``SLQModel.from_backbone``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from slq_hf.testing.toy_scenes import (
    SIZE,
    TRAIN_SEED,
    Scene,
    combinations,
    fact_lines,
    heldout_scenes,
    random_scene,
    scene_for,
    vocabulary,
)

# Qwen's special tokens and a ChatML template, spelled out here (not imported from the test helpers) so the
# committed backbone can be re-made from this file alone.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
UNK = "[UNK]"
# Role words of the chat template: they are plain words for the word-level tokenizer.
ROLE_WORDS = ["system", "user", "assistant"]
MAX_NEW_TOKENS = 12
# Validation scenes during training come from their own stream, never from the held-out evaluation split.
VALIDATION_SEED = 7_777
MAX_FILE_BYTES = 1_000_000


# ----------------------------------------------------------------------------------------------------- building
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the toy vocabulary; Qwen's special tokens take the first ids."""
    words = QWEN_SPECIALS + [UNK] + ROLE_WORDS + vocabulary()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    # Whitespace also splits punctuation off, so "corners," does not become [UNK]; newlines from the template vanish.
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tokenizer.add_special_tokens(QWEN_SPECIALS)
    # Left padding: what batched generation needs (SLQModel re-lays rows itself, so it does not care).
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=UNK, padding_side="left")


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLProcessor:
    """The real Qwen3-VL processor, pinned to 96x96 px so every scene is a 6x6 patch grid (3x3 tokens)."""
    pixels = SIZE * SIZE
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            size={"shortest_edge": pixels, "longest_edge": pixels})
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
                            chat_template=CHAT_TEMPLATE)


def build_model(tokenizer: PreTrainedTokenizerFast, vision_depth: int = 2,
                vision_hidden: int = 64) -> Qwen3VLForConditionalGeneration:
    """DESIGN.md's toy configuration (about 1M parameters, 2 MB in bf16); the vision tower's size is adjustable."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         # mrope_section sums to head_dim / 2.
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                          "mrope_interleaved": True},
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"]),
        # num_position_embeddings = (96 / 16)^2: one learned position per patch of a scene.
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                           num_position_embeddings=36, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config)
    generation = model.generation_config
    generation.eos_token_id = ids["<|im_end|>"]
    generation.pad_token_id = ids["<|endoftext|>"]
    generation.bos_token_id = None
    generation.do_sample = False
    generation.max_new_tokens = MAX_NEW_TOKENS
    return model


# --------------------------------------------------------------------------------------------------------- data
def chat(user: list[dict], answer: str | None = None) -> list[dict]:
    """One user turn (and optionally the assistant's answer) in the processor's message format."""
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def image_prompt(scene: Scene) -> list[dict]:
    """SLQ's image prompt: a user turn holding only the image."""
    return [{"type": "image", "image": scene.image}]


def text_prompt(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


# Mixture of a training batch (fractions): image captions teach vision, rewrites teach text -> caption, facts teach
# knowledge. Half the rewrites carry the trailing "describe" instruction, half are the bare text SLQ will embed.
MIXTURE = {"image": 0.5, "knowledge": 0.25, "copy": 0.1, "fact": 0.15}


def mixture(image_share: float) -> dict[str, float]:
    """MIXTURE with the image share set to ``image_share`` and the text tasks scaled to fill the rest."""
    rest = sum(v for k, v in MIXTURE.items() if k != "image")
    return {k: image_share if k == "image" else v * (1 - image_share) / rest for k, v in MIXTURE.items()}


def sample_example(rng: random.Random, shares: dict[str, float] = MIXTURE) -> tuple[str, Scene | None, str]:
    """(kind, scene or None, text) for one training example."""
    kind = rng.choices(list(shares), weights=list(shares.values()))[0]
    if kind == "fact":
        return kind, None, rng.choice(fact_lines())
    scene = random_scene(rng)
    return kind, scene, ""


def encode_batch(processor: Qwen3VLProcessor, examples: list[tuple[str, Scene | None, str]],
                 rng: random.Random) -> dict[str, torch.Tensor]:
    """Processor output plus ``labels``: loss on the assistant answer for chat rows, on every token for facts."""
    texts, images = [], []
    for kind, scene, text in examples:
        if kind == "fact":
            texts.append(text)
            continue
        if kind == "image":
            user = image_prompt(scene)
            images.append(scene.image)
        else:
            source = scene.knowledge_caption if kind == "knowledge" else scene.caption
            user = text_prompt(source + (" describe" if rng.random() < 0.5 else ""))
        texts.append(processor.apply_chat_template(chat(user, scene.caption), tokenize=False))
    batch = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    for row, (kind, _, _) in enumerate(examples):
        if kind != "fact":
            # The answer starts after the last "<|im_start|> assistant".
            answer_start = int((ids[row] == start).nonzero().max()) + 2
            labels[row, :answer_start] = -100
    batch["labels"] = labels
    return batch


# ----------------------------------------------------------------------------------------------------- checking
@torch.inference_mode()
def generate(model, processor, prompts: list[list[dict]], batch_size: int = 50) -> list[str]:
    """Greedy answers to single-turn prompts."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        conversations = [chat(p) for p in prompts[start : start + batch_size]]
        batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt",
                                              processor_kwargs={"padding": True})
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers += processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


@torch.inference_mode()
def complete(model, processor, prefixes: list[str]) -> list[str]:
    """Greedy continuation of plain-text prefixes (checks the facts)."""
    tokenizer = processor.tokenizer
    batch = tokenizer(prefixes, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


def evaluate(model, processor, scenes: list[Scene]) -> dict[str, float]:
    """Exact-match rates: captions of images, rewrites of knowledge captions, fact completions."""
    model.eval()
    captions = generate(model, processor, [image_prompt(s) for s in scenes])
    rewrites = generate(model, processor, [text_prompt(s.knowledge_caption) for s in scenes])
    facts = fact_lines()
    # "a triangle is" -> "the shape with three corners"; "the colour of blood is" -> "red".
    prefixes, targets = [], []
    for line in facts:
        head, tail = line.split(" is ", 1)
        prefixes.append(f"{head} is")
        targets.append(tail)
    completions = complete(model, processor, prefixes)
    model.train()
    return {
        "caption_exact": sum(c == s.caption for c, s in zip(captions, scenes)) / len(scenes),
        "knowledge_rewrite_exact": sum(r == s.caption for r, s in zip(rewrites, scenes)) / len(scenes),
        # Plain text has no end token, so the model continues after the fact; only the fact's own words count.
        "fact_exact": sum(c.split()[: len(t.split())] == t.split() for c, t in zip(completions, targets))
        / len(targets),
        "example": f"{scenes[0].caption!r} -> {captions[0]!r}",
    }


# ---------------------------------------------------------------------------------------------------------- main
def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_backbone(model, processor, out: Path, metrics: dict) -> None:
    """bf16 weights in shards < 1 MB, processor files, and a small card with the measured numbers."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()  # a re-run with a different shard count must not leave stale shards behind
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="900KB")
    model.float()
    processor.save_pretrained(out)
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    too_big = [(p.name, p.stat().st_size) for p in out.iterdir() if p.stat().st_size >= MAX_FILE_BYTES]
    if too_big:
        raise RuntimeError(f"Files of 1 MB or more in {out}: {too_big}; lower max_shard_size.")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "backbone",
                        help="folder to write the trained backbone (bf16 shards < 1 MB + processor files)")
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--image-share", type=float, default=0.65,
                        help=f"fraction of image->caption examples; the text tasks share the rest as in {MIXTURE}")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision transformer layers")
    parser.add_argument("--vision-hidden", type=int, default=64, help="vision transformer width")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warmup + cosine)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="seed for weights and the data stream")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is as fast for a model this small and robust on a busy machine)")
    parser.add_argument("--eval-every", type=int, default=500, help="validate every N steps (0: only at the end)")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, args.vision_depth, args.vision_hidden)
    shares = mixture(args.image_share)
    model.train()
    print(f"toy backbone: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)} words; {args.steps} steps x {args.batch_size}", flush=True)

    validation_rng = random.Random(VALIDATION_SEED)
    validation = [scene_for(c, validation_rng) for c in random.Random(VALIDATION_SEED).sample(combinations(), 60)]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))
    started = time.perf_counter()
    running = None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        batch = encode_batch(processor, [sample_example(rng, shares) for _ in range(args.batch_size)], rng)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0:
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps} loss {running:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{elapsed / 60:.1f} min (eta {eta / 60:.1f} min)", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"  validation @ {step + 1}: {evaluate(model, processor, validation)}", flush=True)
    minutes = (time.perf_counter() - started) / 60

    save_backbone(model, processor, args.out, {})
    # Check what was saved (bf16), on the fixed held-out split the demo evaluates on.
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(args.out, dtype=torch.float32).eval()
    metrics = evaluate(reloaded, processor, heldout_scenes())
    metrics.update({"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                    "mixture": shares, "vision_depth": args.vision_depth, "vision_hidden": args.vision_hidden,
                    "threads": args.threads, "train_minutes": round(minutes, 1), "final_loss": round(running, 4),
                    "command": "python examples/toy/train_toy_backbone.py " + " ".join(sys.argv[1:])})
    (args.out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {args.out} after {minutes:.1f} min; held-out (bf16 reload): {metrics}", flush=True)


if __name__ == "__main__":
    main()
