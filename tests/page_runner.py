"""Run documentation pages' Python blocks, each page in a fresh process, paying the
libraries' import once: this process imports them, then forks one child per page, which runs
the page's code as ``__main__`` in its own folder and exits. A page sees a new process (its
own globals, RNG, threads and working directory) without its own 7-10 s of importing
transformers.

    python tests/page_runner.py JOBS.json

JOBS.json: a list of {"name", "code", "cwd"}; each child writes ``stdout.txt`` and
``stderr.txt`` in its cwd; this process prints one line per page: ``PAGE <name> <exit code>``.
"""

import json
import os
import sys
import traceback

# what every page imports; nothing here starts a thread, so forking is safe
import datasets  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import trl  # noqa: F401

import rlhf_ext  # noqa: F401


def run_child(job: dict) -> None:
    """In the forked child: the page's code as ``__main__``, its output to files."""
    os.chdir(job["cwd"])
    out = os.open("stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open("stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(out, 1), os.dup2(err, 2)
    stdout, stderr, print_exc, exit_now = sys.stdout, sys.stderr, traceback.print_exc, os._exit
    main = sys.modules["__main__"].__dict__
    for name in [n for n in main if not n.startswith("__")]:  # the runner's own names go
        del main[name]
    code = 0
    try:
        exec(compile(job["code"], job["name"], "exec"), main)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:  # an error: shown, and the page fails
        print_exc()
        code = 1
    stdout.flush(), stderr.flush()
    exit_now(code)


def main(jobs_file: str) -> None:
    with open(jobs_file) as f:
        jobs = json.load(f)
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            run_child(job)
        _, status = os.waitpid(pid, 0)
        print("PAGE", job["name"], os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
