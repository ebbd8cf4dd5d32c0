"""Retrieve, then answer, with ONE loaded model: SLQ embeds, the same frozen backbone generates.

The backbone is loaded once. SLQ attaches its latent queries to it (a few KB), encodes a small image collection with
its "document" query set and each question with its "query" set, and the backbone's own ``generate`` then describes
the retrieved image. Embedding and generation interleave on the same weights: nothing is merged or swapped, which a
LoRA-tuned embedder could not offer.

    .venv/bin/python examples/rag_toy.py                                  # tiny random backbone: plumbing only
    .venv/bin/python examples/rag_toy.py --backbone examples/toy/backbone --slq my-trained-toy-slq

Backbone: ``--backbone`` (a folder or Hub id); by default the toy Qwen3-VL of ``examples/toy`` when it is there (a
backbone pretrained on the toy scenes, so answers are real captions), else a tiny RANDOM Qwen3-VL built in code (the
loop runs, but retrieval and answers are noise). ``--slq``: a trained SLQ folder for that backbone; with "query" and
"document" sets they are used, otherwise its active set serves both sides. Without it the queries are untrained.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from slq_hf import SLQModel
from slq_hf.testing import build_tiny_backbone

TOY_DIR = Path(__file__).resolve().parent / "toy"
TOY_BACKBONE_CANDIDATES = ("backbone", "toy_backbone", "qwen3_vl_toy")


def find_toy_backbone() -> Path | None:
    """The toy backbone folder of examples/toy, if it has been committed."""
    for name in TOY_BACKBONE_CANDIDATES:
        if (TOY_DIR / name / "config.json").is_file():
            return TOY_DIR / name
    return None


def collection(size: int, seed: int) -> list[tuple[Image.Image, str, str]]:
    """(image, explicit caption, knowledge caption) triples: the toy scenes when available, else plain squares."""
    try:
        from slq_hf.testing.toy_scenes import heldout_scenes
    except ImportError:
        heldout_scenes = None
    if heldout_scenes is not None:
        scenes = random.Random(seed).sample(heldout_scenes(), size)
        return [(s.image, s.caption, s.knowledge_caption) for s in scenes]
    colours = {"red": ((215, 40, 40), "the colour of blood"), "green": ((40, 165, 60), "the colour of grass"),
               "blue": ((45, 85, 220), "the colour of the sky"), "yellow": ((235, 210, 40), "the colour of a banana")}
    out = []
    for name, (rgb, fact) in list(colours.items())[:size]:
        image = Image.new("RGB", (96, 96), (128, 128, 128))
        ImageDraw.Draw(image).rectangle([30, 30, 66, 66], fill=rgb)
        out.append((image, f"a {name} square", f"the shape with four equal sides and {fact}"))
    return out


def answer(model: SLQModel, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
    """The backbone's own greedy answer about ``image``: plain ``model.backbone.generate``."""
    content = [{"type": "image", "image": image}] + ([{"type": "text", "text": prompt}] if prompt else [])
    messages = [{"role": "user", "content": content}]
    inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        tokens = model.backbone.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return model.processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="backbone folder or Hub id (default: examples/toy backbone, else tiny)")
    parser.add_argument("--slq", help="trained SLQ folder for this backbone (default: fresh, untrained queries)")
    parser.add_argument("--size", type=int, default=12, help="images in the collection (default: 12)")
    parser.add_argument("--questions", type=int, default=3, help="questions to ask (default: 3)")
    parser.add_argument("--prompt", default="", help="text asked with the retrieved image (default: none, the image "
                        "alone, as the toy backbone was trained; e.g. 'Describe the image.' for a real MLLM)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    source = args.backbone or find_toy_backbone()
    if source is None:
        source = Path(tempfile.mkdtemp(prefix="slq_rag_")) / "backbone"
        build_tiny_backbone("qwen3_vl", source)
        print(f"No toy backbone in {TOY_DIR}: using a tiny RANDOM Qwen3-VL ({source}); the loop runs, the results "
              "are noise.")
    backbone = AutoModelForImageTextToText.from_pretrained(str(source)).eval()  # the one copy of the weights
    processor = AutoProcessor.from_pretrained(str(source))
    if args.slq:
        model = SLQModel.from_pretrained(args.slq, backbone=backbone, processor=processor)
    else:
        model = SLQModel.from_backbone(backbone, num_queries=8, processor=processor)
        model.add_query_set("query")
        model.add_query_set("document")
    query_set = "query" if "query" in model.query_sets else model.active_query_set
    document_set = "document" if "document" in model.query_sets else model.active_query_set
    own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    print(f"One backbone ({sum(p.numel() for p in backbone.parameters()):,} parameters) serves embedding and "
          f"generation; SLQ adds {own:,} (query sets {model.query_sets}). model.backbone is the loaded backbone: "
          f"{model.backbone is backbone}.")

    items = collection(args.size, args.seed)
    documents = model.encode([image for image, _, _ in items], query_sets=[document_set])[document_set]  # (N, D)
    print(f"Indexed {len(items)} images with the {document_set!r} set -> {tuple(documents.shape)}\n")

    hits = 0
    for target in random.Random(args.seed + 1).sample(range(len(items)), min(args.questions, len(items))):
        question = items[target][2]
        query = model.encode([question], query_sets=[query_set])[query_set]  # (1, D)
        scores = (query @ documents.T)[0]  # (N,)
        best = int(scores.argmax())
        hits += best == target
        reply = answer(model, items[best][0], args.prompt, args.max_new_tokens)  # generate between two encodes
        print(f"Q: {question!r}\n   retrieved #{best} ({items[best][1]!r}, score {scores[best]:.3f}; the right one is "
              f"#{target}: {'hit' if best == target else 'miss'})\n   backbone answers: {reply.strip()!r}")
    print(f"\n{hits}/{min(args.questions, len(items))} questions retrieved the right image.")


if __name__ == "__main__":
    main()
