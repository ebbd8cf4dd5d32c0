"""Loading is safe: only safetensors are read, pickles are refused (and never unpickled), loaded tensors are checked,
and which Python code runs at load time is exactly what README's reliability section documents.

Every pickle used here is a real exploit probe: unpickling it writes a marker file. The probe is shown to work
(negative control), then every loading path is shown not to trigger it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from slq_hf import SLQModel
from slq_hf.hub import convert_reference
from slq_hf.modeling.checkpoint import WEIGHTS_NAME, CheckpointError

from helpers import sparse_query_file

NUM_QUERIES = 4


class _Exploit:
    """Unpickling this object runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickle code ran')",)


def _evil_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"queries": _Exploit(marker)}))
    return path


@pytest.fixture(scope="module")
def model(tiny_backbone_path):
    return SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=NUM_QUERIES)


@pytest.fixture
def saved(model, tmp_path) -> Path:
    out = tmp_path / "slq"
    model.save_pretrained(out)
    return out


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def test_probe_works_when_unpickled(tmp_path, marker):
    """Negative control: the probe really runs code when something unpickles it."""
    probe = _evil_pickle(tmp_path / "probe.bin", marker)
    pickle.loads(probe.read_bytes())
    assert marker.read_text() == "pickle code ran"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "queries.pt"])
@pytest.mark.parametrize("loader", ["automodel", "slqmodel"])
def test_pickle_instead_of_safetensors_is_refused_unread(saved, marker, name, loader):
    (saved / WEIGHTS_NAME).unlink()
    _evil_pickle(saved / name, marker)
    load = AutoModel.from_pretrained if loader == "automodel" else SLQModel.from_pretrained
    with pytest.raises(OSError) as info:
        load(saved)
    message = str(info.value)
    assert name in message and "pickle" in message and "convert-reference" in message
    assert not marker.exists()


def test_pickle_renamed_to_model_safetensors_is_refused_unread(saved, marker):
    _evil_pickle(saved / WEIGHTS_NAME, marker)
    with pytest.raises(ValueError, match="not a readable safetensors file.*Only safetensors are loaded"):
        AutoModel.from_pretrained(saved)
    assert not marker.exists()


def test_pickle_next_to_safetensors_is_ignored(saved, model, marker):
    for name in ("pytorch_model.bin", "model.pt", "queries.pt", "training_args.bin"):
        _evil_pickle(saved / name, marker)
    loaded = AutoModel.from_pretrained(saved)
    assert torch.equal(loaded.queries, model.queries)
    assert not marker.exists()


def test_load_trainable_state_refuses_pickles(model, tmp_path, marker):
    evil = _evil_pickle(tmp_path / "queries.safetensors", marker)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        model.load_trainable_state(evil)
    assert not marker.exists()


def test_sentence_transformers_loading_refuses_pickles(saved, marker):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    (saved / WEIGHTS_NAME).unlink()
    _evil_pickle(saved / "pytorch_model.bin", marker)
    with pytest.raises(OSError, match="pickle"):
        SentenceTransformer(str(saved), trust_remote_code=True, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("cut", ["header", "data", "empty"])
def test_truncated_or_garbage_safetensors(saved, cut):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"header": data[:6], "data": data[: len(data) - 40], "empty": b""}[cut])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        AutoModel.from_pretrained(saved)


# ------------------------------------------------------------------------------------------------ tensor checks
def _state(model: SLQModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def _bad_states(model: SLQModel) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    hidden = model.config.hidden_size
    good = _state(model)
    nan_queries = good["queries"].clone()
    nan_queries[1, 3] = float("nan")
    inf_queries = good["queries"].clone()
    inf_queries[0, 0] = float("inf")
    return {
        "too many queries": ({**good, "queries": torch.zeros(NUM_QUERIES + 1, hidden)}, r"shape \(5, 64\)"),
        "1-d queries": ({**good, "queries": torch.zeros(NUM_QUERIES * hidden)}, "shape"),
        "int queries": ({**good, "queries": torch.zeros(NUM_QUERIES, hidden, dtype=torch.int32)}, "dtype"),
        "bool queries": ({**good, "queries": torch.zeros(NUM_QUERIES, hidden, dtype=torch.bool)}, "dtype"),
        "nan queries": ({**good, "queries": nan_queries}, "NaN or Inf"),
        "inf queries": ({**good, "queries": inf_queries}, "NaN or Inf"),
        "-inf temperature": ({**good, "logit_scale": torch.tensor(float("-inf"))}, "'logit_scale'.*NaN or Inf"),
        "scalar shape": ({**good, "logit_scale": torch.ones(2)}, "'logit_scale' has shape"),
        "missing temperature": ({"queries": good["queries"]}, r"missing \['logit_scale'\]"),
        "extra tensor": ({**good, "backbone.lm_head.weight": torch.zeros(2, 2)}, "unexpected"),
    }


@pytest.mark.parametrize("case", ["too many queries", "1-d queries", "int queries", "bool queries", "nan queries",
                                  "inf queries", "-inf temperature", "scalar shape", "missing temperature",
                                  "extra tensor"])
def test_loaded_tensors_are_checked(model, saved, case):
    state, message = _bad_states(model)[case]
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=message) as info:
        AutoModel.from_pretrained(saved)
    assert str(saved / WEIGHTS_NAME) in str(info.value)


def test_failed_load_leaves_queries_untouched(model):
    before = model.queries.detach().clone()
    state, _ = _bad_states(model)["nan queries"]
    with pytest.raises(ValueError):
        model.load_trainable_state(state)
    assert torch.equal(model.queries, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_converted_to_fp32(model, saved, dtype):
    state = _state(model)
    state["queries"] = state["queries"].to(dtype)
    save_file(state, str(saved / WEIGHTS_NAME))
    loaded = AutoModel.from_pretrained(saved)
    assert loaded.queries.dtype == torch.float32
    assert torch.equal(loaded.queries, state["queries"].float())


# --------------------------------------------------------------------------------------------- hidden sizes
def _narrow_backbone(source: str, out: Path) -> Path:
    """The tiny Qwen3-VL with a 32-wide language model (and vision output): another backbone of the same family."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(source)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 32, 64, 2, 1
    config.vision_config.out_hidden_size = 32
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    AutoProcessor.from_pretrained(source).save_pretrained(out)
    return out


def test_backbone_with_another_hidden_size_names_both(saved, tiny_backbone_path, tmp_path):
    narrow = _narrow_backbone(tiny_backbone_path("qwen3_vl"), tmp_path / "narrow")
    with pytest.raises(ValueError) as info:
        AutoModel.from_pretrained(saved, backbone_name_or_path=str(narrow))
    message = str(info.value)
    assert "hidden_size=64" in message and "32 dimensions" in message and str(narrow) in message
    # and the same when only the saved queries say 64 (config.json without hidden_size)
    config = json.loads((saved / "config.json").read_text())
    config["hidden_size"] = None
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        AutoModel.from_pretrained(saved, backbone_name_or_path=str(narrow))
    assert "64 wide" in str(info.value) and "hidden size 32" in str(info.value)


# ---------------------------------------------------------------------------------------------- remote code
def _run(script: str, tmp_path: Path, marker: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "SLQ_TEST_MARKER": str(marker)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, stdin=subprocess.DEVNULL)


def _plant_code_marker(folder: Path) -> None:
    """Make the folder's copied configuration_slq.py announce when it is executed."""
    with open(folder / "configuration_slq.py", "a", encoding="utf8") as handle:
        handle.write("\nimport os as _os\nif _os.environ.get('SLQ_TEST_MARKER'):\n"
                     "    open(_os.environ['SLQ_TEST_MARKER'], 'a').write('folder code ran\\n')\n")


def test_which_code_runs_at_load_time(saved, tmp_path, marker):
    """README, 'trust_remote_code': without slq_hf, the folder's code runs only with trust_remote_code=True; once
    slq_hf is imported, the installed code is used and the folder's .py files never run. One interpreter, in order."""
    _plant_code_marker(saved)
    result = _run(f"""
        import os, sys
        from transformers import AutoModel
        marker = os.environ["SLQ_TEST_MARKER"]
        try:
            AutoModel.from_pretrained({str(saved)!r})
            raise SystemExit("loaded without trust_remote_code")
        except ValueError as err:
            assert "trust_remote_code" in str(err), err
        assert not os.path.exists(marker), "folder code ran without trust_remote_code"
        # Negative control: with trust_remote_code and no slq_hf, the folder's own code is what runs.
        model = AutoModel.from_pretrained({str(saved)!r}, trust_remote_code=True)
        assert "slq_hf" not in sys.modules and type(model).__module__.startswith("transformers_modules")
        assert open(marker).read().startswith("folder code ran"), "the planted marker did not fire"
        os.remove(marker)
        import slq_hf
        for kwargs in ({{}}, {{"trust_remote_code": True}}):
            model = AutoModel.from_pretrained({str(saved)!r}, **kwargs)
            assert type(model).__module__ == "slq_hf.modeling.modeling_slq", (kwargs, type(model).__module__)
        assert not os.path.exists(marker), "folder code ran although slq_hf is imported"
        print("OK")
    """, tmp_path, marker)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout and not marker.exists()


def test_backbone_remote_code_never_runs(saved, tiny_backbone_path, tmp_path, marker):
    """The pinned backbone is loaded without trust_remote_code, even when the SLQ folder is loaded with it: a
    backbone folder whose config points at custom code gets transformers' own class."""
    import shutil

    backbone = tmp_path / "backbone_with_code"
    shutil.copytree(tiny_backbone_path("qwen3_vl"), backbone)
    (backbone / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('backbone code ran')\n"
        "from transformers import Qwen3VLForConditionalGeneration\n"
        "class Evil(Qwen3VLForConditionalGeneration):\n    pass\n")
    config = json.loads((backbone / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "evil.Evil"}
    (backbone / "config.json").write_text(json.dumps(config))
    for kwargs in ({}, {"trust_remote_code": True}):
        loaded = AutoModel.from_pretrained(saved, backbone_name_or_path=str(backbone), **kwargs)
        assert type(loaded.backbone).__module__.startswith("transformers.models.qwen3_vl")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ query sets
def test_query_set_files_get_the_same_checks(model, tmp_path, marker):
    """Named query sets (query_sets/<name>.safetensors, load_query_set) follow the same rules as model.safetensors."""
    evil = _evil_pickle(tmp_path / "evil.safetensors", marker)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        model.load_query_set(evil, name="evil")
    assert not marker.exists()
    hidden = model.config.hidden_size
    bad = {"nan": (torch.full((3, hidden), float("nan")), "NaN or Inf"),
           "int": (torch.zeros(3, hidden, dtype=torch.int64), "dtype"),
           "narrow": (torch.zeros(3, hidden // 2), f"{hidden // 2} wide.*hidden size {hidden}"),
           "1-d": (torch.zeros(hidden), "expected a \\(num_queries, hidden_size\\) tensor")}
    for name, (queries, message) in bad.items():
        save_file({"queries": queries}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=message):
            model.load_query_set(tmp_path / f"{name}.safetensors", name=name)


# ------------------------------------------------------------------------------------------- loading limits
_LOAD_RSS = """
import json, sys
import torch
from slq_hf import SLQModel

def status(key):  # kB
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

folder, backbone = sys.argv[1], sys.argv[2]
SLQModel.from_backbone(backbone, num_queries=2)  # warm up: imports, the backbone's files in the page cache
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS:")
try:
    model = SLQModel.from_pretrained(folder, backbone_name_or_path=backbone)
    outcome = "LOADED"
    if len(sys.argv) > 3:  # negative control: an allocation of argv[3] queries, as this measurement sees it
        model.extra = torch.ones(int(sys.argv[3]), model.config.hidden_size)
except Exception as err:
    outcome = f"{type(err).__name__}: {err}"
print(json.dumps({"outcome": outcome, "growth_mb": (status("VmHWM:") - before) / 1024}))
"""


def _load_peak(folder: Path, backbone: str, *control: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _LOAD_RSS, str(folder), backbone, *control], capture_output=True,
                            text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_huge_sizes_are_refused_before_allocating(saved, tiny_backbone_path, tmp_path):
    """num_queries: 4000000 in config.json, and a query-set file declaring 8M queries (sparse), are refused by the
    checks against the backbone before any tensor of that size exists; peak RSS growth stays small. The negative
    control loads the good folder and then allocates 1M queries (256 MB), which the measurement does see."""
    import shutil

    backbone = tiny_backbone_path("qwen3_vl")
    hidden = json.loads((saved / "config.json").read_text())["hidden_size"]
    huge_config = tmp_path / "huge_config"
    shutil.copytree(saved, huge_config)
    config = json.loads((huge_config / "config.json").read_text())
    config["num_queries"] = 4_000_000
    (huge_config / "config.json").write_text(json.dumps(config))
    huge_set = tmp_path / "huge_set"
    shutil.copytree(saved, huge_set)
    (huge_set / "query_sets").mkdir(exist_ok=True)
    sparse_query_file(huge_set / "query_sets" / "big.safetensors", 8_000_000, hidden)
    (huge_set / "query_sets" / "sets.json").write_text(json.dumps(
        {"active": "default", "sets": {"big": {"file": "query_sets/big.safetensors", "num_queries": 8_000_000}}}))

    # Either check may fire first (header vs config, config vs backbone, the size cap): each names what is wrong.
    for folder, words in [(huge_config, ["num_queries", "4000000"]), (huge_set, ["big.safetensors"])]:
        result = _load_peak(folder, backbone)
        assert all(word in result["outcome"] for word in words), result
        assert result["growth_mb"] < 100, result

    result = _load_peak(saved, backbone, "1000000")
    assert result["outcome"] == "LOADED" and result["growth_mb"] > 200, result


@pytest.mark.parametrize("num_queries", [4_000_000, 2048])
def test_more_queries_than_the_backbone_has_positions(tiny_backbone_path, num_queries):
    """Refused by the config-vs-backbone check, which runs before the queries are allocated (the tiny Qwen3-VL has
    2048 positions, so at most 2047 queries fit after a prompt)."""
    with pytest.raises(ValueError, match=f"num_queries={num_queries} but the backbone accepts 2048 positions"):
        SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=num_queries)


def test_query_sets_beyond_the_backbone_positions_are_refused_before_allocating(tiny_backbone_path, tmp_path):
    """The same position bound as num_queries, for every way a set is added (add, copy, load): 1e9 queries of the
    tiny Qwen3-VL would be 512 GB; the refusal comes before any allocation."""
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=4)
    hidden = model.config.hidden_size
    with pytest.raises(ValueError, match="would have 1000000000 queries, but at most 2047 fit"):
        model.add_query_set("huge", 10**9)
    with pytest.raises(ValueError, match="would have 2048 queries, but at most 2047 fit"):
        model.add_query_set("copy", queries=torch.zeros(2048, hidden))
    save_file({"queries": torch.zeros(2048, hidden)}, str(tmp_path / "big.safetensors"))
    with pytest.raises(ValueError, match="would have 2048 queries"):
        model.load_query_set(tmp_path / "big.safetensors", name="big")
    assert model.add_query_set("largest", 2047).shape == (2047, hidden) and model.query_sets == ["default", "largest"]
    # Replacing an existing set with one too large is refused the same way, and the existing set stays (active too)
    model.set_active_query_set("largest")
    with pytest.raises(ValueError, match="would have 2048 queries"):
        model.load_query_set(tmp_path / "big.safetensors", name="largest")
    assert model.query_sets == ["default", "largest"] and model.active_query_set == "largest"
    assert model.get_query_set("largest").shape == (2047, hidden)


def test_config_fields_that_index_are_checked(saved):
    config = json.loads((saved / "config.json").read_text())
    for value, message in [(10**9, "not a token id"), (-1, "not a token id"), (True, "not a token id")]:
        (saved / "config.json").write_text(json.dumps({**config, "placeholder_token_id": value}))
        with pytest.raises(ValueError, match=message) as info:
            AutoModel.from_pretrained(saved)
        assert "placeholder_token_id" in str(info.value)
    from transformers import AutoConfig

    backbone_config = AutoConfig.from_pretrained(config["backbone_name_or_path"])
    (saved / "config.json").write_text(json.dumps({**config, "placeholder_token_id": backbone_config.image_token_id}))
    with pytest.raises(ValueError, match="special tokens"):
        AutoModel.from_pretrained(saved)


@pytest.mark.parametrize("value", [50.0, -50.0, 1e30])
def test_logit_scale_outside_the_clamp_is_refused(model, saved, value):
    state = _state(model)
    state["logit_scale"] = torch.tensor(value)
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"logit_scale is .*log\(100\)") as info:
        AutoModel.from_pretrained(saved)
    assert str(saved / WEIGHTS_NAME) in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_float8_and_int_checkpoints_name_the_file(model, saved, dtype):
    state = _state(model)
    state["queries"] = state["queries"].to(dtype)
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="dtype") as info:
        AutoModel.from_pretrained(saved)
    assert str(saved / WEIGHTS_NAME) in str(info.value)


@pytest.mark.parametrize("content", ["", "{", "[]", '{"sets": {"../x": {}}}', '{"sets": {"a": {"num_queries": 0}}}',
                                     '{"active": "nope", "sets": {}}'])
def test_bad_sets_json_names_the_file(saved, content):
    (saved / "query_sets").mkdir(exist_ok=True)
    (saved / "query_sets" / "sets.json").write_text(content)
    with pytest.raises(ValueError) as info:
        AutoModel.from_pretrained(saved)
    assert "sets.json" in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda config: None, "no config.json found"),
    (lambda config: [config], "holds a list, not a JSON object"),
    (lambda config: {**config, "model_type": "llava"}, "of a 'llava' model, not an SLQ one"),
    (lambda config: {**config, "backbone_revision": 123}, "`backbone_revision`=123 is invalid"),
    (lambda config: {**config, "pooling": "max"}, "`pooling`='max' is not supported"),
])
def test_malformed_config_json_is_refused_naming_the_file(saved, edit, message):
    """A folder without config.json loaded as a default config (40 queries, no backbone), a list or another model's
    config.json got a TypeError or a warning, a bad value an error that did not say which file holds it."""
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").unlink()
    if edit(config) is not None:
        (saved / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises((OSError, ValueError), match=message) as info:
        SLQModel.from_pretrained(saved)
    assert str(saved) in str(info.value) and "config.json" in str(info.value)


@pytest.mark.parametrize("case", ["text file", "float8", "no rows", "float64 beyond float32"])
def test_convert_reference_bad_inputs_name_the_file(tiny_backbone_path, tmp_path, capsys, case):
    """Each of these ended in a traceback (KeyError, NotImplementedError) or an error naming "state dict" or
    SLQConfig instead of the input file; the CLI now prints one line naming the file and exits 2."""
    from slq_hf.cli import main as cli_main

    path, backbone = tmp_path / "queries.pt", tiny_backbone_path("qwen3_vl")
    if case == "text file":
        path.write_text("hello")
    elif case == "float8":
        torch.save(torch.ones(4, 64).to(torch.float8_e4m3fn), path)
    elif case == "no rows":
        torch.save(torch.zeros(0, 64), path)
    else:
        torch.save(torch.full((4, 64), 1e300, dtype=torch.float64), path)
    with pytest.raises(ValueError, match=f"^{path}: "):
        convert_reference(path, backbone, tmp_path / "out")
    capsys.readouterr()
    assert cli_main(["convert-reference", str(path), "--backbone", backbone, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slq-hf convert-reference: error: ") and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_reference_refuses_another_models_folder_before_loading_the_backbone(tiny_backbone_path, tmp_path):
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone_path("qwen3_vl"), backbone)
    torch.save(torch.ones(4, 64), tmp_path / "queries.pt")
    (backbone / "model.safetensors").write_bytes(b"not read: the refusal comes first")  # loading it would fail
    with pytest.raises(CheckpointError, match="refusing to save an SLQ model here"):
        convert_reference(tmp_path / "queries.pt", str(backbone), backbone)


def test_output_loading_info_returns_the_model_and_an_empty_report(saved, model):
    """transformers' output_loading_info=True went on to the backbone, whose (model, info) tuple then crashed the
    SLQ load with "'tuple' object has no attribute 'config'"."""
    loaded, info = AutoModel.from_pretrained(saved, output_loading_info=True)
    assert isinstance(loaded, SLQModel) and torch.equal(loaded.queries, model.queries)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert isinstance(SLQModel.from_pretrained(saved, backbone=model.backbone, output_loading_info=False), SLQModel)
