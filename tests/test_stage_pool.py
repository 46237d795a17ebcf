"""demos/stage_pool.py, the runner of make demo-real's stages: order, concurrency, the
thread count each stage gets, reuse of finished stages, and what a failure leaves behind."""

import json
import sys

import pytest
from conftest import load_demo

pool = load_demo("stage_pool")

# a stage: records when it ran and with how many threads, sleeps, then writes its done file
STAGE = ("import json, os, sys, time; start = time.time(); time.sleep(float(sys.argv[2])); "
         "code = int(sys.argv[3]); code or open(sys.argv[1], 'w').write(json.dumps("
         "{'start': start, 'end': time.time(), 'threads': os.environ['OMP_NUM_THREADS']})); "
         "sys.exit(code)")


def job(tmp_path, name, after=(), sleep=0.4, code=0):
    return pool.Job(name, [sys.executable, "-c", STAGE, str(tmp_path / f"{name}.json"),
                           str(sleep), str(code)],
                    tmp_path / f"{name}.json", tmp_path / "logs" / f"{name}.txt", list(after))


def ran(tmp_path, name):
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_jobs_run_two_at_a_time_after_what_they_read(tmp_path):
    jobs = [job(tmp_path, "reward"), job(tmp_path, "dpo"), job(tmp_path, "ppo", ["reward"]),
            job(tmp_path, "eval_ppo", ["ppo", "dpo"]), job(tmp_path, "ipo")]
    seconds = pool.run_jobs(jobs, workers=2, threads=3)
    assert set(seconds) == {"reward", "dpo", "ppo", "eval_ppo", "ipo"}
    assert all(s >= 0.4 for s in seconds.values())
    r = {j.name: ran(tmp_path, j.name) for j in jobs}
    assert {x["threads"] for x in r.values()} == {"3"}
    assert r["ppo"]["start"] >= r["reward"]["end"]
    assert r["eval_ppo"]["start"] >= max(r["ppo"]["end"], r["dpo"]["end"])
    # never more than two at once: at every start, count the jobs running then
    for x in r.values():
        assert sum(y["start"] <= x["start"] < y["end"] for y in r.values()) <= 2
    # and two did run at once: the first two in list order started together
    assert r["dpo"]["start"] < r["reward"]["end"]
    assert (tmp_path / "logs" / "ppo.txt").exists()


def test_finished_jobs_are_reused(tmp_path, monkeypatch):
    (tmp_path / "reward.json").write_text("{}")
    jobs = [job(tmp_path, "reward", sleep=30), job(tmp_path, "ppo", ["reward"])]
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    seconds = pool.run_jobs(jobs, workers=2, threads=None)  # None: the environment's
    assert seconds["reward"] == 0.0 and seconds["ppo"] > 0
    assert (tmp_path / "reward.json").read_text() == "{}"  # not rerun
    assert ran(tmp_path, "ppo")["threads"] == "5"


def test_a_failure_stops_new_starts_and_keeps_the_running_job(tmp_path, capsys):
    jobs = [job(tmp_path, "reward", code=3, sleep=0.1), job(tmp_path, "dpo", sleep=1.5),
            job(tmp_path, "ppo", ["reward"]), job(tmp_path, "ipo")]
    with pytest.raises(SystemExit, match="stage reward failed.*not started: ppo, ipo"):
        pool.run_jobs(jobs, workers=2, threads=1)
    assert ran(tmp_path, "dpo")["end"] > 0  # finished and kept for a rerun
    assert not (tmp_path / "ppo.json").exists() and not (tmp_path / "ipo.json").exists()
    assert "reward: FAILED (3)" in capsys.readouterr().out


def test_unknown_repeated_or_circular_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown 'after' \['sft'\]"):
        pool.run_jobs([job(tmp_path, "ppo", ["sft"])], workers=2, threads=1)
    with pytest.raises(ValueError, match="repeated names"):
        pool.run_jobs([job(tmp_path, "a"), job(tmp_path, "a")], workers=2, threads=1)
    with pytest.raises(ValueError, match=r"jobs \['a', 'b'\] wait on each other"):
        pool.run_jobs([job(tmp_path, "a", ["b"]), job(tmp_path, "b", ["a"])], workers=2,
                      threads=1)
