"""The ``rlhf-ext`` command: the package's recipes from any folder.

    rlhf-ext                                   # the recipes and the configs shipped with them
    rlhf-ext preference --config tiny/dpo.yaml --loss_type simpo --output_dir out/simpo
    accelerate launch -m rlhf_ext.cli ppo --config tiny/grpo_oracle.yaml
    rlhf-ext vllm-serve --model PATH --port 8000   # a vLLM server for use_vllm, vllm_mode=server

A ``--config`` that is not a file here is looked up among the packaged configs
(``rlhf_ext/recipes/<model>/<name>.yaml``); every other flag goes to the recipe, which
reads it as ``accelerate launch recipes/<recipe>.py`` does.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.resources import files

RECIPES = {"sft": "sft", "reward": "reward", "preference": "preference", "dpo": "preference",
           "ppo": "ppo"}


def packaged_configs() -> list[str]:
    """The YAML configs installed with the package, as ``<model>/<name>.yaml``."""
    root = files("rlhf_ext.recipes")
    return sorted(f"{d.name}/{f.name}" for d in root.iterdir() if d.is_dir()
                  for f in d.iterdir() if f.name.endswith(".yaml"))


def resolve_config(argv: list[str]) -> list[str]:
    """``argv`` with its --config pointing at a file: as given when it exists, else the
    packaged config of that name; an unknown name is an error listing the shipped ones."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            index, value = i + 1, out[i + 1]
        elif arg.startswith("--config="):
            index, value = i, arg.split("=", 1)[1]
        else:
            continue
        if not os.path.exists(value):
            shipped = files("rlhf_ext.recipes").joinpath(value.removeprefix("recipes/"))
            if not shipped.is_file():
                raise SystemExit(f"--config {value}: no such file here, and no packaged config "
                                 f"of that name; shipped: {', '.join(packaged_configs())}")
            value = str(shipped)
        out[index] = value if index == i + 1 else f"--config={value}"
    return out


def vllm_serve(argv: list[str]) -> None:
    """``rlhf-ext vllm-serve``: vLLM's OpenAI-compatible server for ``vllm_mode="server"``
    (``vllm_server.serve_command``); flags it does not know go to vLLM."""
    import argparse

    from .vllm_server import serve

    parser = argparse.ArgumentParser(prog="rlhf-ext vllm-serve", description=vllm_serve.__doc__)
    parser.add_argument("--model", required=True, help="the policy's folder (or Hub id)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    known, extra = parser.parse_known_args(argv)
    raise SystemExit(serve(known.model, known.host, known.port, extra))


def main(argv: list[str] | None = None) -> None:
    from .launch import run_main

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "vllm-serve":
        vllm_serve(argv[1:])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in RECIPES:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown recipe {argv[0]!r}", file=sys.stderr)
        print(__doc__.split("\n\n")[1])
        print("recipes: " + ", ".join(RECIPES) + "; and vllm-serve (a vLLM server)")
        print("configs: " + ", ".join(packaged_configs()))
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    recipe = importlib.import_module(f"rlhf_ext.recipes.{RECIPES[argv[0]]}")
    sys.argv = [f"rlhf-ext {argv[0]}", *resolve_config(argv[1:])]
    run_main(recipe.main, recipe.ARGUMENTS)


if __name__ == "__main__":
    main()
