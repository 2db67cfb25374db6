"""params.yaml validation, step views, the manifest reader and the code hash."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from pathgen.config import load_params, parse_step_params, step_params, step_params_json, validate_params
from pathgen.errors import ConfigError
from pathgen.store.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid_and_carry_the_papers_values(params):
    validate_params(params)
    assert params["tile"]["patch_size"] == 672 and params["tile"]["mode"] == "level0"
    assert params["clip"]["input_size"] == 336
    assert params["select"]["report_top_k"] == params["select"]["attribute_top_k"] == 64
    assert params["select"]["cluster_samples"] == 256
    assert params["select"]["similarity_threshold"] == 0.88


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda p: p["select"].update(report_top_k="64"), "select.report_top_k"),
        (lambda p: p["select"].update(topk=3), "select.topk"),
        (lambda p: p.update(extra_section={}), "extra_section"),
        (lambda p: p["tile"].pop("patch_size"), "tile.patch_size"),
        (lambda p: p["tile"]["mask"].update(min_saturation=300), "tile.mask.min_saturation"),
        (lambda p: p["embed"].update(device="tpu"), "embed.device"),
    ],
)
def test_validation_error_names_the_key(params, edit, key):
    bad = copy.deepcopy(params)
    edit(bad)
    with pytest.raises(ConfigError, match=rf"key '{key}'"):
        validate_params(bad)


def test_load_params_names_the_file_for_bad_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_params(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(path)


def test_step_views_hold_exactly_their_sections(params):
    assert set(step_params(params, "select")) == {"seed", "clip", "select"}
    assert set(step_params(params, "tile")) == {"tile"}
    text = step_params_json(params, "embed")
    assert parse_step_params(text, "embed") == step_params(params, "embed")
    with pytest.raises(ConfigError, match="embed.batch_size"):
        view = json.loads(text)
        view["embed"]["batch_size"] = 0
        parse_step_params(json.dumps(view), "embed")


def write_manifest(tmp_path, text):
    path = tmp_path / "slides.tsv"
    path.write_text(text)
    return path


def test_manifest_reads_optional_columns(tmp_path):
    path = write_manifest(tmp_path, "slide_id\tpath\ttissue\tproject\tmpp\treport\n"
                                    "a\ta.svs\tlung\tTCGA-LUAD\t\tr.txt\nb\tb.svs\tcolon\t\t0.5\t\n")
    a, b = read_manifest(path)
    assert (a.slide_id, a.project, a.mpp, a.report) == ("a", "TCGA-LUAD", None, "r.txt")
    assert (b.slide_id, b.project, b.mpp, b.report) == ("b", None, 0.5, None)


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id\tpath\na\ta.svs\n", "missing column"),
        ("slide_id\tpath\ttissue\na\ta.svs\tlung\na\tb.svs\tlung\n", "already used on line 2"),
        ("slide_id\tpath\ttissue\na b\ta.svs\tlung\n", "slide_id 'a b'"),
        ("slide_id\tpath\ttissue\tmpp\na\ta.svs\tlung\tfast\n", "mpp 'fast'"),
        ("slide_id\tpath\ttissue\na\t\tlung\n", "empty 'path'"),
        ("slide_id\tpath\ttissue\tstain\na\ta.svs\tlung\tHE\n", "unknown column"),
    ],
)
def test_manifest_errors_name_file_and_problem(tmp_path, text, message):
    path = write_manifest(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        read_manifest(path)
    assert str(path) in str(info.value)
