"""Search a corpus with SLQ: index the toy held-out scenes, ask in words, see the top 5 images of each query.

Uses only the public API (``slq_hf.retrieval.build_index`` / ``CorpusIndex``): the 150 held-out scenes are written
as PNG files with a JSONL of items (colour/shape/position as metadata), indexed with a trained SLQ folder, and
searched with explicit captions ("a red triangle in the top left") and knowledge captions ("the shape with three
corners and the colour of blood in the top left") that SLQ never saw in training. The picture
``OUT/search_grid.png`` shows each query with its top-5 images; a green frame marks the scene the query describes.

    .venv/bin/python examples/demo_search.py --model outputs/demo/slq-toy [--out outputs/demo/search]

Re-running is cheap: the index resumes (nothing is re-encoded unless the model or the scenes changed).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from slq_hf import SLQModel
from slq_hf.retrieval import CorpusIndex, IndexMismatchError, build_index
from slq_hf.testing.toy_scenes import explicit_caption, heldout_scenes, knowledge_caption

THUMB, PAD, TEXT_WIDTH, K = 112, 10, 330, 5
GREEN, GREY = (40, 170, 70), (200, 200, 200)
_FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")


def default_queries() -> list[dict[str, Any]]:
    """Three scenes, each asked for with its explicit caption and with its knowledge caption."""
    queries = []
    for combination in (("red", "triangle", "top left"), ("blue", "circle", "centre"),
                        ("yellow", "star", "bottom right")):
        queries.append({"kind": "explicit", "text": explicit_caption(*combination), "target": list(combination)})
        queries.append({"kind": "knowledge", "text": knowledge_caption(*combination), "target": list(combination)})
    return queries


def write_scenes(folder: Path, limit: int | None = None) -> Path:
    """The held-out scenes as PNG files + ``items.jsonl`` ({"id", "image", colour/shape/position metadata})."""
    (folder / "scenes").mkdir(parents=True, exist_ok=True)
    lines = []
    for scene in heldout_scenes()[:limit]:
        name = "_".join(scene.combination).replace(" ", "-")
        path = folder / "scenes" / f"{name}.png"
        if not path.exists():  # rewriting would change the file times and so the data fingerprint
            scene.image.save(path)
        lines.append(json.dumps({"id": name, "image": f"scenes/{name}.png", "colour": scene.colour,
                                 "shape": scene.shape, "position": scene.position}))
    items = folder / "items.jsonl"
    text = "\n".join(lines) + "\n"
    if not items.exists() or items.read_text() != text:
        items.write_text(text)
    return items


def _font(size: int):
    for name in _FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line]


def draw_grid(rows: list[dict[str, Any]], path: Path) -> Path:
    """One row per query: its text on the left, then its top-K images with rank and score."""
    height = PAD + len(rows) * (THUMB + 2 * PAD + 16)
    width = TEXT_WIDTH + K * (THUMB + PAD) + PAD
    canvas = Image.new("RGB", (width, height + 30), "white")
    draw = ImageDraw.Draw(canvas)
    title, body, small = _font(17), _font(14), _font(12)
    draw.text((PAD, 6), "SLQ corpus search on the toy held-out scenes: query -> top 5 (green = the scene it "
              "describes)", fill="black", font=title)
    top = 30 + PAD
    for row in rows:
        draw.text((PAD, top), f"{row['kind']} caption", fill=(90, 90, 90), font=small)
        for n, line in enumerate(_wrap(draw, f"\u201c{row['query']}\u201d", body, TEXT_WIDTH - 2 * PAD)[:5]):
            draw.text((PAD, top + 18 + 18 * n), line, fill="black", font=body)
        for n, hit in enumerate(row["hits"]):
            left = TEXT_WIDTH + n * (THUMB + PAD)
            colour = GREEN if hit["correct"] else GREY
            draw.rectangle((left - 4, top - 4, left + THUMB + 3, top + THUMB + 3), fill=colour)
            with Image.open(hit["path"]) as image:
                canvas.paste(image.convert("RGB").resize((THUMB, THUMB)), (left, top))
            draw.text((left, top + THUMB + 5), f"#{hit['rank']}  {hit['score']:.3f}", fill="black", font=small)
        top += THUMB + 2 * PAD + 16
    canvas.save(path)
    return path


def run(slq_folder: str | os.PathLike, out_dir: str | os.PathLike, queries: list[dict[str, Any]] | None = None,
        *, limit: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Index the held-out scenes with ``slq_folder``, answer ``queries`` (default :func:`default_queries`), draw.

    Args:
        queries: [{"kind", "text", "target": [colour, shape, position]}].
        limit: index only the first ``limit`` scenes (tests).

    Returns:
        {"grid": PNG path, "index": folder, "queries": [{"query", "kind", "hits": [{"rank", "id", "score",
        "correct", "path"}]}], "top1": fraction of queries whose first hit is their scene}.
    """
    out = Path(out_dir)
    queries = queries or default_queries()
    items = write_scenes(out, limit)
    model = SLQModel.from_pretrained(slq_folder)
    settings = dict(shard_size=64, batch_size=batch_size, show_progress_bar=False, model_source=str(slq_folder))
    try:
        build_index(model, items, out / "index", **settings)  # resumes / reuses a finished index
    except IndexMismatchError:  # pointed at another SLQ folder than last time: start this index over
        build_index(model, items, out / "index", overwrite=True, **settings)
    index = CorpusIndex.load(out / "index")
    results = index.search(model, [q["text"] for q in queries], k=K)
    rows = []
    for query, hits in zip(queries, results):
        rows.append({"query": query["text"], "kind": query["kind"], "hits": [
            {"rank": h.rank, "id": h.id, "score": h.score, "path": h.path,
             "correct": [h.metadata["colour"], h.metadata["shape"], h.metadata["position"]] == query["target"]}
            for h in hits]})
    grid = draw_grid(rows, out / "search_grid.png")
    top1 = sum(row["hits"][0]["correct"] for row in rows) / len(rows)
    return {"grid": str(grid), "index": str(out / "index"), "queries": rows, "top1": top1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo/slq-toy", help="trained SLQ folder (make demo writes one)")
    parser.add_argument("--out", default="outputs/demo/search", help="output folder (scenes, index, PNG)")
    args = parser.parse_args(argv)
    result = run(args.model, args.out)
    for row in result["queries"]:
        marks = " ".join(("*" if h["correct"] else ".") + h["id"] for h in row["hits"])
        print(f"{row['kind']:>9}: {row['query']!r}\n           {marks}")
    print(f"top-1 correct for {result['top1']:.0%} of the queries; picture: {result['grid']}")


if __name__ == "__main__":
    main()
