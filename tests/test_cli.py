"""The ``rlhf-ext`` command runs the packaged recipes from any folder, with the configs
installed beside them (a recipe trained through it: tests/test_preference_recipes.py), and
recipe YAMLs take TRL's dataset mixtures."""

import json
import sys
from pathlib import Path


def test_the_command_is_installed_and_lists_recipes_and_configs(tmp_path, monkeypatch,
                                                                capsys):
    import pytest

    from rlhf_ext.cli import main

    assert (Path(sys.executable).parent / "rlhf-ext").exists()  # the console script
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    with pytest.raises(SystemExit) as done:
        main([])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert "recipes: sft, reward, preference, dpo, ppo" in shown
    assert "tiny/dpo.yaml" in shown and "smollm2/reward.yaml" in shown
    with pytest.raises(SystemExit, match="no packaged config of that name; shipped: "):
        main(["dpo", "--config", "no.yaml"])


def test_a_recipe_reads_a_dataset_mixture(tmp_path):
    """TRL's datasets: mixture in a recipe YAML (as TRL's own scripts and the
    alignment-handbook write it): shares by fraction, no source oversampled, a test split."""
    import yaml
    from trl import TrlParser

    from rlhf_ext.launch import with_machine_args
    from rlhf_ext.recipes.preference import ARGUMENTS

    sources = {}
    for name, n in (("a", 8), ("b", 4)):
        rows = [{"prompt": f"{name} prompt {i}", "chosen": " good .", "rejected": " bad ."}
                for i in range(n)]
        sources[name] = tmp_path / f"{name}.jsonl"
        sources[name].write_text("\n".join(json.dumps(r) for r in rows))
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({
        "datasets": [{"path": "json", "data_files": str(sources["a"]), "fraction": 0.5},
                     {"path": "json", "data_files": str(sources["b"]), "fraction": 0.5}],
        "test_split_size": 0.25, "eval_strategy": "steps", "output_dir": str(tmp_path / "o")}))
    script, training, _, recipe = TrlParser(ARGUMENTS).parse_args_and_config(
        args=with_machine_args(["--config", str(config)]))
    train, evaluation = recipe.load_datasets(script, training)
    prompts = sorted(list(train["prompt"]) + list(evaluation["prompt"]))
    # 8 and 4 rows at equal shares: 4 of each (b has no more), then 6 train / 2 test
    assert (len(train), len(evaluation)) == (6, 2)
    assert prompts == sorted([f"a prompt {i}" for i in range(4)]
                             + [f"b prompt {i}" for i in range(4)])
