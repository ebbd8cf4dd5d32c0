"""slq_hf.modeling.checkpoint at module level: every read is validated before allocation, every write is atomic.

End-to-end behaviour through SLQModel.save_pretrained / from_pretrained is in test_data_loss.py and
test_safe_loading.py; here each rule of the folder format is exercised directly, with real files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from slq_hf.modeling import checkpoint as ck
from slq_hf.modeling.checkpoint import CheckpointError

from helpers import sparse_query_file

H = 8
SRC = str(Path(__file__).resolve().parents[1])


def _state(num_queries: int = 4, projection: int | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(num_queries)
    state = {"queries": torch.randn(num_queries, H, generator=generator), "logit_scale": torch.tensor(2.5)}
    if projection:
        state["projection.weight"] = torch.randn(projection, H, generator=generator)
        state["projection.bias"] = torch.zeros(projection)
    return state


def _raw_safetensors(path: Path, header: dict, data: bytes = b"", header_bytes: bytes | None = None) -> Path:
    text = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and "dir" for folders) under root."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _run(script: str, *args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=env, timeout=300, check=check, **kwargs)


# ------------------------------------------------------------------------------------------------- names
def test_expected_tensors_follow_the_config():
    assert ck.expected_tensors(4, 8) == {"queries": (4, 8), "logit_scale": ()}
    assert ck.expected_tensors(4, 8, 16) == {"queries": (4, 8), "logit_scale": (), "projection.weight": (16, 8),
                                             "projection.bias": (16,)}
    assert set(ck.expected_tensors(2, 3, 5)) == ck.SLQ_TENSOR_NAMES


@pytest.mark.parametrize("name", ["query", "doc-2", "A_b", "x" * 64])
def test_query_set_file_names(name):
    assert ck.query_set_file(name) == f"query_sets/{name}.safetensors"


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "a.b", "-lead", "x" * 65, None, 3, "café", "doc\n", " doc"])
def test_query_set_file_refuses_bad_names(name):
    with pytest.raises(ValueError, match="invalid"):
        ck.query_set_file(name)


# ------------------------------------------------------------------------------------------ read_header
def test_read_header_lists_dtypes_shapes_and_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    ck.save_tensors({**_state(), "half": torch.zeros(2, 3, dtype=torch.float16)}, path, {"a": "b"})
    tensors, metadata = ck.read_header(path)
    assert tensors == {"queries": ("F32", (4, H)), "logit_scale": ("F32", ()), "half": ("F16", (2, 3))}
    assert metadata == {"a": "b"}


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickle code ran')",)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "PWNED"
    good = tmp_path / "good.safetensors"
    ck.save_tensors(_state(), good)
    blob = good.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    files = {
        "pickle": tmp_path / "pickle.safetensors",
        "torch.save zip": tmp_path / "zip.safetensors",
        "empty": tmp_path / "empty.safetensors",
        "7 bytes": tmp_path / "seven.safetensors",
        "header cut": tmp_path / "hcut.safetensors",
        "data cut": tmp_path / "dcut.safetensors",
        "trailing bytes": tmp_path / "trail.safetensors",
        "random bytes": tmp_path / "random.safetensors",
    }
    files["pickle"].write_bytes(pickle.dumps({"queries": _Exploit(marker)}))
    torch.save({"queries": torch.zeros(2, 2)}, files["torch.save zip"])
    files["empty"].write_bytes(b"")
    files["7 bytes"].write_bytes(blob[:7])
    files["header cut"].write_bytes(blob[: 8 + length // 2])
    files["data cut"].write_bytes(blob[:-4])
    files["trailing bytes"].write_bytes(blob + b"\0" * 8)
    files["random bytes"].write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                    dtype=torch.uint8).numpy().tobytes())
    data = bytes(16)
    raw = {
        "header not JSON": ({}, b"{not json", data),
        "header a list": ({}, b"[1, 2]", b""),
        "negative dim": ({"queries": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}}, None, data),
        "unknown dtype": ({"queries": {"dtype": "F33", "shape": [2, 2], "data_offsets": [0, 16]}}, None, data),
        "offsets too short": ({"queries": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, None, data),
        "offsets past the end": ({"queries": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, None, data),
        "string shape": ({"queries": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}, None, data),
        "metadata not strings": ({"__metadata__": {"a": 1}}, None, b""),
        "header longer than file": ({}, None, None),
    }
    for name, (header, header_bytes, payload) in raw.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        if payload is None:
            path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
        else:
            _raw_safetensors(path, header, payload, header_bytes)
        files[name] = path
    return files


BAD_FILES = ["pickle", "torch.save zip", "empty", "7 bytes", "header cut", "data cut", "trailing bytes",
             "random bytes", "header not JSON", "header a list", "negative dim", "unknown dtype", "offsets too short",
             "offsets past the end", "string shape", "metadata not strings", "header longer than file"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_files_are_refused_by_header_and_read(tmp_path, case):
    path = _bad_files(tmp_path)[case]
    for read in (lambda: ck.read_header(path), lambda: ck.read_tensors(path, {"queries": None})):
        with pytest.raises(CheckpointError, match="not a readable safetensors file") as info:
            read()
        assert str(info.value).startswith(str(path))
        assert "re-download" in str(info.value)
    assert not (tmp_path / "PWNED").exists()  # the pickle was never unpickled


def test_pickle_probe_works_when_unpickled(tmp_path):
    """Negative control for the pickle case above: the probe does run code when unpickled."""
    path = _bad_files(tmp_path)["pickle"]
    pickle.loads(path.read_bytes())
    assert (tmp_path / "PWNED").read_text() == "pickle code ran"


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope.safetensors'}: cannot be read"):
        ck.read_tensors(tmp_path / "nope.safetensors", {"queries": None})


# ----------------------------------------------------------------------------------------- read_tensors
def test_read_tensors_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    state = _state(projection=6)
    ck.save_tensors(state, path)
    loaded = ck.read_tensors(path, ck.expected_tensors(4, H, 6))
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], tensor)


def test_names_must_match_exactly(tmp_path):
    path = tmp_path / "m.safetensors"
    ck.save_tensors({**_state(), "backbone.lm_head.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['backbone.lm_head.weight'\]"):
        ck.read_tensors(path, ck.expected_tensors(4, H))
    ck.save_tensors({"queries": torch.zeros(4, H)}, path)
    with pytest.raises(CheckpointError, match=r"missing \['logit_scale'\], unexpected \[\]"):
        ck.read_tensors(path, ck.expected_tensors(4, H))
    # optional names may be absent but never unexpected
    assert set(ck.read_tensors(path, ck.expected_tensors(4, H), optional=["logit_scale"])) == {"queries"}


@pytest.mark.parametrize("shape, expected, message", [
    ((5, H), (4, H), r"'queries' has shape \(5, 8\), expected \(4, 8\) \(num_queries, hidden_size"),
    ((4, 16), (4, H), r"16 wide but the backbone has hidden size 8"),
    ((4 * H,), (4, H), r"expected a \(num_queries, hidden_size\) tensor of shape \(4, 8\)"),
    ((1, 4, H), (4, H), r"expected a \(num_queries, hidden_size\) tensor"),
    ((), (4, H), r"expected a \(num_queries, hidden_size\) tensor"),
    ((0, H), (range(1, 10), H), r"expected \(1\.\.9, 8\)"),
    ((10, H), (range(1, 10), H), r"expected \(1\.\.9, 8\)"),
])
def test_shapes_are_checked_against_the_expectation(tmp_path, shape, expected, message):
    path = tmp_path / "q.safetensors"
    save_file({"queries": torch.zeros(shape)}, str(path))
    with pytest.raises(CheckpointError, match=message) as info:
        ck.read_tensors(path, {"queries": expected})
    assert str(info.value).startswith(f"{path}: ")


def test_dims_accept_ranges_and_wildcards(tmp_path):
    path = tmp_path / "q.safetensors"
    save_file({"queries": torch.ones(7, H)}, str(path))
    for expected in [(7, H), (range(1, 8), H), (None, H), (None, None), None]:
        assert ck.read_tensors(path, {"queries": expected})["queries"].shape == (7, H)


def test_logit_scale_shape(tmp_path):
    path = tmp_path / "m.safetensors"
    ck.save_tensors({**_state(), "logit_scale": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"'logit_scale' has shape \(2,\), expected \(\)"):
        ck.read_tensors(path, ck.expected_tensors(4, H))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_non_float_and_float8_dtypes_are_refused(tmp_path, dtype):
    path = tmp_path / "q.safetensors"
    save_file({"queries": torch.ones(4, H).to(dtype)}, str(path))
    with pytest.raises(CheckpointError, match=r"'queries' has dtype .*float32, float16, bfloat16 or float64"):
        ck.read_tensors(path, {"queries": (4, H)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_float_dtypes_load_as_float32(tmp_path, dtype):
    path = tmp_path / "q.safetensors"
    values = torch.randn(4, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    save_file({"queries": values}, str(path))
    loaded = ck.read_tensors(path, {"queries": (4, H)})["queries"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, values.float())


@pytest.mark.parametrize("name", ["queries", "logit_scale", "projection.weight", "projection.bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(tmp_path, name, value):
    state = _state(projection=3)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = value
    path = tmp_path / "m.safetensors"
    ck.save_tensors(state, path)
    with pytest.raises(CheckpointError, match=f"'{name}' contains NaN or Inf"):
        ck.read_tensors(path, ck.expected_tensors(4, H, 3))


def test_float64_beyond_float32_range_is_refused(tmp_path):
    path = tmp_path / "q.safetensors"
    save_file({"queries": torch.full((4, H), 1e300, dtype=torch.float64)}, str(path))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        ck.read_tensors(path, {"queries": (4, H)})


@pytest.mark.parametrize("value, ok", [(0.0, True), (ck.MAX_LOGIT_SCALE, True), (ck.MAX_LOGIT_SCALE + 0.3, True),
                                       (-ck.MAX_LOGIT_SCALE, True), (ck.MAX_LOGIT_SCALE + 1, False), (30.0, False),
                                       (-30.0, False), (1e30, False)])
def test_logit_scale_within_the_clamp(tmp_path, value, ok):
    path = tmp_path / "m.safetensors"
    ck.save_tensors({**_state(), "logit_scale": torch.tensor(value)}, path)
    if ok:
        assert ck.read_tensors(path, ck.expected_tensors(4, H))["logit_scale"].item() == pytest.approx(value)
    else:
        with pytest.raises(CheckpointError, match=r"logit_scale is .* within \+-log\(100\)"):
            ck.read_tensors(path, ck.expected_tensors(4, H))


def test_size_cap_applies_to_wildcard_shapes(tmp_path):
    path = tmp_path / "q.safetensors"
    save_file({"queries": torch.ones(64, H)}, str(path))
    with pytest.raises(CheckpointError, match="MiB an SLQ checkpoint can need"):
        ck.read_tensors(path, {"queries": None}, max_bytes=1024)
    assert ck.read_tensors(path, {"queries": None}, max_bytes=64 * H * 4)["queries"].shape == (64, H)


# ----------------------------------------------------------------------- huge declared shapes (loading limits)
_PEAK_RSS = """
import json, sys, torch
from pathlib import Path
from slq_hf.modeling import checkpoint as ck

def status(key):  # kB
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

def attempt(path, mode):
    if mode == "naive":  # what loading did before: read every tensor, then check its values
        from safetensors.torch import load_file
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())
        return "LOADED"
    if mode == "header":
        return f"HEADER {ck.read_header(path)[0]['queries']}"
    try:
        ck.read_tensors(path, {"queries": (range(1, 32769), 64) if mode == "bounded" else None})
        return "LOADED"
    except ck.CheckpointError as err:
        return f"REFUSED {err}"

results = {}
for path, mode in json.loads(sys.argv[1]):
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    out = attempt(Path(path), mode)
    results[mode] = (out, (status("VmHWM:") - before) / 1024)
print(json.dumps(results))
"""


def test_sparse_file_declaring_8m_queries_is_refused_without_allocating(tmp_path):
    """Peak RSS growth of each read, in one process; the naive read (plain safetensors, as loading did before) of a
    smaller sparse file is the negative control showing the measurement sees an allocation."""
    huge = sparse_query_file(tmp_path / "huge.safetensors", 8_000_000)  # 2 GB declared, ~0 on disk
    assert huge.stat().st_size > 2 * 10**9 and os.stat(huge).st_blocks * 512 < 10**6
    control = sparse_query_file(tmp_path / "big.safetensors", 1_000_000)  # 256 MB declared
    runs = [(str(huge), "header"), (str(huge), "bounded"), (str(huge), "wildcard"), (str(control), "naive")]
    results = json.loads(_run(_PEAK_RSS, json.dumps(runs), check=True).stdout.strip().splitlines()[-1])
    assert results["header"][0] == "HEADER ('F32', (8000000, 64))"
    assert results["bounded"][0].startswith("REFUSED") and "expected (1..32768, 64)" in results["bounded"][0]
    assert results["wildcard"][0].startswith("REFUSED") and "MiB an SLQ checkpoint can need" in results["wildcard"][0]
    for mode in ("header", "bounded", "wildcard"):
        assert results[mode][1] < 50, results
    assert results["naive"][0] == "LOADED" and results["naive"][1] > 200, results


# -------------------------------------------------------------------------------------- read_query_set_index
def _index(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "sets.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_query_set_index_round_trip(tmp_path):
    good = {"active": "query", "sets": {"query": {"file": "query_sets/query.safetensors", "num_queries": 4},
                                        "doc": {"file": "query_sets/doc.safetensors", "num_queries": 6}}}
    assert ck.read_query_set_index(_index(tmp_path, json.dumps(good))) == good
    minimal = ck.read_query_set_index(_index(tmp_path, '{"sets": {"a": {}}}'))
    assert minimal == {"active": "default", "sets": {"a": {"file": "query_sets/a.safetensors", "num_queries": None}}}


@pytest.mark.parametrize("content, message", [
    ("", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    ("{", "not valid JSON"),
    ("[]", "expected an object"),
    ('{"active": "default"}', "expected an object"),
    ('{"sets": []}', "expected an object"),
    ('{"sets": {"../evil": {}}}', "set name '../evil' is invalid"),
    ('{"sets": {"default": {}}}', "set name 'default' is invalid"),
    ('{"sets": {"a.b": {}}}', "set name 'a.b' is invalid"),
    ('{"sets": {"a": {"file": "../../etc/passwd"}}}', "points at '../../etc/passwd'"),
    ('{"sets": {"a": {"file": "query_sets/b.safetensors"}}}', "points at"),
    ('{"sets": {"a": {"num_queries": 0}}}', "num_queries=0"),
    ('{"sets": {"a": {"num_queries": -3}}}', "num_queries=-3"),
    ('{"sets": {"a": {"num_queries": "4"}}}', "num_queries='4'"),
    ('{"sets": {"a": {"num_queries": true}}}', "num_queries=True"),
    ('{"sets": {"a": {"num_queries": 2.5}}}', "num_queries=2.5"),
    ('{"active": "b", "sets": {"a": {}}}', "active set 'b' is not one of"),
    ('{"active": 3, "sets": {}}', "active set 3"),
    ('{"active": ["default"], "sets": {}}', "active set \\['default'\\]"),
    ('{"sets": {"query": {}, "Query": {}}}', "sets 'query' and 'Query' differ only in case"),
])
def test_bad_query_set_index_names_the_file(tmp_path, content, message):
    path = _index(tmp_path, content)
    with pytest.raises(CheckpointError, match=message) as info:
        ck.read_query_set_index(path)
    assert str(info.value).startswith(f"{path}: ") and "re-save the model" in str(info.value)


def test_missing_query_set_index(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be read"):
        ck.read_query_set_index(tmp_path / "sets.json")


# ------------------------------------------------------------------------------------ config vs backbone
class _Config:
    def __init__(self, num_queries=4, hidden_size=None, placeholder_token_id=None):
        self.num_queries, self.hidden_size, self.placeholder_token_id = num_queries, hidden_size, placeholder_token_id


@pytest.fixture(scope="module")
def qwen_config(tiny_backbone_path):
    return AutoConfig.from_pretrained(tiny_backbone_path("qwen3_vl"))


def test_config_limits_accept_a_sane_config(qwen_config):
    text = qwen_config.get_text_config()
    plain = min(set(range(100)) - ck.special_token_ids(qwen_config))
    ck.check_config_for_backbone(_Config(4, text.hidden_size, plain), qwen_config)
    ck.check_config_for_backbone(_Config(4, None, text.vocab_size - 1), qwen_config)
    ck.check_config_for_backbone(_Config(text.max_position_embeddings - 1), qwen_config)
    assert ck.position_budget(qwen_config) == text.max_position_embeddings
    assert ck.max_queries(qwen_config) == text.max_position_embeddings - 1


def test_config_limits_refuse_what_does_not_fit(qwen_config):
    text = qwen_config.get_text_config()
    specials = ck.special_token_ids(qwen_config)
    assert qwen_config.image_token_id in specials and qwen_config.video_token_id in specials
    cases = {
        "4M queries": (_Config(4_000_000), "num_queries=4000000 but the backbone accepts"),
        "budget": (_Config(text.max_position_embeddings), "at most"),
        "width": (_Config(4, text.hidden_size * 2), f"embeds tokens in {text.hidden_size} dimensions"),
        "negative id": (_Config(4, None, -1), "placeholder_token_id=-1 is not a token id"),
        "id past vocab": (_Config(4, None, text.vocab_size), f"vocabulary 0..{text.vocab_size - 1}"),
        "bool id": (_Config(4, None, True), "placeholder_token_id=True"),
        "str id": (_Config(4, None, "5"), "placeholder_token_id='5'"),
        "image token": (_Config(4, None, qwen_config.image_token_id), "special tokens"),
        "vision start": (_Config(4, None, qwen_config.vision_start_token_id), "special tokens"),
    }
    for name, (config, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            ck.check_config_for_backbone(config, qwen_config, source="x/config.json")
    # the embedding's row count wins over the config's vocab_size
    with pytest.raises(CheckpointError, match="vocabulary 0..9"):
        ck.check_config_for_backbone(_Config(4, None, 10), qwen_config, vocab_size=10)


@pytest.mark.parametrize("family", ["llava", "internvl", "idefics3", "gemma3", "qwen2_vl"])
def test_the_picked_placeholder_passes_on_every_family(tiny_backbone_path, family):
    """The id a fresh model picks for itself (with its processor's tokenizer) must satisfy the same rule, else every
    saved model would be refused when loaded."""
    from slq_hf import SLQModel

    model = SLQModel.from_backbone(tiny_backbone_path(family), num_queries=4)
    ck.check_config_for_backbone(_Config(4, None, model.config.placeholder_token_id), model.backbone.config)


# ------------------------------------------------------------------------------------------ save_tensors
def test_save_tensors_from_threads_to_one_path_never_collide(tmp_path):
    """Each writer has its own temporary file (they shared one per process): concurrent saves of a file all succeed
    and readers only ever see a complete file."""
    path, errors = tmp_path / "q.safetensors", []
    states = [{"queries": torch.full((64, H), float(i))} for i in range(2)]

    def write(state):
        try:
            for _ in range(40):
                ck.save_tensors(state, path)
                ck.read_tensors(path, {"queries": (64, H)})
        except Exception as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(state,)) for state in states]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list(tmp_path.iterdir()) == [path]


def test_save_tensors_bytes_are_reproducible_across_processes(tmp_path):
    script = ("import sys, torch; from slq_hf.modeling.checkpoint import save_tensors; "
              "save_tensors({'queries': torch.arange(6.).reshape(2, 3), 'logit_scale': torch.tensor(2.0), "
              "'b': torch.ones(1), 'a': torch.zeros(1)}, sys.argv[1], metadata={'format': 'pt', 'z': '1', 'y': '2'})")
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in files:
        _run(script, str(path), check=True)
    assert len({path.read_bytes() for path in files}) == 1
    assert torch.equal(load_file(files[0])["queries"], torch.arange(6.0).reshape(2, 3))


_FSIZE_SAVE = """
import resource, signal, sys, torch
from slq_hf.modeling import checkpoint as ck
# "ignore": the write fails with EFBIG; "killed": the kernel's default, SIGXFSZ kills the process (Python itself
# starts with SIGXFSZ ignored, so the default is restored explicitly).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[2] == "ignore" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
ck.save_tensors({"queries": torch.ones(4096, 8)}, sys.argv[1])
"""


@pytest.mark.parametrize("mode", ["ignore", "killed"])
def test_save_tensors_disk_full_keeps_the_old_file(tmp_path, mode):
    path = tmp_path / "q.safetensors"
    ck.save_tensors({"queries": torch.zeros(2, 8)}, path)
    before = path.read_bytes()
    result = _run(_FSIZE_SAVE, str(path), mode)
    assert result.returncode == (1 if mode == "ignore" else -signal.SIGXFSZ), result.stderr[-3000:]
    if mode == "ignore":
        assert "File too large" in result.stderr
    assert path.read_bytes() == before
    if mode == "ignore":  # the failed write cleaned up after itself
        assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]


# ----------------------------------------------------------------------------------------- save targets
def _write_slq(out: Path, num_queries: int = 4, sets: tuple[str, ...] = (), extra: dict[str, str] | None = None
               ) -> None:
    """A minimal SLQ folder writer (what save_pretrained does, reduced to the files the format owns)."""
    (out / "config.json").write_text(json.dumps({"model_type": "slq", "num_queries": num_queries}))
    ck.save_tensors(_state(num_queries), out / ck.WEIGHTS_NAME, ck.WEIGHTS_METADATA)
    (out / "tokenizer.json").write_text(f"tokenizer {num_queries}")
    if sets:
        (out / ck.QUERY_SETS_DIR).mkdir()
        index = {"active": sets[0], "sets": {}}
        for name in sets:
            ck.save_tensors({"queries": torch.full((num_queries, H), float(len(name)))}, out / ck.query_set_file(name))
            index["sets"][name] = {"file": ck.query_set_file(name), "num_queries": num_queries}
        (out / ck.QUERY_SETS_INDEX).write_text(json.dumps(index))
    st_config = out / "config_sentence_transformers.json"
    data = json.loads(st_config.read_text()) if st_config.exists() else {}
    data.setdefault("prompts", {"query": ""})
    data["written_by"] = num_queries
    st_config.write_text(json.dumps(data))
    for name, text in (extra or {}).items():
        (out / name).write_text(text)


def _read_slq(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    state = ck.read_tensors(folder / ck.WEIGHTS_NAME, ck.expected_tensors(config["num_queries"], H))
    sets = {}
    if (folder / ck.QUERY_SETS_INDEX).exists():
        index = ck.read_query_set_index(folder / ck.QUERY_SETS_INDEX)
        sets = {name: ck.read_tensors(folder / entry["file"], {"queries": (entry["num_queries"], H)})["queries"]
                for name, entry in index["sets"].items()}
    return {"num_queries": config["num_queries"], "queries": state["queries"], "sets": sets}


def test_new_empty_and_slq_folders_are_valid_targets(tmp_path):
    ck.check_save_target(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    ck.check_save_target(tmp_path / "empty")
    ck.write_folder(tmp_path / "slq", _write_slq)
    ck.check_save_target(tmp_path / "slq")
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    (tmp_path / "run" / "training_args.bin").write_bytes(b"x")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    ck.check_save_target(tmp_path / "run")


def _foreign_folders(tmp_path: Path, backbone: str) -> dict[str, Path]:

    folders = {"backbone": tmp_path / "backbone"}
    shutil.copytree(backbone, folders["backbone"])
    specs = {
        "bert config": {"config.json": json.dumps({"model_type": "bert"})},
        "config without model_type": {"config.json": json.dumps({"architectures": ["X"]})},
        "config not JSON": {"config.json": "garbage"},
        "config a list": {"config.json": "[1]"},
        "pickle weights": {"pytorch_model.bin": "x"},
        "sharded index": {"model.safetensors.index.json": "{}"},
        "gguf": {"model.gguf": "x"},
        "other safetensors": {"adapter_model.safetensors": "x"},
        "unreadable weights": {"model.safetensors": "garbage"},
    }
    for name, files in specs.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        folders[name] = folder
    folders["foreign tensors"] = tmp_path / "foreign_tensors"
    folders["foreign tensors"].mkdir()
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(folders["foreign tensors"] / ck.WEIGHTS_NAME))
    folders["slq config, backbone weights"] = tmp_path / "mixed"
    folders["slq config, backbone weights"].mkdir()
    (folders["slq config, backbone weights"] / "config.json").write_text('{"model_type": "slq"}')
    save_file({"queries": torch.zeros(2, 2), "model.embed.weight": torch.zeros(2, 2)},
              str(folders["slq config, backbone weights"] / ck.WEIGHTS_NAME))
    return folders


FOREIGN = ["backbone", "bert config", "config without model_type", "config not JSON", "config a list",
           "pickle weights", "sharded index", "gguf", "other safetensors", "unreadable weights", "foreign tensors",
           "slq config, backbone weights"]


@pytest.mark.parametrize("case", FOREIGN)
def test_folders_of_other_models_are_refused_before_writing(tmp_path, tiny_backbone_path, case):
    folder = _foreign_folders(tmp_path, tiny_backbone_path("qwen3_vl"))[case]
    before = tree_digest(folder)
    calls = []
    with pytest.raises(CheckpointError, match="refusing to save an SLQ model here.*Nothing was written") as info:
        ck.write_folder(folder, lambda out: calls.append(out) or _write_slq(out))
    assert str(info.value).startswith(str(folder))
    assert calls == [] and tree_digest(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.skipif(not os.path.ismount("/dev/shm"), reason="needs a mount point to try; /dev/shm is none here")
def test_a_mount_point_is_refused_before_writing():
    calls = []
    with pytest.raises(CheckpointError, match="is a mount point.*save into a subfolder"):
        ck.write_folder("/dev/shm", lambda out: calls.append(out))
    assert calls == []


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as handle:
        points = [line.split()[1] for line in handle]
    return sorted((p for p in points if p.startswith(str(root) + os.sep)), key=len, reverse=True)


@pytest.mark.parametrize("kind", ["tmpfs", "bind"])
def test_a_mount_inside_the_folder_is_refused_and_keeps_its_content(tmp_path, kind):
    """A re-save carried a mounted runs/ over by copying it, then deleted the old folder, emptying the mounted file
    system (a volume, a bind mount of a log directory). Now refused, and nothing changes."""
    target, data = tmp_path / "slq", tmp_path / "data"
    ck.write_folder(target, _write_slq)
    (target / "runs").mkdir()
    data.mkdir()
    source = ["-t", "tmpfs", "-o", "size=1m", "none"] if kind == "tmpfs" else ["--bind", str(data)]
    if subprocess.run(["mount", *source, str(target / "runs")], capture_output=True).returncode != 0:
        pytest.skip("mounting needs privileges this environment lacks")
    try:
        (target / "runs" / "events.log").write_text("log")
        before = tree_digest(target)
        with pytest.raises(CheckpointError, match="runs.*mount point inside the folder.*Nothing was written"):
            ck.write_folder(target, lambda out: _write_slq(out, 6))
        assert tree_digest(target) == before and (target / "runs" / "events.log").read_text() == "log"
        assert _mounts_under(tmp_path) == [str(target / "runs")]  # still mounted where it was
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "slq"]
    finally:
        for point in _mounts_under(tmp_path):
            subprocess.run(["umount", point], check=True)


def test_a_file_is_refused(tmp_path):
    (tmp_path / "model").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ck.write_folder(tmp_path / "model", _write_slq)


# ------------------------------------------------------------------------------------------ write_folder
def test_resave_replaces_slq_files_and_carries_the_rest(tmp_path):
    target = tmp_path / "slq"
    ck.write_folder(target, lambda out: _write_slq(out, 4, sets=("query", "doc")))
    (target / "checkpoint-10").mkdir()
    (target / "checkpoint-10" / "optimizer.pt").write_bytes(b"opt")
    (target / "runs" / "x").mkdir(parents=True)
    (target / "runs" / "x" / "events").write_text("log")
    (target / "README.md").write_text("my card")
    (target / "modules.json").write_text("[]")
    (target / "query_sets.py").write_text("stale code")
    (target / ".model.safetensors.tmp-123").write_text("debris")
    os.symlink("README.md", target / "link")
    ck.write_folder(target, lambda out: _write_slq(out, 6, sets=("query",)))
    # modules.json is SLQ's but seeded: handed to the writer, which kept it (save_pretrained merges it)
    assert sorted(os.listdir(target)) == ["README.md", "checkpoint-10", "config.json",
                                          "config_sentence_transformers.json", "link", "model.safetensors",
                                          "modules.json", "query_sets", "runs", "tokenizer.json"]
    assert (target / "checkpoint-10" / "optimizer.pt").read_bytes() == b"opt"
    assert (target / "runs" / "x" / "events").read_text() == "log" and os.readlink(target / "link") == "README.md"
    loaded = _read_slq(target)
    assert loaded["num_queries"] == 6 and set(loaded["sets"]) == {"query"}  # the removed set's file is gone
    assert sorted(os.listdir(target / "query_sets")) == ["query.safetensors", "sets.json"]
    # seeded: the sentence-transformers config of the old folder reached the writer, which updated it
    assert json.loads((target / "config_sentence_transformers.json").read_text()) == {"prompts": {"query": ""},
                                                                                       "written_by": 6}
    assert [p.name for p in tmp_path.iterdir()] == ["slq"]  # no staging or old folder left beside it


def test_what_the_save_writes_wins_over_carried_entries(tmp_path):
    target = tmp_path / "slq"
    ck.write_folder(target, _write_slq)
    (target / "README.md").write_text("old card")
    ck.write_folder(target, lambda out: _write_slq(out, extra={"README.md": "new card"}))
    assert (target / "README.md").read_text() == "new card"


def test_permissions_of_the_folder_are_kept(tmp_path):
    target = tmp_path / "slq"
    ck.write_folder(target, _write_slq)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    target.chmod(0o750)
    ck.write_folder(target, _write_slq)
    assert target.stat().st_mode & 0o777 == 0o750


def test_exception_in_write_leaves_the_old_folder_identical(tmp_path):
    target = tmp_path / "slq"
    ck.write_folder(target, lambda out: _write_slq(out, sets=("query",)))
    (target / "checkpoint-1").mkdir()
    before = tree_digest(target)

    def failing(out: Path) -> None:
        _write_slq(out, 9)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ck.write_folder(target, failing)
    assert tree_digest(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["slq"]


def test_two_rename_fallback(tmp_path, monkeypatch):
    """Systems without RENAME_EXCHANGE swap with two renames; the result is the same."""
    monkeypatch.setattr(ck, "_exchange", lambda first, second: False)
    target = tmp_path / "slq"
    ck.write_folder(target, lambda out: _write_slq(out, 4))
    (target / "keep.txt").write_text("k")
    ck.write_folder(target, lambda out: _write_slq(out, 5))
    assert _read_slq(target)["num_queries"] == 5 and (target / "keep.txt").read_text() == "k"
    assert [p.name for p in tmp_path.iterdir()] == ["slq"]


def test_symlinked_target_is_saved_through(tmp_path):
    real = tmp_path / "real"
    ck.write_folder(real, _write_slq)
    os.symlink(real, tmp_path / "alias")
    ck.write_folder(tmp_path / "alias", lambda out: _write_slq(out, 7))
    assert (tmp_path / "alias").is_symlink() and _read_slq(real)["num_queries"] == 7


def test_saving_into_the_working_directory(tmp_path, monkeypatch):
    target = tmp_path / "slq"
    ck.write_folder(target, _write_slq)
    monkeypatch.chdir(target)
    ck.write_folder(".", lambda out: _write_slq(out, 3))
    assert os.getcwd() == str(target) and json.loads(Path("config.json").read_text())["num_queries"] == 3
    # Inside a subfolder that the new save no longer has: the save succeeds and the process lands in the folder
    (target / "query_sets").mkdir()
    monkeypatch.chdir(target / "query_sets")
    assert ck.write_folder(target, lambda out: _write_slq(out, 4)) == target
    assert os.getcwd() == str(target) and not (target / "query_sets").exists()


_KILLED_SAVE = """
import os, signal, sys, time, torch
from pathlib import Path
from slq_hf.modeling import checkpoint as ck
target, stage = Path(sys.argv[1]), sys.argv[2]

def write(out):
    (out / "config.json").write_text('{"model_type": "slq", "num_queries": 9}')
    if stage == "mid-write":
        os.kill(os.getpid(), signal.SIGKILL)
    ck.save_tensors({"queries": torch.ones(9, 8), "logit_scale": torch.tensor(1.0)}, out / ck.WEIGHTS_NAME)

if stage == "before-swap":
    ck.replace_folder = lambda new, old: os.kill(os.getpid(), signal.SIGKILL)
if stage == "between-renames":
    ck._exchange = lambda first, second: False
    real_rename = os.rename
    calls = []
    def rename(a, b):
        calls.append(a)
        real_rename(a, b)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
ck.write_folder(target, write)
"""


@pytest.mark.parametrize("stage", ["mid-write", "before-swap", "between-renames"])
def test_killed_save_leaves_the_old_folder_loadable(tmp_path, stage):
    target = tmp_path / "slq"
    ck.write_folder(target, lambda out: _write_slq(out, 4, sets=("query",)))
    (target / "checkpoint-2").mkdir()
    before = tree_digest(target)
    result = _run(_KILLED_SAVE, str(target), stage)
    assert result.returncode == -9, result.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "slq"]
    assert leftovers and all(name.startswith(".slq.slq-") for name in leftovers)
    if stage == "between-renames":
        assert not target.exists()  # the old folder sits aside; the next save puts it back first
        ck._clean_leftovers(target)
    else:
        assert tree_digest(target) == before
    assert tree_digest(target) == before and _read_slq(target)["num_queries"] == 4
    ck.write_folder(target, lambda out: _write_slq(out, 5))  # the next save cleans the debris
    assert [p.name for p in tmp_path.iterdir()] == ["slq"] and _read_slq(target)["num_queries"] == 5


_FSIZE_FOLDER = """
import resource, signal, sys, torch
from pathlib import Path
from slq_hf.modeling import checkpoint as ck
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[2] == "ignore" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
def write(out):
    (out / "config.json").write_text('{"model_type": "slq", "num_queries": 4096}')
    ck.save_tensors({"queries": torch.ones(4096, 8), "logit_scale": torch.tensor(1.0)}, out / ck.WEIGHTS_NAME)
ck.write_folder(Path(sys.argv[1]), write)
"""


@pytest.mark.parametrize("mode", ["ignore", "killed"])
def test_disk_full_during_a_folder_save(tmp_path, mode):
    target = tmp_path / "slq"
    ck.write_folder(target, lambda out: _write_slq(out, 4, sets=("query",)))
    before = tree_digest(target)
    result = _run(_FSIZE_FOLDER, str(target), mode)
    assert result.returncode == (1 if mode == "ignore" else -signal.SIGXFSZ), result.stderr[-3000:]
    if mode == "ignore":
        assert "File too large" in result.stderr and [p.name for p in tmp_path.iterdir()] == ["slq"]
    assert tree_digest(target) == before and _read_slq(target)["num_queries"] == 4


# ---------------------------------------------------------------------------------------------- read_folder
def test_read_folder_never_pairs_two_saves(tmp_path):
    """A reader that reads config.json, then (after a re-save swapped the folder) model.safetensors: a naive reader
    pairs the old config with the new weights; read_folder repeats the read and returns one save."""
    target = tmp_path / "slq"
    ck.write_folder(target, lambda out: _write_slq(out, 4))
    saves = iter([5, 6])

    def read_with_a_save_in_the_middle():
        config = json.loads((target / "config.json").read_text())
        number = next(saves, None)
        if number is not None:
            ck.write_folder(target, lambda out: _write_slq(out, number))
        header = ck.read_header(target / ck.WEIGHTS_NAME)[0]
        return config["num_queries"], header["queries"][1][0]

    assert read_with_a_save_in_the_middle() == (4, 5)  # negative control: a mix of two saves
    assert ck.read_folder(target, read_with_a_save_in_the_middle) == (6, 6)
    assert ck.read_folder(target, read_with_a_save_in_the_middle) == (6, 6)


def test_read_folder_reraises_real_errors_and_gives_up_on_endless_saves(tmp_path):
    target = tmp_path / "slq"
    ck.write_folder(target, _write_slq)
    with pytest.raises(KeyError):
        ck.read_folder(target, lambda: {}["missing"])
    counter = iter(range(100))

    def always_resaved():
        ck.write_folder(target, lambda out: _write_slq(out, 1 + next(counter)))

    with pytest.raises(CheckpointError, match="re-saved 3 times while it was being read"):
        ck.read_folder(target, always_resaved, attempts=3)
    assert ck.read_folder(tmp_path / "not-a-folder", lambda: 42) == 42


def test_concurrent_reader_sees_one_save_or_the_other(tmp_path):
    """A writer thread re-saves the folder with alternating contents while a reader process loops over reads."""
    target = tmp_path / "slq"
    ck.write_folder(target, lambda out: _write_slq(out, 4, sets=("query", "doc")))
    reader = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_checkpoint import _read_slq
from slq_hf.modeling import checkpoint as ck
target, deadline, results = Path(sys.argv[1]), time.time() + float(sys.argv[2]), []
while time.time() < deadline:
    got = ck.read_folder(target, lambda: _read_slq(target))
    n = got["num_queries"]
    sets = {k: float(v[0, 0]) for k, v in got["sets"].items()}
    ok = (n == 4 and sets == {"query": 5.0, "doc": 3.0}) or (n == 6 and sets == {"query": 5.0})
    ok = ok and float(got["queries"][0, 0]) == float(__import__("test_checkpoint")._state(n)["queries"][0, 0])
    results.append(ok)
print(json.dumps({"reads": len(results), "bad": results.count(False)}))
"""
    stop = threading.Event()
    count = [0]

    def writer():
        while not stop.is_set():
            n = 6 if count[0] % 2 else 4
            ck.write_folder(target, lambda out: _write_slq(out, n, sets=("query",) if n == 6 else ("query", "doc")))
            count[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = _run(reader, str(target), "6", str(Path(__file__).parent))
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["reads"] > 20 and count[0] > 20, (summary, count)
    assert summary["bad"] == 0, summary
