"""An operator's faults, each caused here: a relaunch of the same command or with any one option changed, another
run's --out, a second launch on one --out, SIGTERM/SIGUSR1 (to every rank, to one, a step apart), damaged checkpoints,
a full disk, a longer schedule, a NaN. Each checks the sentence, the exit status, which checkpoint is used, and that
the losses after the fault equal the uninterrupted run's (test_train's `reference`)."""
import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import sft
import train
from test_sft import sft_cmd
from test_train import STEPS, assert_same_losses, losses, reference, run, train_cmd  # noqa: F401 (a fixture)

# What the README says may change between the launches of one run, and what defines none (which folder or
# checkpoint, --plan/--tokenize-only, which never train, sft's count of held-out prompts): every other option is
# part of the run. Written out here, not read from train.py, so that a flag moved there is a failing test.
RELAUNCH_FREE = {"--steps", "--tokens", "--save-every", "--cp", "--micro-batch", "--compile",
                 "--activation-checkpointing", "--cache", "--skip-bad",
                 "--out", "--resume", "--plan", "--world", "--tokenize-only", "--heldout"}
STAGES = {"train": (train.build_parser, train.fill_defaults), "sft": (sft.build_parser, sft.fill_defaults)}


def launch(cmd, cwd, timeout=600):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def metric_steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def wait_for_steps(out, proc, n, timeout=300):
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(out / "metrics.jsonl") and len(open(out / "metrics.jsonl").readlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {n}")


def test_the_same_command_twice_continues_and_another_run_is_refused(reference):
    out = reference / "again"
    shutil.copytree(reference / "single", out)
    before = sorted(os.listdir(out / "checkpoints"))
    result = run(train_cmd(reference, out, extra=["--save-every", "2"]), reference)  # a requeue after the end
    assert f"resumed from {out / 'checkpoints' / 'step_00000006'} at step 6" in result.stdout
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert sorted(os.listdir(out / "checkpoints")) == before
    # another run into this --out (another --ctx): refused by name, nothing of the first run is touched
    result = launch(train_cmd(reference, out, extra=["--ctx", "128"]), reference)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {out} holds the checkpoints of another run (--ctx 256 there, 128 here): use another --out, " \
           f"or delete {out / 'checkpoints'} to start over there" in result.stderr
    assert sorted(os.listdir(out / "checkpoints")) == before and metric_steps(out) == list(range(1, STEPS + 1))


def relaunch(stage, argv, cwd):
    """main() of a stage up to its check of --out: the parser, the defaults, the device's defaults, claim_out; the model
    (which train.run and sft.run load before the check) is not needed. Returns the checkpoint it would continue from."""
    def claim(args):
        d = train.prepare(args)
        try:
            train.claim_out(args, d)
        finally:
            d.lock.close()  # the next launch in this process takes the lock again
        return args.resume
    parser, defaults = STAGES[stage]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)  # sft.py takes an ./out/train/hf it finds for --model
        patch.setenv("WORLD_SIZE", "2")  # as under torchrun: --cp 2 is possible
        patch.setattr(train, "setup_distributed", lambda cp: train.Dist())  # but no process group
        return train.main(argv, run=claim, parser=parser, defaults=defaults)


@pytest.fixture(scope="module")
def first_launches(reference):
    """For each stage, an --out whose run.json its first launch wrote, with a checkpoint; and that launch's argv."""
    launches = {}
    for stage, cmd in [("train", train_cmd(reference, reference / "relaunch_train", extra=["--save-every", "2"])),
                       ("sft", sft_cmd(reference / "chat.jsonl", reference / "relaunch_sft"))]:
        argv, out = cmd[2:], cmd[cmd.index("--out") + 1]  # without `python train.py`
        assert relaunch(stage, argv, reference) is None  # a fresh --out: started, run.json written
        shutil.copytree(reference / "single" / "checkpoints" / "step_00000004",
                        os.path.join(out, "checkpoints", "step_00000004"), copy_function=os.link)
        launches[stage] = argv, out
    return launches


def changed(action, base, reference, out):
    """The argv that changes one option from the first launch's value, chosen from the option's kind."""
    flag, value = action.option_strings[0], getattr(base, action.dest)
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if not value else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true
        return [flag]
    if flag in ("--model", "--resume"):  # a model directory, a checkpoint
        return [flag, str(reference / "single" / "hf") if flag == "--model" else f"{out}/checkpoints/step_00000004"]
    if action.choices:
        return [flag, next(c for c in action.choices if c != value)]
    if action.type in (int, float):
        return [flag, str(action.type(2 * value if value else 1))]  # doubled: still a multiple of what it must be
    if action.nargs == "*":
        return [flag, *(v + "_other" for v in value)]
    return [flag, str(2 * int(value)) if str(value).isdigit() else f"{value}_other" if value else "1"]


OPTIONS = [(stage, action.option_strings[0]) for stage, (parser, _) in STAGES.items()
           for action in parser()._actions if action.option_strings and action.dest != "help"]


@pytest.mark.parametrize("stage, flag", OPTIONS, ids=[f"{stage}{flag}" for stage, flag in OPTIONS])
def test_a_relaunch_with_one_option_changed_continues_only_if_it_may_change(first_launches, reference, capsys,
                                                                             stage, flag):
    argv, out = first_launches[stage]
    parser = STAGES[stage][0]()
    action = next(a for a in parser._actions if flag in a.option_strings)
    change = changed(action, parser.parse_args(argv), reference, out)
    run_json = pathlib.Path(out, "run.json")
    saved = run_json.read_text()
    try:
        if flag in RELAUNCH_FREE:
            resumed = relaunch(stage, [*argv, *change], reference)
            assert resumed == (None if flag == "--out" else f"{out}/checkpoints/step_00000004"), capsys.readouterr().err
        else:
            with pytest.raises(SystemExit) as refused:
                relaunch(stage, [*argv, *change], reference)
            err = capsys.readouterr().err
            assert refused.value.code == 2, err
            assert err.startswith(f"error: {out} holds the checkpoints of another run ("), err
            assert f"{flag} " in err.split(": use another --out")[0], err  # named
        assert run_json.read_text() == saved  # what defines the run is as the first launch wrote it
    finally:
        run_json.write_text(saved)  # for the next option, whatever this one did


def test_a_longer_schedule_extends_the_run_and_says_how(reference):
    out = reference / "longer"
    shutil.copytree(reference / "single", out)
    result = run(train_cmd(reference, out, extra=["--save-every", "2", "--steps", str(STEPS + 2)]), reference)
    assert f"at step {STEPS}; the schedule now ends at step {STEPS + 2}, not {STEPS}: lr at step {STEPS + 1}" in result.stdout
    assert metric_steps(out) == list(range(1, STEPS + 3))
    assert_same_losses(losses(out), losses(reference / "single"), range(1, STEPS + 1))  # the old rows are kept
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000006", "step_00000008"]


@pytest.mark.parametrize("damage", ["truncated shard", "flipped bytes", "truncated trainer state"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(reference, damage):
    out = reference / f"damaged_{damage.replace(' ', '_')}"
    shutil.copytree(reference / "single", out)
    newest = out / "checkpoints" / "step_00000006"
    shard, state = newest / "__0_0.distcp", newest / "trainer_state.json"
    if damage == "truncated shard":
        os.truncate(shard, os.path.getsize(shard) // 2)
    elif damage == "flipped bytes":  # 1 KB in the middle: it would load, and surface later as NaN
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            chunk = f.read(1024)
            f.seek(-1024, os.SEEK_CUR)
            f.write(bytes(b ^ 0xFF for b in chunk))
    else:
        os.truncate(state, os.path.getsize(state) // 2)
    # picking it explicitly is refused with what is wrong
    result = launch(train_cmd(reference, out, extra=["--resume", str(newest)]), reference)
    assert result.returncode == 2 and f"error: checkpoint {newest} is damaged: " in result.stderr, result.stderr
    assert ("trainer_state.json is unreadable" if "state" in damage else "__0_0.distcp is [") in result.stderr
    result = run(train_cmd(reference, out, extra=["--save-every", "2"]), reference)
    assert f"warning: skipping checkpoint {newest}, which is damaged" in result.stdout
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in result.stdout
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert_same_losses(losses(out), losses(reference / "single"), range(1, STEPS + 1))


def test_resume_from_an_older_checkpoint_replaces_the_newer_ones(reference):
    out = reference / "older"
    shutil.copytree(reference / "single", out)
    older = out / "checkpoints" / "step_00000004"
    result = run(train_cmd(reference, out, extra=["--resume", str(older), "--save-every", "1"]), reference)
    assert f"resumed from {older} at step 4" in result.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000005", "step_00000006"]
    assert_same_losses(losses(out), losses(reference / "single"), range(1, STEPS + 1))


def worker_pids(torchrun) -> dict[int, int]:
    """{rank: pid} of torchrun's workers, its children, by the RANK in their environment."""
    children = [int(pid) for task in os.listdir(f"/proc/{torchrun.pid}/task")
                for pid in open(f"/proc/{torchrun.pid}/task/{task}/children").read().split()]
    environs = {pid: open(f"/proc/{pid}/environ", "rb").read().split(b"\0") for pid in children}
    return {int(v[5:]): pid for pid, env in environs.items() for v in env if v.startswith(b"RANK=")}


def rows(out) -> int:  # metrics.jsonl's rows: rank 0 writes step N's before the ranks agree whether to stop
    return len(open(out / "metrics.jsonl").readlines())


def stopped_after(proc, out, reason, timeout=120):
    """The step a signalled launch stopped after; it said so once and saved that step."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # ranks that disagree on the step wait for each other for ever
        for pid in [*worker_pids(proc).values(), proc.pid]:  # each worker is in a session of its own
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the launch hung after the signal: {stdout[-2000:]}{stderr[-2000:]}") from None
    stopped = [line for line in stdout.splitlines() if line.startswith(f"stopped by {reason} after step ")]
    assert len(stopped) == 1, stdout[-2000:] + stderr[-2000:]
    step = int(stopped[0].split(" after step ")[1].split()[0])
    assert step < STEPS and f"checkpoint saved in {out}; run the same command to continue" in stopped[0]
    assert f"step_{step:08d}" in os.listdir(out / "checkpoints")
    return step


def test_sigterm_to_torchrun_saves_and_the_same_command_continues(reference):
    """torchrun forwards SIGTERM to its workers; they agree to stop after the same step, save, and say so."""
    out = reference / "preempted"
    cmd = train_cmd(reference, out, nproc=2, extra=["--cp", "2"])
    proc = subprocess.Popen(cmd, cwd=reference, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, proc, 1)
    proc.send_signal(signal.SIGTERM)
    step = stopped_after(proc, out, "SIGTERM")
    assert os.listdir(out / "checkpoints") == [f"step_{step:08d}"]
    result = run(cmd, reference)
    assert f"at step {step}" in result.stdout
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert_same_losses(losses(out), losses(reference / "single"), range(1, STEPS + 1))


def test_a_signal_to_one_worker_or_to_each_a_step_apart_stops_both_after_one_step(reference):
    """On a cluster one rank can be signalled alone, or the ranks in different steps: each rank's signals are summed
    over all ranks after every step, so both stop after the step the first signal came in (or the next, if it came
    after the sum), and save it; the launches that continue end with the uninterrupted run's losses. A rank that
    stopped alone would wait for the other for ever (a hang, killed)."""
    out = reference / "one_signalled"
    cmd = train_cmd(reference, out, nproc=2, extra=["--cp", "1"])  # data parallel: each rank its own batches
    proc = subprocess.Popen(cmd, cwd=reference, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, proc, 1)
    signalled_at = rows(out)
    os.kill(worker_pids(proc)[1], signal.SIGUSR1)  # rank 1 alone; rank 0, which prints, was not signalled
    first = stopped_after(proc, out, "a signal to another rank")
    assert proc.returncode == 0 and signalled_at <= first <= signalled_at + 1
    assert os.listdir(out / "checkpoints") == [f"step_{first:08d}"]
    # the same command continues; now rank 0 is signalled, and rank 1 once a step later is logged
    proc = subprocess.Popen(cmd, cwd=reference, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, proc, first + 1)
    ranks, signalled_at = worker_pids(proc), rows(out)
    os.kill(ranks[0], signal.SIGUSR1)
    deadline = time.time() + 60
    while proc.poll() is None and rows(out) <= signalled_at and time.time() < deadline:
        time.sleep(0.02)
    try:
        os.kill(ranks[1], signal.SIGUSR1)
    except ProcessLookupError:  # both had stopped already
        pass
    second = stopped_after(proc, out, "SIGUSR1")
    assert proc.returncode == 0 and signalled_at <= second <= signalled_at + 1
    assert sorted(os.listdir(out / "checkpoints")) == [f"step_{first:08d}", f"step_{second:08d}"]
    result = run(cmd, reference)
    assert f"resumed from {out / 'checkpoints' / f'step_{second:08d}'} at step {second}" in result.stdout
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert_same_losses(losses(out), losses(reference / "single"), range(1, STEPS + 1))


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(reference, monkeypatch):
    """--max-restarts: rank 1 SIGKILLed after step 2's checkpoint; torchrun stops rank 0 (SIGTERM, then a gloo
    error), starts a new group, which resumes from step 2: exit 0, the uninterrupted losses, one row per step.
    Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the new group may read the dead one's addresses: refused."""
    for name, value in [("WORLD_SIZE", "2"), ("TORCHELASTIC_MAX_RESTARTS", "3"), ("TORCHELASTIC_USE_AGENT_STORE", "True")]:
        monkeypatch.setenv(name, value)  # what torchrun --max-restarts 3 gives its workers by default
    with pytest.raises(train.UserError, match="torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        train.setup_distributed(2)
    out = reference / "elastic"
    cmd = train_cmd(reference, out, nproc=2, extra=["--cp", "2", "--save-every", "2"])
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=3")
    proc = subprocess.Popen(cmd, cwd=reference, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    marker = out / "checkpoints" / "step_00000002" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    rank0 = int(re.search(r"pid (\d+),", (out / "lock").read_text()).group(1))  # the lock names its holder
    workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    os.kill(next(int(pid) for pid in workers if int(pid) != rank0), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert re.search(r"resumed from \S+step_0000000[24] at step [24]", stdout), stdout[-2000:]
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert_same_losses(losses(out), losses(reference / "single"), range(1, STEPS + 1))


def test_sigusr1_stops_one_process_cleanly(reference):
    out = reference / "usr1"
    proc = subprocess.Popen(train_cmd(reference, out), cwd=reference, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_steps(out, proc, 1)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "stopped by SIGUSR1 after step " in stdout, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr


def test_a_second_launch_on_one_out_is_refused_and_a_dead_holder_leaves_no_lock(reference):
    out = reference / "locked"
    first = subprocess.Popen(train_cmd(reference, out, extra=["--steps", "200"]), cwd=reference,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(out, first, 1)
        result = launch(train_cmd(reference, out, extra=["--steps", "200"]), reference)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"error: {out} is in use by another launch (host " in result.stderr
        assert f", pid {first.pid}, since " in result.stderr and "wait for it to end, or use another --out" in result.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (out / "checkpoints" / "step_00000003.tmp").mkdir(parents=True)  # the save SIGKILL cut short
    result = run(train_cmd(reference, out, extra=["--steps", "2"]), reference)  # the lock died with its holder
    assert f"removing {out / 'checkpoints' / 'step_00000003.tmp'}: a save that a dead launch left unfinished" in result.stdout
    assert os.listdir(out / "checkpoints") == ["step_00000002"]


def test_a_full_disk_is_a_sentence_and_the_previous_checkpoint_survives(reference):
    """--out on a 50 MB filesystem (tmpfs in a user namespace): step 2's checkpoint (36 MB) fits, step 4's not."""
    if shutil.which("unshare") is None or launch(["unshare", "-rm", "true"], reference, 60).returncode:
        pytest.skip("no unprivileged mount namespace here to make a small filesystem in")
    mnt = reference / "small_disk"
    mnt.mkdir()
    out = mnt / "out"
    cmd = " ".join(f"'{a}'" for a in train_cmd(reference, out, extra=["--save-every", "2"]))
    script = (f"mount -t tmpfs -o size=50m tmpfs '{mnt}' && {{ {cmd}; echo rc=$?; "
              f"ls -a '{out}/checkpoints'; du -sb '{out}/checkpoints/step_00000002'; }}")
    result = launch(["unshare", "-rm", "sh", "-c", script], reference)
    assert "rc=2" in result.stdout and "Traceback" not in result.stderr, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"error: the disk holding {out} is full: step 4's checkpoint could not be written and was removed " \
           "(the previous ones are intact); free space and run the same command" in result.stderr
    listing = result.stdout.split("rc=2")[1].split()
    assert "step_00000004.tmp" not in listing and "step_00000002" in listing


def test_a_non_finite_loss_names_its_step(reference):
    out = reference / "nan"
    result = launch(train_cmd(reference, out, extra=["--lr", "1e12"]), reference)
    assert result.returncode == 1
    step = len(metric_steps(out)) + 1  # the rows of the finite steps were written
    assert f") at step {step}; stopping without saving" in result.stdout + result.stderr


def test_stage_1_skips_bad_records_with_skip_bad_and_counts_them_per_file(reference):
    corpus = reference / "bad_corpus"
    corpus.mkdir()
    shutil.copy(reference / "corpus.jsonl", corpus / "good.jsonl")
    (corpus / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "torn\n' + '{"no_text": 1}\n')
    (corpus / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(4096))
    cmd = [a if a != str(reference / "corpus.jsonl") else str(corpus) for a in train_cmd(reference, reference / "skip")]
    result = launch([*cmd, "--steps", "1"], reference)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {corpus / 'bad.jsonl'} line 2: malformed JSON" in result.stderr and "pass --skip-bad" in result.stderr
    result = run([*cmd, "--steps", "1", "--skip-bad"], reference)
    assert f"skipped 3 bad records: {corpus / 'bad.jsonl'} 2, {corpus / 'image.bin'} 1" in result.stdout
