"""Every recipe YAML (rlhf_ext/recipes/<model>/, which the clone's recipes/<model> points to)
names its recipe in its launch line, uses only keys that the recipe reads, and parses
with that recipe's own parser (types, loss names, choices)."""

import dataclasses
import re

import pytest
import yaml
from conftest import ROOT, load_recipe
from trl import TrlParser

from rlhf_ext.launch import with_machine_args

CONFIGS = ROOT / "rlhf_ext" / "recipes"
YAMLS = sorted(CONFIGS.glob("*/*.yaml"))
# Fields of TRL's ScriptArguments that no recipe of ours reads.
NEVER_READ = {"dataset_streaming", "ignore_bias_buffers"}


def recipe_module(path):
    """The recipe the YAML's launch line runs (``recipes/<name>.py``), imported."""
    found = re.search(r"recipes/(\w+)\.py", path.read_text())
    assert found, f"{path}: no 'accelerate launch ... recipes/<name>.py' line in its comments"
    return load_recipe(found[1])


def unread_keys(path) -> list[str]:
    fields = {f.name for cls in recipe_module(path).ARGUMENTS for f in dataclasses.fields(cls)}
    keys = yaml.safe_load(path.read_text())
    return sorted(k for k in keys if k not in fields or k in NEVER_READ)


def test_the_check_catches_a_misspelt_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# accelerate launch recipes/preference.py --config bad.yaml\n"
                   "lerning_rate: 1.0e-3\nbeta: 0.1\ndataset_streaming: true\n")
    assert unread_keys(bad) == ["dataset_streaming", "lerning_rate"]


def test_there_are_real_model_recipes():
    names = {str(p.relative_to(CONFIGS)) for p in YAMLS}
    assert (ROOT / "recipes" / "tiny" / "dpo.yaml").read_text() == \
        (CONFIGS / "tiny" / "dpo.yaml").read_text()  # the clone's paths still work
    for stage in ("sft", "reward", "dpo", "ppo"):
        assert {f"qwen2.5-0.5b/{stage}.yaml", f"qwen2.5-0.5b/{stage}_lora.yaml",
                f"llama3.1-8b/{stage}_qlora.yaml"} <= names, stage


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_yaml_keys_are_all_read(path):
    assert unread_keys(path) == []
    parsed = TrlParser(recipe_module(path).ARGUMENTS).parse_args_and_config(
        args=with_machine_args(["--config", str(path)]))
    values = {f.name: getattr(obj, f.name) for obj in parsed for f in dataclasses.fields(obj)}
    for key, value in yaml.safe_load(path.read_text()).items():
        got = values[key]
        if key == "report_to" and value == "none":
            value = []
        if isinstance(got, list) and not isinstance(value, list):
            got = got[0]  # loss_type and lora_target_modules take one name or several
        if key == "lora_target_modules" and got == "all-linear":
            continue
        assert got == value or str(getattr(got, "value", got)) == str(value), (key, got, value)
