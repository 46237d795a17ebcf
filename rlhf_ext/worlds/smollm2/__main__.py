"""``python -m rlhf_ext.worlds.smollm2``: build SmolLM2-135M-Instruct's directory once and
print its path."""

from .model import smollm2_path

if __name__ == "__main__":
    print(smollm2_path())
