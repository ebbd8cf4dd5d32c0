"""Cost of reranking k candidates with the frozen backbone, with and without the shared-prefix KV cache.

On the CPU-sized Qwen3-VL of ``benchmarks/common.py`` (text 640 x 8 layers, vision 256 x 4, random weights, the real
classes and processor), one 256 x 256 image (64 image tokens after merging) and k captions of about 15 words:

- ``image->text, k separate forwards``: ``rerank(image, [text])`` once per candidate, i.e. k full forwards of
  (chat template + image + caption), each running the vision tower: the unit every ratio divides by;
- ``image->text, batched full forwards``: ``rerank(image, texts, share_prefix=False)``: the same k sequences in
  padded batches;
- ``image->text, shared prefix``: ``rerank(image, texts)``: the common prefix (template + image) runs once into a
  KV cache, then each batch of captions runs only its own tokens against a batch-expanded view of it;
- ``text->image``: ``rerank(text, images)`` over k different images (no prefix to share: every pair starts with its
  own image), batched, against its own k separate forwards.

Scorer ``likelihood``, batch size 10, one torch thread. Times are medians over interleaved rounds (the order rotates
each round, so every variant sees the same load from other jobs); CPU time is what the work costs, wall time is shown
too. Target: shared prefix <= 0.5x the k separate forwards for image->text.

    .venv/bin/python benchmarks/rerank.py                         # print the table (about 8 minutes on 2 busy cores)
    .venv/bin/python benchmarks/rerank.py --write BENCHMARKS.md   # also fill its rerank section
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import build_bench_qwen3_vl, check, machine, medians, time_interleaved, write_section  # noqa: E402

from slq_hf.modeling.reranking import rerank  # noqa: E402

SECTION = "rerank"
WORDS = ("a red dog runs across the green field near two small children playing with a yellow ball under the tall "
         "old trees while their parents sit on a wooden bench").split()


def captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(15)) for _ in range(count)]


def images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy())
            for _ in range(count)]


def run(ks: list[int], rounds: int, warmup: int, size: int, batch_size: int) -> str:
    torch.set_num_threads(1)
    backbone, processor = build_bench_qwen3_vl()
    image, query = images(1, size)[0], captions(1, seed=99)[0]
    rows, targets = [], []
    for k in ks:
        texts, pictures = captions(k), images(k, size, seed=1)
        steps = {
            "image->text, k separate forwards": lambda: [rerank(backbone, processor, image, [t], share_prefix=False)
                                                         for t in texts],
            "image->text, batched full forwards": lambda: rerank(backbone, processor, image, texts,
                                                                 batch_size=batch_size, share_prefix=False),
            "image->text, shared prefix": lambda: rerank(backbone, processor, image, texts, batch_size=batch_size),
            "text->image, k separate forwards": lambda: [rerank(backbone, processor, query, [p]) for p in pictures],
            "text->image, batched": lambda: rerank(backbone, processor, query, pictures, batch_size=batch_size),
        }
        print(f"k = {k}", flush=True)
        for fn in (lambda: rerank(backbone, processor, image, texts[:2]),
                   lambda: rerank(backbone, processor, query, pictures[:2])):
            fn()  # one-off lazy initialisation outside the clock
        times = medians(time_interleaved(steps, rounds=rounds, warmup=warmup, collect=True))
        units = {"image->text": times["image->text, k separate forwards"],
                 "text->image": times["text->image, k separate forwards"]}
        for name, t in times.items():
            unit = units[name.split(",")[0]]
            rows.append(f"| {k} | {name} | {1000 * t['cpu']:.0f} | {1000 * t['wall']:.0f} | "
                        f"{t['cpu'] / unit['cpu']:.2f}x | {1000 * t['cpu'] / k:.1f} |")
        ratio = times["image->text, shared prefix"]["cpu"] / units["image->text"]["cpu"]
        targets.append(check(f"k = {k}: image->text with the shared image prefix costs {ratio:.2f}x k separate "
                             "forwards (target <= 0.5x)", ratio <= 0.5))
    header = ["| k | variant (likelihood scorer) | CPU ms / query | wall ms / query | CPU vs k separate forwards | "
              "CPU ms / candidate |", "|---:|---|---:|---:|---:|---:|"]
    return "\n".join([
        "## Rerank cost: shared image prefix (issue 14)", "",
        f"Rerank cost per query, CPU-sized Qwen3-VL (text 640 x 8 layers, vision 256 x 4), one {size} x {size} image "
        f"({(size // 32) ** 2} image tokens), captions of 15 words, batch size {batch_size}, one torch thread; "
        f"medians of {rounds} interleaved rounds. {machine()}.", "",
        *header, *rows, "", *targets, "",
        "The shared prefix pays the image (vision tower, image tokens, chat template) once per query instead of once "
        "per candidate; each candidate then costs only its own caption tokens against the cached prefix, so the "
        "saving grows with the image's share of the sequence. A text query over k images has no prefix to share.", "",
        "Reproduce: `OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/rerank.py --write BENCHMARKS.md`",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50], help="candidates per query")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed full rounds first (each variant always gets one untimed call on 2 candidates)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images, pixels")
    parser.add_argument("--batch-size", type=int, default=10, help="pairs per forward")
    parser.add_argument("--write", type=Path, metavar="BENCHMARKS.md", help="fill this file's rerank section")
    args = parser.parse_args(argv)
    body = run(args.k, args.rounds, args.warmup, args.image_size, args.batch_size)
    print(body)
    if args.write:
        write_section(args.write, SECTION, body)


if __name__ == "__main__":
    main()
