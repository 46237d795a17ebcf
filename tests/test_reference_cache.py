"""The shared cache of precomputed reference log-probs ($RLHF_EXT_CACHE): written atomically
under names unique to each writer, checked on load (a damaged, foreign, mis-shaped or
altered file is computed again with a warning naming it), and an unwritable folder keeps
the values in memory instead of failing after the whole reference pass."""

import threading

import pytest
import torch

import rlhf_ext.reference as reference
from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer
from rlhf_ext.reference import read_cache, write_cache
from rlhf_ext.worlds.tiny import preference_pairs

COLUMNS = {"ref_chosen_logps": torch.tensor([-3.0, -4.5, -2.25]),
           "ref_rejected_logps": torch.tensor([-5.0, -1.5, -7.0])}


def damage(path, how: str) -> None:
    """Ways a cache file goes wrong: each must be recomputed, not used or fatal."""
    good = path.read_bytes()
    if how in ("truncated", "empty", "garbage"):
        path.write_bytes({"truncated": good[: len(good) // 2], "empty": b"",
                          "garbage": b"not a torch file"}[how])
    elif how == "pickled code":  # torch.load(weights_only=True) must never run it
        torch.save({"columns": COLUMNS, "hook": threading.Thread}, path)
    elif how == "altered values":
        payload = torch.load(path, weights_only=True)
        payload["columns"] = {k: v + 1.0 for k, v in payload["columns"].items()}
        torch.save(payload, path)
    elif how == "wrong shape":
        columns = {k: v[:2] for k, v in COLUMNS.items()}
        torch.save({"version": 2, "columns": columns,
                    "sha256": reference._checksum(columns)}, path)
    else:  # the version-1 layout: the columns alone
        torch.save(dict(COLUMNS), path)


def test_a_written_cache_reads_back(tmp_path):
    path = tmp_path / "k.pt"
    write_cache(path, COLUMNS)
    got = read_cache(path, rows=3)
    assert got.keys() == COLUMNS.keys()
    for k in COLUMNS:
        assert torch.equal(got[k], COLUMNS[k])
    assert [p.name for p in tmp_path.iterdir()] == ["k.pt"]  # no temporary file left


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "pickled code",
                                 "altered values", "wrong shape", "the version-1 layout"])
def test_a_damaged_cache_file_is_recomputed_with_a_warning(tmp_path, how):
    path = tmp_path / "k.pt"
    write_cache(path, COLUMNS)
    damage(path, how)
    with pytest.warns(UserWarning, match=rf"cache {path} is .*computing the values again"):
        assert read_cache(path, rows=3) is None


def test_two_writers_of_one_key_do_not_collide(tmp_path, monkeypatch):
    """Run A has written its temporary file and is slow to rename it; run B writes and
    renames the same key meanwhile. Before, both used '<key>.tmp': B's rename took A's file
    and A died with FileNotFoundError after its whole reference pass."""
    path, real_replace = tmp_path / "k.pt", reference.os.replace
    a_written, b_done = threading.Event(), threading.Event()

    def replace(src, dst):
        if threading.current_thread().name == "A":
            a_written.set()
            b_done.wait(timeout=30)
        real_replace(src, dst)

    monkeypatch.setattr(reference.os, "replace", replace)
    errors = []

    def run(name):
        try:
            write_cache(path, COLUMNS)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    assert a_written.wait(timeout=30)
    run("B")
    b_done.set()
    a.join(timeout=30)
    assert errors == [] and read_cache(path, rows=3) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["k.pt"]


def make(policy_dir, tok, tmp_path, cache_dir, **kw):
    args = PreferenceConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=True,
                            ref_logps_cache_dir=str(cache_dir), max_length=64, max_steps=1,
                            per_device_train_batch_size=4, report_to="none", use_cpu=True,
                            save_strategy="no", disable_tqdm=True, **kw)
    return PreferenceTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(8, seed=2),
                             processing_class=tok)


def test_the_trainer_recomputes_a_damaged_file_and_survives_an_unwritable_folder(
        policy_dir, tok, tmp_path):
    first = make(policy_dir, tok, tmp_path, tmp_path / "cache")
    values = list(first.train_dataset["ref_chosen_logps"])
    path = first.reference.cache_path
    payload = torch.load(path, weights_only=True)
    payload["columns"]["ref_chosen_logps"] += 5.0  # someone edited the values
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="do not match their checksum"):
        second = make(policy_dir, tok, tmp_path, tmp_path / "cache")
    assert second.reference.cache_hit is False
    assert list(second.train_dataset["ref_chosen_logps"]) == values  # computed again, right
    assert read_cache(path, rows=8) is not None  # and the file replaced by a good one

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match=r"a_file/cache is not writable.*in memory only"):
        third = make(policy_dir, tok, tmp_path, blocker / "cache")
    assert list(third.train_dataset["ref_chosen_logps"]) == values
    third.train()
    assert third.state.global_step == 1
