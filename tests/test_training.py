"""Training on the tiny Qwen3-VL: the contrastive loss against a hand computation, the pair collator and readers,
the plain Trainer (queries-only training and checkpoints, resume), SLQTrainer, `slq-hf train` and a 4-bit backbone."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, Trainer, TrainerCallback, TrainingArguments

from slq_hf import SLQModel
from slq_hf.modeling.losses import symmetric_infonce
from slq_hf.modeling.modeling_slq import MAX_LOGIT_SCALE
from slq_hf.processing import SLQInputError
from slq_hf.training import HFPairDataset, PairDataset, SLQDataCollator, SLQTrainer, read_jsonl, retrieval_metrics

from helpers import stop_at_step

NUM_QUERIES = 4
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "purple": (128, 0, 128), "cyan": (0, 255, 255), "white": (255, 255, 255), "black": (0, 0, 0)}


def _scene(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    image.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def _pairs(count: int = 8) -> list[dict]:
    return [{"image": _scene(rgb), "text": f"a {name} square"} for name, rgb in list(COLOURS.items())[:count]]


def _args(out: Path, **overrides) -> TrainingArguments:
    settings = dict(learning_rate=1e-2, per_device_train_batch_size=2, remove_unused_columns=False, use_cpu=True,
                    report_to="none", disable_tqdm=True, seed=0, save_strategy="no")
    settings.update(overrides)
    return TrainingArguments(str(out), **settings)


@pytest.fixture
def backbone(tiny_backbone_path) -> str:
    return tiny_backbone_path("qwen3_vl")


@pytest.fixture
def model(backbone) -> SLQModel:
    return SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)


# -------------------------------------------------------------------------------------------------------- loss
def _hand_infonce(query: list[list[float]], positive: list[list[float]], negative: list[list[float]],
                  scale: float) -> tuple[float, float]:
    """Symmetric InfoNCE and argmax accuracy written out with Python floats: row i of query pairs with row i of
    positive; query -> (positives + negatives), positive -> queries; mean of the two cross-entropies."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def cross_entropy(rows, candidates):
        loss, hits = 0.0, 0
        for i, row in enumerate(rows):
            logits = [scale * dot(row, c) for c in candidates]
            loss += math.log(sum(math.exp(v) for v in logits)) - logits[i]
            hits += max(range(len(logits)), key=logits.__getitem__) == i
        return loss / len(rows), hits

    forward, hits_forward = cross_entropy(query, positive + negative)
    backward, hits_backward = cross_entropy(positive, query)
    return (forward + backward) / 2, (hits_forward + hits_backward) / (2 * len(query))


def _loss_batch():
    examples = [
        {"image": _scene(COLOURS["red"]), "text": "a red square"},
        {"query": "a blue square", "positive": {"image": _scene(COLOURS["blue"])},
         "negative": _scene(COLOURS["green"], size=96)},
        {"query": {"image": _scene(COLOURS["yellow"]), "text": "same shape in purple"},
         "positive": _scene(COLOURS["purple"]), "negative": "a purple circle"},
    ]
    query = [{"image": examples[0]["image"]}, examples[1]["query"], examples[2]["query"]]
    positive = [examples[0]["text"], examples[1]["positive"], examples[2]["positive"]]
    negative = [examples[1]["negative"], examples[2]["negative"]]
    return examples, query, positive, negative


def test_forward_loss_equals_hand_computed_symmetric_infonce(model):
    examples, query, positive, negative = _loss_batch()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.05))
    out = model(**SLQDataCollator(model.processor)(examples))
    # Embeddings from the public encode path, one side at a time (an independent route to the same vectors).
    q, p, n = (model.encode(side).double().tolist() for side in (query, positive, negative))
    expected_loss, expected_accuracy = _hand_infonce(q, p, n, scale=1 / 0.05)
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-5)
    assert out.accuracy.item() == pytest.approx(expected_accuracy)
    assert out.positive_pooler_output.shape == out.pooler_output.shape == (3, model.config.hidden_size)
    out.loss.backward()
    assert model.queries.grad is not None and model.queries.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def test_temperature_is_clamped_like_clip(model):
    examples, query, positive, negative = _loss_batch()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))  # temperature 0.001, below CLIP's floor of 0.01
    out = model(**SLQDataCollator(model.processor)(examples))
    q, p, n = (model.encode(side).double().tolist() for side in (query, positive, negative))
    expected_loss, _ = _hand_infonce(q, p, n, scale=math.exp(MAX_LOGIT_SCALE))
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-4)
    out.loss.backward()
    assert model.logit_scale.grad.item() == 0.0  # clamped: no push further down


def test_forward_without_pair_or_with_return_loss_false_has_no_loss(model):
    batch = SLQDataCollator(model.processor)(_pairs(2))
    assert model(**batch, return_loss=False).loss is None
    plain = {k: v for k, v in batch.items() if not k.startswith("positive_")}
    out = model(**plain)
    assert out.loss is None and out.positive_pooler_output is None


def test_symmetric_infonce_rejects_misaligned_sides():
    with pytest.raises(ValueError, match="same shape"):
        symmetric_infonce(torch.randn(3, 8), torch.randn(2, 8), torch.tensor(0.0))
    with pytest.raises(ValueError, match="negative"):
        symmetric_infonce(torch.randn(3, 8), torch.randn(3, 8), torch.tensor(0.0), negative=torch.randn(2, 4))


# ------------------------------------------------------------------------------------------------ collator
def test_collator_batch_key_convention(model):
    examples, *_ = _loss_batch()
    batch = SLQDataCollator(model.processor)(examples)
    assert batch["input_ids"].shape[0] == 3 and batch["positive_input_ids"].shape[0] == 3
    assert batch["negative_input_ids"].shape[0] == 2  # only the examples that have a negative
    # Query side: 2 images (example 0's image, example 2's image+text); positive side: 2 images; negatives: 1 image.
    assert batch["image_grid_thw"].shape[0] == 2
    assert batch["positive_image_grid_thw"].shape[0] == 2
    assert batch["negative_image_grid_thw"].shape[0] == 1
    assert "negative_input_ids" not in SLQDataCollator(model.processor)(_pairs(2))


@pytest.mark.parametrize("examples, message", [
    ([{"image": _scene((1, 2, 3)), "text": "ok"}, "just a string"], "example 1 of the batch is a str"),
    ([{"image": _scene((1, 2, 3)), "text": "ok"}, {"query": "a"}], "example 1 of the batch has only"),
    ([{"query": "a", "positive": "b", "negatve": "c"}], "example 0 of the batch has unexpected keys"),
    ([{"image": _scene((1, 2, 3)), "text": "ok", "id": 7}], "example 0 of the batch has unexpected keys"),
    ([{"image": _scene((1, 2, 3)), "text": "ok"}, {}], "remove_unused_columns=False"),
])
def test_collator_format_errors_name_the_example(model, examples, message):
    with pytest.raises(ValueError, match=message):
        SLQDataCollator(model.processor)(examples)


def test_collator_skips_unreadable_examples_or_fails_when_strict(model, tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really an image")
    examples = [*_pairs(2), {"image": str(broken), "text": "corrupt"},
                {"query": "", "positive": "empty query text"}, {"image": str(tmp_path / "missing.jpg"), "text": "x"}]
    with pytest.raises(SLQInputError, match=r"example 2 of the batch.*broken\.png"):
        SLQDataCollator(model.processor, strict=True)(examples)

    collator = SLQDataCollator(model.processor)
    with caplog.at_level(logging.WARNING, logger="slq_hf.training.collator"):
        batch = collator(examples)
    assert batch["input_ids"].shape[0] == 2 and batch["positive_input_ids"].shape[0] == 2
    assert [s.index for s in collator.skipped] == [2, 3, 4] and collator.num_skipped == 3
    assert "broken.png" in caplog.text and "missing.jpg" in caplog.text
    with pytest.raises(SLQInputError, match="All 1 examples"):
        collator([{"image": str(broken), "text": "corrupt"}])


# ------------------------------------------------------------------------------------------------ readers
def _write_jsonl(folder: Path, count: int, corrupt: bool = False) -> Path:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (name, rgb) in enumerate(list(COLOURS.items())[:count]):
        _scene(rgb).save(images / f"{name}.png")
        if index % 2:
            lines.append({"query": f"a {name} square", "positive": {"image": f"images/{name}.png"}})
        else:
            lines.append({"image": f"images/{name}.png", "text": f"a {name} square"})
    if corrupt:
        (images / "corrupt.jpg").write_bytes(b"not a jpeg")
        lines.append({"image": "images/corrupt.jpg", "text": "unreadable"})
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


def test_read_jsonl_resolves_paths_relative_to_the_file(tmp_path, model, monkeypatch):
    path = _write_jsonl(tmp_path / "data", 4)
    monkeypatch.chdir(tmp_path)  # paths must not depend on the working directory
    data = read_jsonl(path)
    assert len(data) == 4
    assert data[0]["image"] == str((tmp_path / "data" / "images" / "red.png").resolve())
    assert data[1]["query"] == {"text": "a green square"}  # a JSONL string is a text, never a guessed path
    assert data[1]["_source"].endswith("pairs.jsonl:2")
    batch = SLQDataCollator(model.processor, strict=True)([data[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4


@pytest.mark.parametrize("line, message", [
    ("{not json", r"pairs\.jsonl:2: invalid JSON"),
    ('{"image": "a.png"}', r"pairs\.jsonl:2: a pair line needs exactly one of \['text'"),
    ('{"query": "a", "positive": 3}', r"pairs\.jsonl:2: 'positive' is int"),
    ('["a", "b"]', r"pairs\.jsonl:2: expected a JSON object"),
])
def test_read_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.png", "text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_hf_dataset_with_caption_lists_and_a_corrupt_image(model):
    import io

    import datasets

    good = io.BytesIO()
    _scene(COLOURS["red"]).save(good, format="PNG")
    features = datasets.Features({"img": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string")),
                                  "id": datasets.Value("int32")})
    table = datasets.Dataset.from_dict(
        {"img": [{"bytes": good.getvalue(), "path": "red.png"}, {"bytes": b"garbage", "path": "bad.png"}],
         "captions": [["a red square", "red on grey"], ["broken"]], "id": [0, 1]}, features=features)
    data = HFPairDataset(table, image_column="img", text_column="captions")
    assert len(data) == 3  # one pair per caption
    assert data[1]["text"] == "red on grey"
    collator = SLQDataCollator(model.processor)
    batch = collator([data[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 2 and collator.num_skipped == 1
    assert "bad.png" in collator.skipped[0].reason
    with pytest.raises(ValueError, match="not in the dataset"):
        HFPairDataset(table, image_column="image")


# ------------------------------------------------------------------------------------------------ Trainer
def test_plain_trainer_trains_only_queries_and_saves_a_queries_only_folder(model, tmp_path):
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    queries_before, scale_before = model.queries.detach().clone(), model.logit_scale.item()
    out = tmp_path / "out"
    trainer = Trainer(model=model, args=_args(out, max_steps=2, save_strategy="steps", save_steps=2),
                      train_dataset=_pairs(4), data_collator=SLQDataCollator(model.processor))
    trainer.train()
    trainer.save_model()

    assert all(torch.equal(backbone_before[k], v) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(model.queries.detach(), queries_before)
    assert model.logit_scale.item() != scale_before  # the temperature is learned too
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["logit_scale", "latent_queries.default"]

    for folder in (out, out / "checkpoint-2"):
        assert set(load_file(folder / "model.safetensors")) == {"queries", "logit_scale"}
        assert [f.name for f in folder.glob("*.safetensors")] == ["model.safetensors"]
        assert not list(folder.glob("pytorch_model*"))  # (training_args.bin is the Trainer's arguments, no weights)
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == 2  # Adam moments for queries and logit_scale only
    assert (out / "checkpoint-2" / "scheduler.pt").is_file()

    reloaded = AutoModel.from_pretrained(out)
    assert isinstance(reloaded, SLQModel)
    assert torch.equal(reloaded.queries, model.queries.detach())
    assert reloaded.logit_scale.item() == model.logit_scale.item()


def test_weight_decay_applies_to_queries_and_head_weight_never_to_the_temperature(backbone, tmp_path):
    """SLQTrainer's weight decay shrinks the queries (and a projection head's weight), not logit_scale: with zero
    gradients, one AdamW step decays exactly those parameters by lr x weight_decay."""
    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES, projection_dim=8)
    with torch.no_grad():
        model.projection.bias.fill_(0.3)  # non-zero, so a decay would show
    trainer = SLQTrainer(model=model, args=_args(tmp_path, weight_decay=0.5, learning_rate=0.1),
                         data_collator=SLQDataCollator(model.processor))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.create_optimizer()
    for parameter in before:
        model.get_parameter(parameter).grad = torch.zeros_like(before[parameter])
    trainer.optimizer.step()
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name in ("latent_queries.default", "projection.weight"):
        assert torch.allclose(after[name], before[name] * (1 - 0.1 * 0.5), rtol=1e-6, atol=0), name
    for name in ("logit_scale", "projection.bias"):
        assert torch.equal(after[name], before[name]), name


def test_resume_from_checkpoint_ends_with_the_same_queries(backbone, tmp_path):
    def run(out: Path, resume: str | None = None, stop_at: int | None = None) -> SLQModel:
        model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
        trainer = Trainer(model=model, args=_args(out, max_steps=4, save_strategy="steps", save_steps=2),
                          train_dataset=_pairs(8), data_collator=SLQDataCollator(model.processor),
                          callbacks=[stop_at_step(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", stop_at=2)
    assert not torch.equal(interrupted.queries, uninterrupted.queries)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    assert torch.allclose(resumed.queries, uninterrupted.queries, rtol=0, atol=1e-6)
    assert resumed.logit_scale.item() == pytest.approx(uninterrupted.logit_scale.item(), abs=1e-6)


def test_slq_trainer_keeps_columns_skips_corrupt_examples_and_reports_them(model, tmp_path, caplog):
    data = read_jsonl(_write_jsonl(tmp_path / "data", 4, corrupt=True))  # 5 examples, the last unreadable
    args = _args(tmp_path / "out", num_train_epochs=1, remove_unused_columns=True, per_device_eval_batch_size=5)
    trainer = SLQTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                         data_collator=SLQDataCollator(model.processor))
    with caplog.at_level(logging.WARNING, logger="slq_hf.training.trainer"):
        result = trainer.train()
    assert result.global_step == 3  # the epoch ran to its end: ceil(5 / 2) steps
    assert "1 train example(s) could not be loaded and were skipped" in caplog.text
    assert "corrupt.jpg" in caplog.text
    metrics = trainer.evaluate()
    # {"image", "text"} pairs: the query side is the image, so query -> positive is image -> text
    assert {"eval_loss", "eval_i2t_R@1", "eval_t2i_R@1", "eval_mean_R@1"} <= set(metrics)
    # Check R@1 over the 4 readable eval pairs against the model's own embeddings.
    readable = [data[i] for i in range(4)]
    batch = SLQDataCollator(model.processor)(readable)
    with torch.no_grad():
        out = model(**batch)
    scores = out.pooler_output @ out.positive_pooler_output.T
    i2t = 100 * (scores.argmax(dim=1) == torch.arange(4)).float().mean().item()
    t2i = 100 * (scores.argmax(dim=0) == torch.arange(4)).float().mean().item()
    assert metrics["eval_i2t_R@1"] == pytest.approx(i2t) and metrics["eval_t2i_R@1"] == pytest.approx(t2i)
    assert metrics["eval_mean_R@1"] == pytest.approx((i2t + t2i) / 2)


def test_4bit_backbone_training_step_has_exact_query_gradients(backbone, tmp_path):
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    # The tiny vision tower (32 wide) is narrower than bitsandbytes' CPU 4-bit block (64): keep it unquantised, as
    # in test_core. The whole text model is NF4.
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.visual", "lm_head"])
    model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES, quantization_config=quant)
    assert model.queries.dtype == torch.float32
    model.encode(["a red square", _scene(COLOURS["red"])])  # zero-shot use first (may repack weights on some CPUs)
    batch = SLQDataCollator(model.processor)(_pairs(3))
    model(**batch).loss.backward()

    # Reference: the fp32 backbone with every quantised weight replaced by its dequantised value. Same function, so
    # the query gradients must agree: a 4-bit layer without a backward would make them differ.
    reference = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
    layers = {n: m for n, m in model.backbone.named_modules() if isinstance(m, Linear4bit)}
    assert layers
    with torch.no_grad():
        for name, module in reference.backbone.named_modules():
            if name in layers:
                module.weight.copy_(bnbf.dequantize_4bit(layers[name].weight.data, layers[name].weight.quant_state))
    reference(**batch).loss.backward()
    torch.testing.assert_close(model.queries.grad, reference.queries.grad, rtol=1e-4, atol=1e-6)

    packed = {n: m.weight.detach().clone() for n, m in layers.items()}
    queries_before = model.queries.detach().clone()
    trainer = Trainer(model=model, args=_args(tmp_path / "out", max_steps=1), train_dataset=_pairs(2),
                      data_collator=SLQDataCollator(model.processor))
    trainer.train()
    assert model.queries.dtype == torch.float32
    assert torch.isfinite(model.queries).all() and not torch.equal(model.queries.detach(), queries_before)
    assert all(torch.equal(layers[n].weight, w) for n, w in packed.items())


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_train_end_to_end(backbone, tmp_path, capsys):
    from slq_hf.cli import main
    from slq_hf.training.trainer import metric_directions

    train = _write_jsonl(tmp_path / "train", 6, corrupt=True)
    val = _write_jsonl(tmp_path / "val", 3)
    out = tmp_path / "slq-out"
    argv = ["train", "--backbone", backbone, "--train-data", str(train), "--output-dir", str(out), "--num-queries",
            str(NUM_QUERIES), "--epochs", "1", "--lr", "1e-2", "--batch-size", "4", "--eval-data", str(val),
            "--use-cpu", "--logging-steps", "1"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout[stdout.rindex('{\n  "output_dir"'):])
    assert summary == json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert summary["train_data"] == {"path": str(train), "examples": 7}
    assert summary["contrastive_batch"] == 4 and summary["lr_scheduler"] == "cosine"
    assert {"eval_loss", "eval_t2i_R@1", "eval_i2t_R@1"} <= set(summary["final_eval"])
    assert summary["best_metric"]["name"] == "eval_mean_R@1"
    assert "Plan: 7 training pairs" in stdout and "contrastive batch 4 pairs" in stdout
    assert set(load_file(out / "model.safetensors")) == {"queries", "logit_scale"}
    reloaded = AutoModel.from_pretrained(out)
    assert reloaded.config.num_queries == NUM_QUERIES
    assert reloaded.encode(["a red square"]).shape == (1, reloaded.config.hidden_size)

    capsys.readouterr()
    strict_out = tmp_path / "strict-out"
    assert main([*argv[:6], str(strict_out), *argv[7:], "--strict"]) == 2
    err = capsys.readouterr().err
    reported = [line for line in err.splitlines() if line.startswith("slq-hf train:")]
    assert len(reported) == 1 and "Traceback" not in err
    assert reported[0].startswith("slq-hf train: error: --train-data") and "corrupt.jpg" in reported[0]
    assert not (strict_out / "checkpoint-1").exists()  # checked before step 1
    assert metric_directions({"query": "a cat", "positive": {"image": "x.png"}}) == ("t2i", "i2t")
    assert metric_directions({"query": "a cat", "positive": "un chat"}) == ("query2positive", "positive2query")


def test_cli_train_help_explains_the_data_format(capsys):
    from slq_hf.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("--train-data", "--load-in-4bit", "--strict", '{"image": "images/0001.jpg"', "queries-only"):
        assert needle in text


def test_pair_dataset_checks_keys_up_front():
    with pytest.raises(ValueError, match="example 1"):
        PairDataset([{"image": _scene((0, 0, 0)), "text": "ok"}, {"text": "no image"}])


# ------------------------------------------------------------------------- runs are never lost or mixed
def _cli(backbone: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--backbone", backbone, "--train-data", str(data), "--output-dir", str(out), "--num-queries",
            str(NUM_QUERIES), "--lr", "1e-2", "--batch-size", "2", "--use-cpu", "--save-steps", "1", *extra]


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("slq-hf train:")]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_refuses_an_earlier_run_unless_resuming_or_overwriting(backbone, tmp_path, capsys):
    from slq_hf.cli import main

    data = _write_jsonl(tmp_path / "data", 4)
    out = tmp_path / "run"
    assert main(_cli(backbone, data, out, "--max-steps", "3")) == 0
    before = _tree(out)
    assert {"checkpoint-1", "checkpoint-2", "checkpoint-3"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()

    # A new run into the same folder (even with other settings) is refused before anything is written.
    for extra in ([], ["--max-steps", "2", "--lr", "5e-3"]):
        assert main(_cli(backbone, data, out, *extra)) == 2
        (line,) = _error_lines(capsys)
        assert "holds an earlier run" in line and "--overwrite-output-dir" in line and "checkpoint-1" in line
        assert _tree(out) == before

    # Resuming with other settings is refused and names the setting; with the run's own settings it says where from.
    assert main(_cli(backbone, data, out, "--max-steps", "3", "--lr", "5e-3", "--resume-from-checkpoint",
                     "latest")) == 2
    (line,) = _error_lines(capsys)
    assert "--lr was 0.01, now 0.005" in line
    assert main(_cli(backbone, data, out, "--max-steps", "3", "--resume-from-checkpoint",
                     str(tmp_path / "elsewhere" / "checkpoint-1"))) == 2
    assert "not a complete checkpoint" in _error_lines(capsys)[0]
    assert main(_cli(backbone, data, out, "--max-steps", "3", "--resume-from-checkpoint", "latest")) == 0
    assert f"Resuming from {out / 'checkpoint-3'}" in capsys.readouterr().out

    # --overwrite-output-dir with a mistake elsewhere in the command (a missing data file, an unknown eval metric)
    # fails with the earlier run untouched: nothing is deleted before every check has passed.
    before = _tree(out)
    for extra in (["--train-data", str(tmp_path / "typo.jsonl")],
                  ["--eval-data", str(data), "--metric-for-best-model", "nonsense"]):
        assert main(_cli(backbone, data, out, "--max-steps", "1", "--overwrite-output-dir", *extra)) == 2
        _error_lines(capsys)
        assert _tree(out) == before, extra
    # --overwrite-output-dir starts over: the old run's checkpoints are gone, never mixed with the new ones.
    assert main(_cli(backbone, data, out, "--max-steps", "1", "--overwrite-output-dir")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 1


def test_cli_overwrite_keeps_the_earlier_run_until_the_new_one_is_saved(backbone, tmp_path, capsys, monkeypatch):
    """--overwrite-output-dir deleted the earlier run before step 1: a new run that failed (Ctrl-C, a crash, a full
    disk) lost both. The earlier run now waits aside and comes back byte-identical when the new one does not
    finish, also after an overwrite that was killed (its aside folder is kept, its partial output dropped)."""
    from slq_hf.cli import main
    from slq_hf.training import SLQTrainer
    from slq_hf.training.run import EARLIER_RUN_DIR, set_aside_earlier_run

    data = _write_jsonl(tmp_path / "data", 4)
    out = tmp_path / "run"
    assert main(_cli(backbone, data, out, "--max-steps", "2")) == 0
    earlier = _tree(out)
    step = SLQTrainer.training_step
    calls = []

    def interrupted_at_step_2(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the new run's checkpoint-1 is on disk
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SLQTrainer, "training_step", interrupted_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        main(_cli(backbone, data, out, "--max-steps", "3", "--lr", "5e-3", "--overwrite-output-dir"))
    assert _tree(out) == earlier

    # A killed overwrite: the earlier run aside, the killed run's partial output in the folder.
    set_aside_earlier_run(out)
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (out / "slq_run.json").write_text("{}")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        main(_cli(backbone, data, out, "--max-steps", "3", "--overwrite-output-dir"))
    assert _tree(out) == earlier
    monkeypatch.undo()

    assert main(_cli(backbone, data, out, "--max-steps", "1", "--overwrite-output-dir")) == 0
    assert not (out / EARLIER_RUN_DIR).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 1


def test_cli_refuses_the_backbone_folder_and_keeps_save_total_limit(backbone, tmp_path, capsys):
    from slq_hf.cli import main

    data = _write_jsonl(tmp_path / "data", 4)
    before = _tree(Path(backbone))
    assert main(_cli(backbone, data, Path(backbone), "--max-steps", "1")) == 2
    assert "backbone" in _error_lines(capsys)[0]
    assert _tree(Path(backbone)) == before

    out = tmp_path / "limited"
    assert main(_cli(backbone, data, out, "--max-steps", "4", "--save-total-limit", "2")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_cli_errors_are_one_line(backbone, tmp_path, capsys):
    from slq_hf.cli import main

    data = _write_jsonl(tmp_path / "data", 4)
    missing_image, unreadable = tmp_path / "data" / "missing_image.jsonl", tmp_path / "data" / "unreadable.jsonl"
    missing_image.write_text(json.dumps({"image": "images/gone.png", "text": "a gone square"}) + "\n")
    (tmp_path / "data" / "images" / "bad.png").write_bytes(b"\x89PNG not really an image")
    unreadable.write_text("".join(json.dumps({"image": "images/bad.png", "text": f"bad {n}"}) + "\n" for n in (1, 2)))
    cases = {
        "missing.jsonl": (["--train-data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        "batch 1": (["--batch-size", "1"], "contrastive batch is 1"),
        "bad metric": (["--eval-data", str(data), "--metric-for-best-model", "r1"], "--metric-for-best-model r1"),
        # Held-out data: a missing file fails before training; an eval with nothing loadable stops the run.
        "eval missing image": (["--eval-data", str(missing_image)], "missing_image.jsonl:1: image file"),
        "eval unreadable": (["--eval-data", str(unreadable)], "None of the evaluation examples could be loaded"),
        # Options that would be silently ignored, and values no optimiser should get.
        "eval steps alone": (["--eval-steps", "5"], "--eval-steps only apply with --eval-data"),
        "metric alone": (["--metric-for-best-model", "t2i_R@1"], "--metric-for-best-model only apply with"),
        "column of a file": (["--image-column", "img"], "--image-column name columns of a datasets folder"),
        # Options that contradict each other: resume a run and delete it; GradCache that splits nothing.
        "resume and overwrite": (["--resume-from-checkpoint", "latest", "--overwrite-output-dir", ""],
                                 "pass one of them"),
        "micro of the whole batch": (["--micro-batch-size", "2"], "--micro-batch-size 2 is not smaller than"),
    }
    for name, (extra, needle) in cases.items():
        argv = _cli(backbone, data, tmp_path / name.replace(" ", "_"), "--max-steps", "1")
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value] if value else [flag]  # "" marks a switch
        assert main(argv) == 2, name
        lines = _error_lines(capsys)
        assert len(lines) == 1 and needle in lines[0], (name, lines)
    for flag in ("--weight-decay", "--warmup"):  # argparse refuses these itself (exit status 2, usage + one line)
        with pytest.raises(SystemExit) as exit_info:
            main([*_cli(backbone, data, tmp_path / "negative", "--max-steps", "1"), flag, "-1"])
        assert exit_info.value.code == 2
        assert f"argument {flag}: expected a number >= 0, got -1" in capsys.readouterr().err
    # --max-steps 0 used to save untrained queries with exit status 0, and a negative count to run --epochs.
    for flag, value, needle in (("--max-steps", "0", "expected a positive integer, got 0"),
                                ("--max-steps", "-3", "expected a positive integer, got -3"),
                                ("--dataloader-num-workers", "-1", "expected an integer >= 0, got -1")):
        with pytest.raises(SystemExit) as exit_info:
            main([*_cli(backbone, data, tmp_path / "bad_count"), flag, value])
        assert exit_info.value.code == 2
        assert f"argument {flag}: {needle}" in capsys.readouterr().err
        assert not (tmp_path / "bad_count").exists()


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_a_last_batch_of_one_pair_is_skipped_not_stepped(backbone, tmp_path, micro_batch_size):
    """5 pairs in batches of 2: the last batch is one pair, whose loss and gradient are 0, yet AdamW's step moved the
    queries by its momentum (and weight decay). That step is now skipped: the queries equal a run on the first 4
    pairs alone."""
    from torch.utils.data import SequentialSampler

    class InOrder(SLQTrainer):  # the same first 4 pairs in both runs
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

    def run(count: int) -> tuple[SLQModel, SLQTrainer]:
        model = SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES)
        trainer = InOrder(model=model, args=_args(tmp_path / str(count), num_train_epochs=1, learning_rate=0.05,
                                                  lr_scheduler_type="constant", weight_decay=0.1),
                          train_dataset=_pairs(count), data_collator=SLQDataCollator(model.processor),
                          micro_batch_size=micro_batch_size)
        trainer.train()
        return model, trainer

    (five, trainer), (four, _) = run(5), run(4)
    assert trainer.skipped_steps == 1
    assert torch.equal(five.queries, four.queries)
    assert not torch.equal(four.queries, SLQModel.from_backbone(backbone, num_queries=NUM_QUERIES).queries)


def test_batch_size_one_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="contrastive batch is 1"):
        SLQTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=1), train_dataset=_pairs(4),
                   data_collator=SLQDataCollator(model.processor))


def test_a_batch_of_only_unreadable_examples_is_skipped_and_counted(model, tmp_path, caplog):
    from torch.utils.data import SequentialSampler

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really an image")
    data = [*_pairs(2), {"image": str(broken), "text": "bad 1"}, {"image": str(tmp_path / "gone.jpg"), "text": "x"},
            *_pairs(4)[2:]]

    class InOrder(SLQTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

    queries = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            queries.append(model.queries.detach().clone())

    trainer = InOrder(model=model, args=_args(tmp_path / "out", num_train_epochs=1), train_dataset=data,
                      data_collator=SLQDataCollator(model.processor), callbacks=[Record()])
    with caplog.at_level(logging.WARNING, logger="slq_hf.training.trainer"):
        result = trainer.train()
    assert result.global_step == 3 and trainer.skipped_steps == 1
    assert torch.equal(queries[0], queries[1]) and not torch.equal(queries[1], queries[2])  # step 2 changed nothing
    assert "2 train example(s) could not be loaded" in caplog.text and "gone.jpg" in caplog.text
    assert "1 training step(s) were skipped" in caplog.text
    with pytest.raises(SLQInputError, match="All 2 examples"):  # without SLQTrainer it stays an error
        SLQDataCollator(model.processor)(data[2:4])


def test_best_checkpoint_by_eval_recall_becomes_the_final_model(model, tmp_path):
    """load_best_model_at_end with a retrieval metric: the final queries are those of the checkpoint whose eval
    recall was best (here step 2 of 4), through SLQTrainer's staged checkpoints."""
    recalls = iter([10.0, 50.0, 20.0, 30.0])

    def metrics(eval_pred):
        real = retrieval_metrics(eval_pred, ("i2t", "t2i"))
        assert set(real) == {"i2t_R@1", "t2i_R@1", "mean_R@1"}
        return {**real, "t2i_R@1": next(recalls)}

    args = _args(tmp_path / "out", max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                 save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_t2i_R@1",
                 per_device_eval_batch_size=4)
    trainer = SLQTrainer(model=model, args=args, train_dataset=_pairs(8), eval_dataset=_pairs(4),
                         data_collator=SLQDataCollator(model.processor), compute_metrics=metrics)
    trainer.train()
    assert trainer.state.best_metric == 50.0
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    saved = {step: load_file(tmp_path / "out" / f"checkpoint-{step}" / "model.safetensors") for step in (2, 4)}
    assert not torch.equal(saved[2]["queries"], saved[4]["queries"])
    assert torch.equal(model.queries.detach(), saved[2]["queries"])


@pytest.mark.parametrize(("steps", "weight_decay", "noted"), [(8, 0.0, True), (8, 1.0, False), (2, 0.0, False)])
def test_plan_notes_weight_decay_when_a_run_repeats_its_data(tmp_path, capsys, steps, weight_decay, noted):
    """Several epochs over the same pairs without weight decay get a note in the plan (the toy's knowledge transfer
    drops there); one epoch, or a run with weight decay, does not."""
    import argparse

    from transformers import TrainerState

    from slq_hf.training.run import PlanPrinter

    cli = argparse.Namespace(batch_size=4, micro_batch_size=None, train_data="train.jsonl", lr=1e-2,
                             lr_scheduler="cosine", warmup=0, weight_decay=weight_decay, num_queries=4,
                             pooling="mean", query_init="normal", eval_steps=None, save_steps=500, keep_last=False,
                             metric_for_best_model="mean_R@1", eval_data=None)
    state = TrainerState(max_steps=steps)
    PlanPrinter(cli, train_size=8, eval_size=0, resume=None).on_train_begin(_args(tmp_path), state, None)
    plan = capsys.readouterr().out
    assert f"= {steps * 4 / 8:.2f} epochs" in plan
    assert ("--weight-decay 1.0" in plan) == noted


@pytest.mark.parametrize(("pairs", "batch", "steps"), [(10, 4, 3), (33, 32, 2)])
def test_plan_counts_the_last_smaller_batch_of_an_epoch_as_a_step(tmp_path, capsys, pairs, batch, steps):
    """One epoch of 10 pairs in batches of 4 is 3 steps (4, 4, 2), of 33 in batches of 32 is 2. The plan printed
    "3 steps = 1.20 epochs" and "2 steps = 1.94 epochs", the latter with the several-epochs weight-decay note."""
    import argparse

    from transformers import TrainerState

    from slq_hf.training.run import PlanPrinter

    cli = argparse.Namespace(batch_size=batch, micro_batch_size=None, train_data="train.jsonl", lr=1e-2,
                             lr_scheduler="cosine", warmup=0, weight_decay=0.0, num_queries=4, pooling="mean",
                             query_init="normal", eval_steps=None, save_steps=500, keep_last=False,
                             metric_for_best_model="mean_R@1", eval_data=None)
    PlanPrinter(cli, train_size=pairs, eval_size=0, resume=None).on_train_begin(
        _args(tmp_path), TrainerState(max_steps=steps), None)
    plan = capsys.readouterr().out
    assert f"{steps} steps = 1.00 epochs" in plan
    assert "--weight-decay 1.0" not in plan


def _summary(out: Path) -> dict:
    return json.loads((out / "training_summary.json").read_text())


def test_cli_gradcache_with_eval_data_equals_the_plain_run(backbone, tmp_path, capsys):
    """`--micro-batch-size` with `--eval-data` trains and evaluates like the plain run: the same final queries, the
    same eval recalls and the same eval loss (evaluation uses --batch-size batches either way: the eval loss of a
    contrastive batch depends on its size). The micro-batch size is memory, not a setting of the run, so a resume
    may change it. Before the fix the first evaluation ended in a KeyError (no recall to pick the best checkpoint
    by), and the eval batch was the micro-batch."""
    from slq_hf.cli import main

    train, val = _write_jsonl(tmp_path / "train", 8), _write_jsonl(tmp_path / "val", 4)

    def cli(out: Path, *extra: str) -> list[str]:
        argv = _cli(backbone, train, out, "--max-steps", "2", "--eval-data", str(val), "--keep-last", *extra)
        argv[argv.index("--batch-size") + 1] = "4"
        return argv

    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert main(cli(plain)) == 0
    assert main(cli(cached, "--micro-batch-size", "2")) == 0
    capsys.readouterr()
    # Step 2 again from checkpoint-1, with another micro-batch size.
    assert main(cli(cached, "--micro-batch-size", "3", "--resume-from-checkpoint", str(cached / "checkpoint-1"))) == 0
    assert "Resuming from" in capsys.readouterr().out
    expected, got = _summary(plain)["final_eval"], _summary(cached)["final_eval"]
    assert {"eval_t2i_R@1", "eval_i2t_R@1", "eval_mean_R@1"} <= set(got)
    for key in ("eval_t2i_R@1", "eval_i2t_R@1", "eval_mean_R@1"):
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    queries = [load_file(out / "model.safetensors")["queries"] for out in (plain, cached)]
    assert torch.allclose(queries[1], queries[0], rtol=0, atol=1e-6)


def test_cli_metric_loss_keeps_the_checkpoint_with_the_lowest_eval_loss(backbone, tmp_path):
    """`--metric-for-best-model loss`: lower is better. It used to be compared with greater_is_better=True, which
    kept the checkpoint with the HIGHEST eval loss as the final model."""
    from slq_hf.cli import main

    data = _write_jsonl(tmp_path / "data", 4)
    out = tmp_path / "run"
    assert main(_cli(backbone, data, out, "--max-steps", "3", "--lr", "5e-2", "--eval-data", str(data),
                     "--metric-for-best-model", "loss")) == 0
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    losses = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    assert sorted(losses) == [1, 2, 3] and len(set(losses.values())) == 3
    lowest = min(losses, key=losses.get)
    summary = _summary(out)
    assert summary["best_metric"]["checkpoint"] == f"checkpoint-{lowest}"
    assert summary["best_metric"]["value"] == pytest.approx(losses[lowest])
    assert torch.equal(load_file(out / "model.safetensors")["queries"],
                       load_file(out / f"checkpoint-{lowest}" / "model.safetensors")["queries"])
