"""pipeline --jobs N: independent stages side by side, each in its own process with its share
of the torch threads; a stage's numbers depend on its flags and thread count only, not on
what ran beside it; a failure stops new stages and keeps the finished ones."""
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from abd_fast.cli.stages import Slots, StageCancelled, StageError, Stages, WorkerPool
from test_pipeline import _run, cache  # noqa: F401 (fixture)


def _writer(log, seconds=0.05, fail=(), slow=()):
    """A fake command runner: records the stages running at once, writes eval.json (and a
    `uap` command's uap.pt); stages named in `slow` take 8x as long, those in `fail` exit
    with status 3."""
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def run(argv):
        name = Path(argv[argv.index("--output") + 1]).name
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            log.append(name)
        time.sleep(seconds * (8 if name in slow else 1))
        with lock:
            state["now"] -= 1
        if name in fail:
            return 3
        out = Path(argv[argv.index("--output") + 1])
        (out / "eval.json").write_text(json.dumps({"stage": name}))
        if argv[0] == "uap":
            (out / "uap.pt").write_bytes(b"")
        return 0
    return run, state


def test_stages_run_side_by_side_up_to_jobs(tmp_path):
    """Four chains of two stages on 2 jobs: never more than 2 stages at once, both slots
    used, every stage complete; a stage run alone goes to the in-process runner."""
    spawned, inproc = [], []
    spawn, state = _writer(spawned)
    main, _ = _writer(inproc)
    names = [f"{c}-{k}" for c in "abcd" for k in (1, 2)]
    st = Stages(tmp_path, {"first": 1, **dict.fromkeys(names, 1)}, main,
                log=lambda *a, **k: None, jobs=2, spawn=spawn)
    st.run("first", ["pretrain"], alone=True)
    st.parallel(lambda c: [st.run(f"{c}-{k}", ["defend", c, str(k)]) for k in (1, 2)], "abcd")
    assert inproc == ["first"] and sorted(spawned) == sorted(names)
    assert state["peak"] == 2
    for c in "abcd":  # each chain in its order
        assert spawned.index(f"{c}-1") < spawned.index(f"{c}-2")
    assert set(st.timing) == {"first", *names} and st.ended == {"first", *names}
    assert all(json.loads((tmp_path / n / "stage.json").read_text())["complete"] for n in names)
    with pytest.raises(ValueError, match="jobs > 1 needs spawn"):
        Stages(tmp_path, {}, main, jobs=2)


def test_a_free_slot_goes_to_the_waiting_stage_of_the_highest_priority():
    """One slot: the waiters take it by priority, not by arrival; a stage that asks within
    `settle` of the slot's release (one a finished stage made ready) competes for it too."""
    slots, order, releasing = Slots(1, settle=0.5), [], threading.Event()

    def holder():
        with slots.hold():
            time.sleep(0.3)  # the others queue meanwhile
            releasing.set()

    def waiter(name, priority, after=None):
        if after is not None:
            after.wait()
            time.sleep(0.15)  # after the release, within the settling time
        with slots.hold(priority):
            order.append(name)
    threads = [threading.Thread(target=holder)]
    threads += [threading.Thread(target=waiter, args=a) for a in (
        ("low", 1), ("high", 5), ("mid", 3), ("low-later", 1), ("ready-after", 9, releasing))]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert order == ["ready-after", "high", "mid", "low", "low-later"]
    assert slots.free == 1


def test_stage_priority_puts_the_longest_chain_first():
    """The demo's plan: what the most work waits for starts first (BadCLIP's trigger, the
    victims, ABD's UAP candidates and choice, then the fine-tuning runs, the scans last); a
    stage nothing waits for keeps its own cost; the first attack's ablations wait behind its
    defenses."""
    from abd_fast.cli.pipeline import DEFAULT_DEFENSES, UAP_CANDIDATES, plan_stages, \
        stage_priority
    cfg = dict(quick=False, pretrained=None, attacks=["badnet", "blended", "badclip"],
               defenses=list(DEFAULT_DEFENSES), ablations=False, stage_flags={},
               uap_candidates=UAP_CANDIDATES)
    plan = plan_stages(cfg)
    p = stage_priority(cfg, plan)
    assert set(p) == set(plan)
    chain = ["badclip-trigger", "poison-badclip", "uap-badclip-random-differential-steer",
             "uap-badclip-corner-paper", "uap-badclip", "badclip-abd", "badclip-ft",
             "scan-badclip", "scan-data-badclip", "floor-badclip"]
    assert [p[n] for n in chain] == sorted((p[n] for n in chain), reverse=True)
    assert p["poison-badclip"] == p["poison-badnet"] > p["uap-badnet"] > p["badnet-abd"]
    assert p["badclip-abd"] >= p["badclip-cleanclip"] > p["badclip-ft"]
    for leaf in ("badnet-ft", "badnet-cleanclip", "badnet-abd", "floor-badnet", "report"):
        assert p[leaf] == plan[leaf]
    assert p["uap-badnet"] == plan["uap-badnet"] + plan["badnet-abd"]
    full = dict(cfg, ablations=True)
    p = stage_priority(full, plan_stages(full))
    assert p["badnet-abd"] > p["blended-abd"] and p["badnet-ft"] > p["blended-ft"]
    # --scan-threshold calibrate: its fine-tunes follow the first victim (whose recipe they
    # take) and come before every scan and UAP choice that waits for the threshold.
    calibrate = dict(cfg, scan_threshold="calibrate", calibration_finetunes=3)
    plan = plan_stages(calibrate)
    assert [n for n in plan if n.startswith("calib-")] == [
        "calib-ft1", "calib-scan1", "calib-ft2", "calib-scan2", "calib-ft3", "calib-scan3"]
    p = stage_priority(calibrate, plan)
    assert p["poison-badnet"] > p["calib-ft1"] == p["calib-ft3"] > p["calib-scan1"] \
        > max(p[f"{kind}-{a}"] for kind in ("scan", "uap") for a in cfg["attacks"])


@pytest.mark.parametrize("case", ["pipeline", "table2+3 alone", "table3 alone"])
def test_ablation_rows_side_by_side_after_the_uap_files_they_share(tmp_path, case):
    """run_tables on 2 job slots: the rows the tables miss run side by side, each after the
    UAP file it uses (ABD's, trained first when not given, is shared by several rows); the
    stages run are planned_rows' and each row holds its own run's result."""
    from abd_fast.defenses.ablation import UAP_DIRS, planned_rows, run_tables
    ran, inproc = [], []
    spawn, state = _writer(ran, slow={"uap-file"})
    main, _ = _writer(inproc)
    tables = (3,) if case == "table3 alone" else (2, 3)
    known = ({"ft": {"stage": "ft-main"}, "i_adv_t_eda": {"stage": "abd-main"},
              "uap_bd": {"stage": "abd-main"}} if case == "pipeline" else {})
    uap_bd = "abd-uap.pt" if case == "pipeline" else None
    planned = planned_rows(tables, known=known, uap_bd_given=uap_bd is not None)
    st = Stages(tmp_path, dict.fromkeys(planned, 1), main, log=lambda *a, **k: None, jobs=2,
                spawn=spawn)
    out = run_tables(st, attack="badnet", checkpoint="victim.pt", common=[], tables=tables,
                     uap_bd=uap_bd, known=known)
    assert inproc == [] and sorted(ran) == sorted(planned) and state["peak"] == 2
    assert ran.index(UAP_DIRS["uap"]) < ran.index("uap")
    if uap_bd is None:  # ABD's UAP alone first, then everything that uses it
        assert ran[0] == UAP_DIRS["uap_bd"]
    t2, t3 = out["table2"], out["table3"]["rows"]
    assert t3["uap"] == {"stage": "uap"}
    if case == "pipeline":
        assert t2["rows"] == {"ft": {"stage": "ft-main"}, "i_adv": {"stage": "i_adv"},
                              "t_eda": {"stage": "t_eda"}, "i_adv_t_eda": {"stage": "abd-main"}}
        assert t3["uap_bd"] == {"stage": "abd-main"}
    elif case == "table2+3 alone":  # Table III's UAP + L_bd row is Table II's ABD row
        assert t2["rows"] == {r: {"stage": r} for r in ("ft", "i_adv", "t_eda", "i_adv_t_eda")}
        assert t3["uap_bd"] == {"stage": "i_adv_t_eda"}
    else:
        assert t2 is None and t3["uap_bd"] == {"stage": "uap_bd"}


def test_one_job_runs_the_pieces_in_order_in_process(tmp_path):
    ran = []
    main, state = _writer(ran, seconds=0)
    st = Stages(tmp_path, dict.fromkeys("xyz", 1), main, log=lambda *a, **k: None)
    assert st.parallel(lambda n: st.run(n, ["eval"]).name, "zxy") == ["z", "x", "y"]
    assert ran == ["z", "x", "y"] and state["peak"] == 1


def test_a_failed_stage_stops_new_ones_and_keeps_the_finished(tmp_path):
    """2 slots: a slow stage in one, a failing one in the other, a third stage waiting for a
    slot. The waiting stage and the slow one's successor are not started; the slow one
    finishes and is kept; the error raised is the failure's (naming its log)."""
    ran = []
    spawn, _ = _writer(ran, seconds=0.3, fail={"bad"}, slow={"slow"})
    st = Stages(tmp_path, {}, spawn, log=lambda *a, **k: None, jobs=2, spawn=spawn)

    def chain(names, delay=0.0):
        time.sleep(delay)  # the third chain asks for a slot once both are taken
        for n in names:
            st.run(n, ["defend", n])
    with pytest.raises(StageError, match=r"stage bad failed \(exit status 3\); its log is "
                                         r".*bad/log\.txt") as e:
        st.parallel(lambda args: chain(*args),
                    [(["slow", "after-slow"],), (["bad"],), (["waiting"], 0.1)])
    assert not isinstance(e.value, StageCancelled)
    assert sorted(ran) == ["bad", "slow"]
    assert json.loads((tmp_path / "slow" / "stage.json").read_text())["complete"]
    assert not json.loads((tmp_path / "bad" / "stage.json").read_text())["complete"]


def test_worker_pool_reuses_its_processes_logs_and_replaces_the_dead(tmp_path):
    """Parallel stages run in long-lived worker processes: commands one after another in the
    same process, each one's output (and a failure's exit status) in its <output>/log.txt; a
    worker that died is replaced by a new one."""
    import os
    import signal
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    pool = WorkerPool(threads=1, size=1)
    try:
        assert pool(["selfcheck", "--help", "--output", a]) == 0
        first = pool._idle.queue[0]
        assert pool(["no-such-command", "--output", b]) == 2
        assert pool._idle.queue[0] is first and first.poll() is None  # the same process
        help_text = "usage: python -m abd_fast.train selfcheck"
        assert help_text in (a / "log.txt").read_text()
        assert "invalid choice" in (b / "log.txt").read_text()
        assert help_text not in (b / "log.txt").read_text()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert pool(["selfcheck", "--help", "--output", c]) == 0
        assert pool._idle.queue[0].pid != first.pid
    finally:
        pool.close()
    assert pool._idle.empty()


def test_worker_ends_with_its_pipeline(tmp_path):
    """A killed pipeline takes its workers with it, whichever thread started them."""
    import os
    import signal
    import subprocess
    import sys
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "w = subprocess.Popen([sys.executable, '-m', 'abd_fast.cli.worker'], "
         "stdin=subprocess.PIPE)\nprint(w.pid, flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(worker, os.WNOHANG)  # not our child: ChildProcessError
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the worker outlived its pipeline by 10 s")


WORKER_SCRIPT = """
import os, sys
from pathlib import Path
from abd_fast.cli.worker import run_logged

def main(argv):
    print("python says", argv[0])
    os.write(2, b"C says hello\\n")
    if argv[0] == "fail":
        raise RuntimeError("broken stage")
    if argv[0] == "exit":
        raise SystemExit(2)
    return 0

log = Path(sys.argv[1])
print([run_logged(main, [a], log) for a in ("ok", "fail", "exit")], flush=True)
"""


def test_worker_sends_both_streams_and_failures_to_the_log(tmp_path):
    """run_logged, in a process of its own: Python's and the C libraries' output (file
    descriptors 1 and 2) go to the stage's log, a raised error becomes exit status 1 with its
    traceback there, and the process's own stdout is back afterwards."""
    import subprocess
    import sys
    log = tmp_path / "log.txt"
    out = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(log)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], check=True).stdout
    assert out == "[0, 1, 2]\n"
    text = log.read_text()
    assert text.count("C says hello") == 3 and "python says ok" in text
    assert "python says exit" in text and "RuntimeError: broken stage" in text


METRICS = ("ca_top1", "ca_top5", "asr", "embedding_distance", "capture_class", "capture_rate")


def _numbers(report) -> dict:
    """Every model's evaluation numbers and every scan's verdict in a report."""
    out = {f"{a}/{m}": {k: r.get(k) for k in METRICS}
           for a, models in report["attacks"].items() for m, r in models.items()}
    out |= {f"floor/{a}/{k}": {m: r.get(m) for m in METRICS}
            for a, f in report["floors"].items() for k, r in f.items()}
    scans = {k: s["model"] if "data" in s else s for k, s in report["scan"].items()}
    out |= {f"scan/{k}": (s["score"], s["suspected_target"]) for k, s in scans.items()}
    return out


@pytest.mark.slow
def test_jobs_2_gives_the_numbers_of_one_stage_at_a_time(cache, tmp_path, capsys):  # noqa: F811
    """The same quick pipeline in-process one stage at a time (with the threads a stage of
    --jobs 2 gets) and with --jobs 2 (two worker processes, two stages at once): the same
    numbers, exactly."""
    from abd_fast.cli.pipeline import stage_threads
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip(f"torch has {threads} thread here: --jobs 2 cannot split them")
    argv = ["--quick", "--attacks", "blended", "--defenses", "ft,abd", "--no-ablations",
            "--uap-candidates", "corner,linf:differential"]
    torch.set_num_threads(stage_threads(2))
    try:
        _run([*argv, "--output", tmp_path / "one"], capsys)
    finally:
        torch.set_num_threads(threads)
    text = _run([*argv, "--jobs", "2", "--output", tmp_path / "two"], capsys)
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert _numbers(one) == _numbers(two) and len(_numbers(one)) == 3 + 2 + 2
    assert one["settings"]["jobs"] == 1 and one["settings"]["stage_threads"] is None
    assert two["settings"]["jobs"] == 2 and two["settings"]["stage_threads"] == threads // 2
    assert "reusing the clean model" in text  # the first run's, cached
    assert (tmp_path / "two" / "blended-abd" / "log.txt").exists()
    assert not (tmp_path / "two" / "clean" / "log.txt").exists()  # alone: in-process


def test_jobs_bench_cuts_the_demo_stage(tmp_path):
    """bench/jobs.py times the demo's own badnet ABD stage, cut to --steps; without a demo
    run it says what to run."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.jobs import stage_argv
    with pytest.raises(SystemExit, match=r"badnet-abd/stage.json not found: run the demo"):
        stage_argv(tmp_path, 50)
    (tmp_path / "badnet-abd").mkdir()
    (tmp_path / "badnet-abd" / "stage.json").write_text(json.dumps(
        {"argv": ["defend", "--method", "abd", "--budget", "paper"], "complete": True}))
    assert stage_argv(tmp_path, 50) == ["defend", "--method", "abd", "--budget", "paper",
                                        "--budget-steps", "50"]


def test_stage_startup_bench_reads_the_demo_stage(tmp_path):
    """bench/stage_startup.py times the demo's floor-badnet stage, its flags without the
    output; without a demo run it says what to run."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.stage_startup import stage_argv
    with pytest.raises(SystemExit, match=r"floor-badnet/stage.json not found: run the demo"):
        stage_argv(tmp_path)
    (tmp_path / "floor-badnet").mkdir()
    (tmp_path / "floor-badnet" / "stage.json").write_text(json.dumps(
        {"argv": ["eval", "--checkpoint", "c.pt", "--output", "runs/x", "--attack", "badnet"],
         "complete": True}))
    assert stage_argv(tmp_path) == ["eval", "--checkpoint", "c.pt", "--attack", "badnet"]
