"""Config schema: round trip, and every rule's error names its field."""

import copy
import json

import pytest

from sparse_prefill.config import FORMAT, ConfigError, ModelInfo, SparseConfig, load_config, save_config

INFO = ModelInfo("tiny", "llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def good() -> dict:
    def heads():
        return [
            {"pattern": "vertical_slash", "vertical": 64, "slash": 0.25},
            {"pattern": "a_shape"},
            {"pattern": "block_sparse", "top_k": 4},
            {"pattern": "dense"},
        ]

    return {
        "format": FORMAT,
        "model": dict(vars(INFO)),
        "min_seq_len": 0,
        "defaults": {"a_shape": {"sink": 16, "local": 256}},
        "layers": [heads(), heads()],
        "provenance": {"tool": "test"},
    }


def test_round_trip_through_json(tmp_path):
    config = SparseConfig.from_dict(good())
    assert config.layers[0][1].params == {"sink": 16, "local": 256}  # filled from "defaults"
    assert config.layers[0][0].params["last_q"] == 64  # filled from the built-in defaults
    save_config(config, tmp_path / "c.json")
    again = load_config(tmp_path / "c.json")
    assert again == config
    assert json.loads((tmp_path / "c.json").read_text())["format"] == FORMAT


def test_min_seq_len_defaults_to_auto_and_takes_integers():
    raw = good()
    del raw["min_seq_len"]
    assert SparseConfig.from_dict(raw).min_seq_len == "auto"
    assert SparseConfig.uniform(INFO).min_seq_len == "auto"
    for value in ("auto", 0, 40000):
        assert SparseConfig.from_dict({**raw, "min_seq_len": value}).min_seq_len == value


def test_uniform_config():
    config = SparseConfig.uniform(INFO, "a_shape", local=512)
    assert len(config.layers) == 2 and all(len(h) == 4 for h in config.layers)
    assert {s.params["local"] for heads in config.layers for s in heads} == {512}


def set_in(raw, path, value):
    *parents, last = path
    for key in parents:
        raw = raw[key]
    if value is DELETE:
        del raw[last]
    else:
        raw[last] = value


DELETE = object()
BAD = [
    (("format",), "sparse_prefill/0", "format: must be 'sparse_prefill/1'"),
    (("model",), DELETE, "model: must be an object"),
    (("model", "num_heads"), 0, "model.num_heads: must be a positive integer"),
    (("model", "num_kv_heads"), 3, "model.num_heads: must be a multiple of model.num_kv_heads"),
    (("model", "name"), 7, "model.name: must be a string"),
    (("min_seq_len",), -1, 'min_seq_len: must be "auto" or an integer >= 0, got -1'),
    (("min_seq_len",), "fast", "min_seq_len: must be \"auto\" or an integer >= 0, got 'fast'"),
    (("min_seq_len",), 1.5, 'min_seq_len: must be "auto" or an integer >= 0, got 1.5'),
    (("layers",), [[]], "layers: must be a list of model.num_layers=2 layers, got 1"),
    (("layers", 1), [{"pattern": "dense"}], "layers[1]: must list model.num_heads=4 heads, got 1"),
    (("layers", 1, 2), {"pattern": "star"}, "layers[1][2].pattern: unknown pattern 'star'"),
    (("layers", 0, 3), "dense", "layers[0][3]: must be an object with a 'pattern'"),
    (("layers", 0, 0, "slash"), 0, "layers[0][0].slash: must be a positive integer or a fraction in (0, 1)"),
    (("layers", 0, 0, "slash"), -5, "layers[0][0].slash: must be a positive integer"),
    (("layers", 0, 0, "vertical"), 1.0, "layers[0][0].vertical: must be a positive integer or a fraction"),
    (("layers", 0, 0, "vertical"), True, "layers[0][0].vertical: must be a positive integer"),
    (("layers", 0, 0, "vertical"), "1000", "layers[0][0].vertical: must be a positive integer"),
    (("layers", 0, 0, "last_q"), 0, "layers[0][0].last_q: must be a positive integer"),
    (("layers", 0, 0, "force_vertical"), 65, "layers[0][0].force_vertical: must not exceed vertical=64"),
    (("layers", 0, 0, "top_k"), 3, "layers[0][0].top_k: unknown parameter for vertical_slash"),
    (("layers", 0, 2, "top_k"), 0.0, "layers[0][2].top_k: must be a positive integer or a fraction"),
    (("layers", 0, 0, "slash_select"), "tile", "layers[0][0].slash_select: must be one of ('token', 'block')"),
    (("layers", 0, 1, "local"), -1, "layers[0][1].local: must be a positive integer"),
    (("defaults", "a_shape", "sink"), 0, "defaults.a_shape.sink: must be a positive integer"),
    (("defaults", "spiral"), {}, "defaults.spiral: unknown pattern 'spiral'"),
    (("provenance",), [], "provenance: must be an object"),
    (("layers", 0, 3), {"pattern": "adaptive", "gamma": 0}, "layers[0][3].gamma: must be a number in (0, 1], got 0"),
    (
        ("layers", 0, 3),
        {"pattern": "adaptive", "gamma": 1.5},
        "layers[0][3].gamma: must be a number in (0, 1], got 1.5",
    ),
    (("layers", 0, 3), {"pattern": "adaptive", "gamma": "0.9"}, "layers[0][3].gamma: must be a number in (0, 1]"),
    (("layers", 0, 3), {"pattern": "adaptive", "tau": -0.1}, "layers[0][3].tau: must be a number in [0, 1], got -0.1"),
    (("layers", 0, 3), {"pattern": "adaptive", "tau": True}, "layers[0][3].tau: must be a number in [0, 1], got True"),
    (
        ("layers", 0, 3),
        {"pattern": "adaptive", "dense_above": 0.0},
        "layers[0][3].dense_above: must be a number in (0, 1]",
    ),
    (("layers", 0, 3), {"pattern": "adaptive", "max_blocks": 0}, "layers[0][3].max_blocks: must be a positive integer"),
    (("layers", 0, 3), {"pattern": "adaptive", "last_q": 0}, "layers[0][3].last_q: must be a positive integer"),
    (("layers", 0, 3), {"pattern": "adaptive", "top_k": 3}, "layers[0][3].top_k: unknown parameter for adaptive"),
    (("defaults", "adaptive"), {"gamma": float("nan")}, "defaults.adaptive.gamma: must be a number in (0, 1], got nan"),
    # Unknown keys, at every level.
    (
        ("min_seq_length",),
        0,
        "min_seq_length: unknown key (known: format, model, min_seq_len, defaults, layers, provenance)",
    ),
    (("model", "num_layer"), 2, "model.num_layer: unknown key (known: name, model_type, num_layers, num_heads"),
    (("defaults", "a_shape", "window"), 64, "defaults.a_shape.window: unknown parameter for a_shape"),
    (("layers", 1, 1, "Local"), 64, "layers[1][1].Local: unknown parameter for a_shape (known: sink, local)"),
    # Integers too large for the kernels' int32 indices.
    (("layers", 0, 0, "vertical"), 2**63, "layers[0][0].vertical: must be at most 2147483647 (2**31 - 1), got a 64"),
    (("layers", 0, 2, "top_k"), 2**31, "layers[0][2].top_k: must be at most 2147483647"),
    (("layers", 0, 0, "last_q"), 10**30, "layers[0][0].last_q: must be at most 2147483647"),
    (("layers", 0, 0, "force_slash"), 2**40, "layers[0][0].force_slash: must be at most 2147483647"),
    (("defaults", "a_shape", "local"), 2**63, "defaults.a_shape.local: must be at most 2147483647"),
    (("model", "num_heads"), 2**64, "model.num_heads: must be at most 2147483647"),
    (("min_seq_len",), 2**63, "min_seq_len: must be at most 2147483647"),
    # Not numbers: NaN and infinities.
    (("layers", 0, 0, "slash"), float("nan"), "layers[0][0].slash: must be a positive integer or a fraction in (0, 1)"),
    (("layers", 0, 0, "vertical"), float("inf"), "layers[0][0].vertical: must be a positive integer or a fraction"),
    (("layers", 0, 3), {"pattern": "adaptive", "tau": float("inf")}, "layers[0][3].tau: must be a number in [0, 1]"),
    (("min_seq_len",), float("-inf"), 'min_seq_len: must be "auto" or an integer >= 0, got -inf'),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[m.split(":")[0] for _, _, m in BAD])
def test_bad_config_names_the_field(path, value, message):
    raw = copy.deepcopy(good())
    set_in(raw, path, value)
    with pytest.raises(ConfigError) as e:
        SparseConfig.from_dict(raw)
    assert message in str(e.value)


def test_not_json(tmp_path):
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "c.json")


def _dump_with(path, replace: str, by: str) -> None:
    """The good config as JSON, with one piece of its text replaced."""
    text = json.dumps(good())
    assert replace in text
    path.write_bytes(text.replace(replace, by, 1).encode("latin-1"))


@pytest.mark.parametrize(
    "replace, by, message",
    [
        ('"vertical": 64', '"vertical": 9223372036854775808', "layers[0][0].vertical: must be at most 2147483647"),
        ('"vertical": 64', '"vertical": ' + "9" * 5000, "{path}: not valid JSON"),  # more digits than int() takes
        ('"vertical": 64', '"vertical": NaN', "layers[0][0].vertical: must be a positive integer or a fraction"),
        ('"slash": 0.25', '"slash": Infinity', "layers[0][0].slash: must be a positive integer or a fraction"),
        ('"slash": 0.25', '"slash": 1e400', "layers[0][0].slash: must be a positive integer or a fraction"),
        ('"min_seq_len": 0', '"min_seq_length": 0', "min_seq_length: unknown key"),
        ('"name": "tiny"', '"name": "tiny\xe9"', "{path}: not UTF-8 text"),
        ('"tool": "test"', '"tool": ' + "[" * 100_000 + "]" * 100_000, "{path}: not a config (JSON nested too deeply)"),
    ],
    ids=["int64", "huge-literal", "nan", "infinity", "1e400", "unknown-key", "latin-1", "deep"],
)
def test_bad_file_is_a_config_error_naming_the_place(tmp_path, replace, by, message):
    path = tmp_path / "c.json"
    _dump_with(path, replace, by)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message.format(path=path) in str(e.value)


@pytest.mark.parametrize("name", ["missing.json", "."])
def test_unreadable_file_is_a_config_error_naming_the_path(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ConfigError, match="cannot read the config") as e:
        load_config(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "field,value", [("num_layers", 3), ("num_heads", 8), ("num_kv_heads", 1), ("head_dim", 32), ("model_type", "qwen2")]
)
def test_shape_mismatch(field, value):
    other = ModelInfo(**{**vars(INFO), field: value})
    with pytest.raises(ConfigError, match=f"model.{field}: config was made for"):
        SparseConfig.from_dict(good()).check_model(other)


def test_adaptive_heads_round_trip_with_float_thresholds(tmp_path):
    raw = good()
    raw["layers"][1][0] = {"pattern": "adaptive", "gamma": 1, "tau": 0, "max_blocks": 0.5}
    raw["defaults"]["adaptive"] = {"dense_above": 0.75}
    config = SparseConfig.from_dict(raw)
    head = config.layers[1][0]
    assert head.params["gamma"] == 1.0 and isinstance(head.params["gamma"], float)  # JSON's 1 read as a number
    assert head.params["tau"] == 0.0 and head.params["dense_above"] == 0.75 and head.params["last_q"] == 128
    assert head.budget("max_blocks", 40) == 20
    save_config(config, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == config
    assert SparseConfig.uniform(INFO, "adaptive", gamma=0.95).layers[0][0].params["gamma"] == 0.95


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    save_config(SparseConfig.from_dict(good()), path)
    before = path.read_text()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_config(SparseConfig.uniform(INFO, "dense"), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left either
