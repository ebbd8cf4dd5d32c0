"""The `slq-hf` commands as a user meets them: bad input ends in one clear error line and exit status 2 (1 when a
command ran but produced nothing usable), never a traceback; `--backbone` on every command that loads a model; the
model-card template found by an installed package, from any working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from slq_hf import SLQModel
from slq_hf.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def moved_model(tiny_backbone_path, tmp_path_factory):
    """(SLQ folder, the backbone's new location): trained on a backbone copy that was then moved away."""
    root = tmp_path_factory.mktemp("cli")
    shutil.copytree(tiny_backbone_path("qwen3_vl"), root / "backbone")
    model = SLQModel.from_backbone(str(root / "backbone"), num_queries=4)
    with torch.no_grad():
        model.queries.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(root / "slq")
    (root / "backbone").rename(root / "moved")
    return root / "slq", root / "moved"


@pytest.fixture
def data(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "blue.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "red.png", "text": "a red square"}) + "\n"
                    + json.dumps({"image": "blue.png", "text": "IMG_0042.JPG"}) + "\n")
    return path


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"slq-hf {command}: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _bad_inputs(tmp: Path, data: Path, model: Path) -> list[tuple[str, list[str], str]]:
    """(command, argv, what the error line must say) for each command's typical input mistakes."""
    missing, template = str(tmp / "missing.jsonl"), tmp / "template.txt"
    if tmp.is_dir():
        template.write_text("no placeholder")
    return [
        ("eval", ["--model", str(model), "--data", missing], "missing.jsonl: data file not found"),
        ("eval", ["--model", str(model), "--data", str(data), "--image-root", str(tmp)],
         "--image-root does not apply to the jsonl format"),
        ("eval", ["--model", str(model), "--data", str(data), "--batch-size", "0"], "--batch-size must be positive"),
        # A path that is neither a folder nor a Hub id: transformers calls it a malformed repo id.
        ("eval", ["--model", str(tmp / "nowhere"), "--data", str(data)], "nowhere: no such folder, and not a Hub id"),
        ("eval", ["--model", str(model), "--data", str(data), "--device", "banana"], "--device banana: "),
        ("eval", ["--model", str(model), "--data", str(data), "--device", "cuda:99"], "--device cuda:99: "),
        ("export", [str(tmp / "nowhere"), "--out", str(tmp / "hub")], "no config.json"),
        ("export", [str(model), "--out", str(tmp / "hub"), "--template", str(tmp / "none.md")], "--template PATH"),
        ("export", [str(model), "--out", str(tmp / "hub"), "--eval-results", missing],
         "cannot read the evaluation results"),
        ("push", [str(tmp / "nowhere"), "--repo-id", "org/name", "--dry-run"], "not a folder"),
        ("push", [str(tmp), "--repo-id", "not a repo id!", "--dry-run"], "is invalid (--repo-id)"),
        ("export", [str(model), "--out", str(tmp / "hub"), "--repo-id", "org/na me"], "is invalid (--repo-id)"),
        ("convert-reference", [str(tmp / "q.pt"), "--backbone", str(model), "--out", str(tmp / "o")], "no such file"),
        ("convert-reference", [str(data), "--backbone", str(tmp / "nowhere"), "--out", str(tmp / "o")],
         "--backbone " + str(tmp / "nowhere") + ": no such folder"),
        ("karr-build", ["--data", missing, "--model", str(model), "--out", str(tmp / "k.jsonl")],
         "data file not found"),
        ("karr-build", ["--data", str(data), "--model", str(model), "--out", str(tmp / "k.jsonl"),
                        "--template", str(template)], "has no {caption} placeholder"),
        ("karr-build", ["--data", str(data), "--model", str(model), "--out", str(tmp / "k.jsonl"),
                        "--template", str(tmp / "none.txt")], "none.txt: no such file; give a text file"),
        ("karr-build", ["--data", str(data), "--model", str(tmp / "nowhere"), "--out", str(tmp / "k.jsonl")],
         "--model " + str(tmp / "nowhere") + ": no such folder"),
        ("karr-build", ["--data", str(data), "--model", str(model), "--out", str(tmp / "k.jsonl"), "--limit", "0"],
         "--limit (limit=) must be a positive integer"),
        ("karr-build", ["--data", str(data), "--model", str(model), "--out", str(tmp / "k.jsonl"), "--device",
                        "banana"], "--device banana: "),
        ("karr-build", ["--data", str(data), "--model", str(model), "--out", str(tmp)], "--out "),
        ("karr-build", ["--data", str(data), "--model", str(model), "--out", str(tmp / "k.jsonl"), "--skipped",
                        str(data / "s.jsonl")], "is a file, so nothing can be written under it"),
        ("train", ["--backbone", str(tmp / "nowhere"), "--train-data", missing, "--output-dir", str(tmp / "run")],
         "missing.jsonl"),
        ("train", ["--backbone", str(tmp / "nowhere"), "--train-data", str(data), "--output-dir", str(tmp / "run")],
         "--backbone " + str(tmp / "nowhere") + ": no such folder"),
        ("train", ["--backbone", str(tmp), "--train-data", str(data), "--output-dir", str(tmp / "run")],
         "--backbone " + str(tmp) + ": no config.json, so not a model folder"),
        ("train", ["--backbone", str(data), "--train-data", str(data), "--output-dir", str(tmp / "run")],
         "--backbone " + str(data) + ": is a file"),
    ]


CASES = [f"{command}-{n}" for n, (command, _, _) in enumerate(_bad_inputs(Path("t"), Path("d"), Path("m")))]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_error_line_and_status_2(case, moved_model, data, tmp_path, capsys):
    model, _ = moved_model
    command, argv, message = _bad_inputs(tmp_path, data, model)[CASES.index(case)]
    assert main([command, *argv]) == 2
    assert message in _one_error_line(capsys, command)
    assert not (tmp_path / "hub").exists() and not (tmp_path / "k.jsonl").exists()


def test_a_folder_that_is_not_slq_gets_no_backbone_hint(moved_model, data, capsys):
    """--backbone does not turn a backbone's own folder into an SLQ model: the error must not suggest it."""
    _, backbone = moved_model
    assert main(["eval", "--model", str(backbone), "--data", str(data), "--split", "all", "--no-progress"]) == 2
    line = _one_error_line(capsys, "eval")
    assert "not an SLQ one" in line and "--backbone" not in line, line


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "inf"], ["train", "--epochs", "inf"], ["train", "--warmup", "inf"],
    ["train", "--weight-decay", "inf"], ["convert-reference", "--dtype", "banana"],
])
def test_options_argparse_refuses(argv, tiny_backbone_path, data, tmp_path, capsys):
    """Values no run can use stop at the command line: --lr inf trained and saved Inf/NaN queries with status 0,
    --epochs inf crashed inside the Trainer, --dtype banana inside torch (tracebacks)."""
    command, *option = argv
    required = {"train": ["--backbone", tiny_backbone_path("qwen3_vl"), "--train-data", str(data), "--output-dir",
                          str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--use-cpu"],
                "convert-reference": [str(tmp_path / "q.pt"), "--backbone", tiny_backbone_path("qwen3_vl"), "--out",
                                      str(tmp_path / "run")]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *required, *option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option[0]}: " in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_version():
    import re

    declared = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    result = subprocess.run([sys.executable, "-m", "slq_hf.cli", "--version"], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stdout == f"slq-hf {declared}\n", result


# The `slq-hf` program with a real SIGINT (as Ctrl-C in a terminal sends) during the first training step.
INTERRUPTED_TRAIN = """
import os, signal, sys
from slq_hf.cli import main
from slq_hf.training import SLQDataCollator
collate = SLQDataCollator.__call__
def interrupted(self, *args, **kwargs):
    batch = collate(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)
    return batch
SLQDataCollator.__call__ = interrupted
signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner's worker may ignore SIGINT
sys.exit(main())
"""


def test_ctrl_c_ends_in_one_line_and_status_130_and_leaves_the_folder_usable(tiny_backbone_path, data, tmp_path,
                                                                              capsys):
    """Ctrl-C: one line, status 130 (a shell's status for SIGINT), no traceback; the output folder holds nothing to
    resume, so the same command runs again (it was refused as "an earlier run", and the suggested
    --resume-from-checkpoint latest then found no checkpoint)."""
    argv = ["train", "--backbone", tiny_backbone_path("qwen3_vl"), "--train-data", str(data), "--output-dir",
            str(tmp_path / "run"), "--num-queries", "2", "--max-steps", "2", "--batch-size", "2", "--use-cpu"]
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_TRAIN, *argv], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["slq-hf train: error: interrupted (Ctrl-C)."], result.stderr[-3000:]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_every_command_is_covered_by_the_bad_input_test(moved_model, data, tmp_path):
    from slq_hf.cli import COMMANDS

    covered = {command for command, _, _ in _bad_inputs(tmp_path, data, moved_model[0])}
    mine = {"train", "eval", "export", "push", "convert-reference", "karr-build"}
    assert mine <= set(COMMANDS) and covered == mine


@pytest.mark.parametrize("flag", ["--output", "--gap-plot", "--cache-dir"])
def test_eval_outputs_that_cannot_be_written_end_in_one_error_line(flag, moved_model, data, tmp_path, capsys):
    """Writing the results (after the evaluation) or the cache is reported like bad input, not as a traceback."""
    model, backbone = moved_model
    target = {"--output": data.parent / "red.png" / "results.json", "--gap-plot": data.parent,
              "--cache-dir": data}[flag]  # under a file / a folder where a file goes / a file where a folder goes
    argv = ["eval", "--model", str(model), "--backbone", str(backbone), "--data", str(data), "--split", "all",
            "--no-progress", flag, str(target)]
    assert main(argv) == 2
    line = _one_error_line(capsys, "eval")
    assert str(target) in line and (flag if flag != "--cache-dir" else "(--cache-dir) cannot be used") in line, line


def test_a_real_process_prints_no_traceback(data, tmp_path):
    """The installed entry point, as a shell user runs it: one line on stderr, exit status 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "slq_hf.cli", "eval", "--model", str(tmp_path / "nowhere"),
                             "--data", str(data), "--format", "karr"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("slq-hf eval: error: "), result.stderr
    assert "pairs.jsonl:1: a KARR line needs" in result.stderr


def test_karr_build_that_keeps_nothing_exits_1(moved_model, data, tmp_path, monkeypatch, capsys):
    from slq_hf.data import karr_build

    model, moved = moved_model
    monkeypatch.setattr(karr_build, "rewrite_captions", lambda *args, **kwargs: ["a red square", ""])
    assert main(["karr-build", "--data", str(data), "--model", str(model), "--backbone", str(moved),
                 "--out", str(tmp_path / "k.jsonl")]) == 1
    assert f"no rewrite was kept, so --out {tmp_path / 'k.jsonl'} was left as it was" in _one_error_line(
        capsys, "karr-build")
    assert not (tmp_path / "k.jsonl").exists()


# -------------------------------------------------------------------------------------------------- --backbone
def test_eval_takes_backbone_like_export(moved_model, data, tmp_path, capsys):
    model, moved = moved_model
    assert main(["eval", "--model", str(model), "--data", str(data), "--split", "all", "--no-progress"]) == 2
    line = _one_error_line(capsys, "eval")
    assert "--backbone" in line and "backbone" in line  # names the missing backbone and how to point elsewhere
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model), "--backbone", str(moved), "--data", str(data), "--split", "all",
                 "--no-progress", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["backbone"] == str(moved)
    # The same numbers as evaluating the folder loaded by hand with the backbone's new location.
    from slq_hf.evaluation import evaluate_retrieval, load_retrieval_dataset

    reference = evaluate_retrieval(SLQModel.from_pretrained(model, backbone_name_or_path=str(moved)),
                                   load_retrieval_dataset(data, split="all"), show_progress_bar=False)
    for direction in ("t2i", "i2t"):
        assert result["metrics"][direction]["R@1"] == pytest.approx(reference["metrics"][direction]["R@1"])
        assert result["metrics"][direction]["mean_rank"] == pytest.approx(reference["metrics"][direction]["mean_rank"])


@pytest.mark.parametrize("command", ["eval", "karr-build"])
def test_model_loading_commands_document_backbone(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--backbone ID_OR_PATH" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- export after an install
def test_the_template_is_one_file_inside_the_package():
    from slq_hf.hub.card import MODEL_CARD_TEMPLATE

    assert MODEL_CARD_TEMPLATE.parent == REPO / "slq_hf" / "hub"
    assert (REPO / "MODEL_CARD.md").resolve() == MODEL_CARD_TEMPLATE.resolve()  # the repository's card: same file


def test_export_from_an_installed_copy_in_another_directory(moved_model, tmp_path):
    """A regular install holds only the package: copy slq_hf/ alone (no repository around it) and export from an
    unrelated working directory; the card must still render from the packaged template."""
    model, moved = moved_model
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "slq_hf", site / "slq_hf", ignore=shutil.ignore_patterns("__pycache__"))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = (f"import slq_hf, sys; assert slq_hf.__file__.startswith({str(site)!r}), slq_hf.__file__; "
            "from slq_hf.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "export", str(model), "--out", "hub", "--backbone",
                             "Qwen/Qwen3-VL-2B-Instruct", "--backbone-revision", "abc123"], capture_output=True,
                            text=True, env=env, cwd=cwd, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    card = (cwd / "hub" / "README.md").read_text()
    assert "Qwen/Qwen3-VL-2B-Instruct" in card and "No evaluation results were provided" in card


def test_export_renders_what_train_recorded(tiny_backbone_path, data, tmp_path, capsys):
    """`slq-hf train` then `slq-hf export`: the card's training section holds the run's own numbers."""
    run = tmp_path / "run"
    assert main(["train", "--backbone", tiny_backbone_path("qwen3_vl"), "--train-data", str(data), "--output-dir",
                 str(run), "--num-queries", "2", "--max-steps", "2", "--batch-size", "2", "--lr", "0.001",
                 "--use-cpu", "--save-steps", "1"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "were not recorded" not in card
    for row in ("| steps | 2 |", "| batch size per device | 2 |", f"| train data path | {data} |"):
        assert row in card, card[card.find("## Training"):][:1500]
    assert "| lr | 0.001 |" in card or "| learning rate | 0.001 |" in card


def test_max_batch_tokens_reaches_the_loaded_model(moved_model, data, tmp_path, capsys):
    # Every model-loading command takes --max-batch-tokens; it sets the model's token budget per forward, which
    # encode (and so eval and index build) uses by default. tests/test_budgets.py checks it leaves embeddings equal.
    import argparse

    from slq_hf.commands.common import load_model

    model, moved = moved_model
    args = argparse.Namespace(model=str(model), backbone=str(moved), device="cpu", max_batch_tokens=64)
    assert load_model(args).max_batch_tokens == 64
    assert main(["eval", "--model", str(model), "--backbone", str(moved), "--data", str(data), "--split", "all",
                 "--no-progress", "--max-batch-tokens", "0"]) == 2
    assert "--max-batch-tokens 0" in _one_error_line(capsys, "eval")
    metrics = []
    for extra in ([], ["--max-batch-tokens", "64"]):
        out = tmp_path / f"r{len(extra)}.json"
        assert main(["eval", "--model", str(model), "--backbone", str(moved), "--data", str(data), "--split", "all",
                     "--no-progress", "--batch-size", "2", "--output", str(out), *extra]) == 0
        metrics.append(json.loads(out.read_text())["metrics"])
    for direction in ("t2i", "i2t"):  # a token budget changes batching, never the results
        assert metrics[0][direction] == pytest.approx(metrics[1][direction])


def test_train_on_a_karpathy_json_keeps_its_test_split_out(tiny_backbone_path, tmp_path, capsys):
    """A Karpathy JSON holds train, restval, val and test: `slq-hf train` reads its train split with restval (it read
    every split, test included), --eval-data its val split; --split / --eval-split choose others ('all': all)."""
    splits = {"train": 3, "restval": 2, "val": 4, "test": 5}  # images per split, one caption each
    images = []
    for split, count in splits.items():
        for n in range(count):
            Image.new("RGB", (32, 32), (40 * n, 100, 200)).save(tmp_path / f"{split}{n}.png")
            images.append({"filename": f"{split}{n}.png", "split": split,
                           "sentences": [{"raw": f"square {n} of the {split} split"}]})
    coco = tmp_path / "dataset_coco.json"
    coco.write_text(json.dumps({"images": images}))

    def examples(*options: str) -> tuple[int, int]:
        run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        assert main(["train", "--backbone", tiny_backbone_path("qwen3_vl"), "--train-data", str(coco), "--eval-data",
                     str(coco), "--output-dir", str(run), "--num-queries", "2", "--max-steps", "1", "--batch-size",
                     "2", "--use-cpu", *options]) == 0, capsys.readouterr().err
        summary = json.loads((run / "training_summary.json").read_text())
        return summary["train_data"]["examples"], summary["eval_data"]["examples"]

    assert examples() == (5, 4)
    assert examples("--split", "all", "--eval-split", "test") == (14, 5)
