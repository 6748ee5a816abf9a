"""train.py end to end on CPU: context and data parallelism reproduce the single-process losses,
a killed run resumes to the same losses, the export loads in transformers, bad input is refused.
Every run's working directory is a temporary one: nothing depends on what a user's runs left."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from argparse import Namespace
from dataclasses import replace
from functools import partial

import pytest
import torch

import train
from gloo import run_on_gloo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def write_corpus(path):
    """A small JSONL corpus with documents of very different lengths, made here."""
    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
    with open(path, "w") as f:
        for i in range(60):
            n = int(torch.randint(5, 400, (1,), generator=rng))
            text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=rng))
            f.write(json.dumps({"text": f"document {i}: {text}"}) + "\n")


def train_cmd(tmp, out, nproc=1, extra=(), activation_checkpointing=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launcher, os.path.join(ROOT, "train.py"), "--data", str(tmp / "corpus.jsonl"), "--out", str(out),
            "--cache", str(tmp / "cache"), "--ctx", "256", "--batch", "4", "--steps", str(STEPS),
            "--original-window", "64", *extra,
            "--activation-checkpointing" if activation_checkpointing else "--no-activation-checkpointing"]


def run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run every other run is compared with."""
    tmp = tmp_path_factory.mktemp("train")
    write_corpus(tmp / "corpus.jsonl")
    result = run(train_cmd(tmp, tmp / "single", extra=["--save-every", "2"]), tmp)
    # one process saves its checkpoints without a process group: no torch warning about it, only our lines
    assert "Warning" not in result.stderr, result.stderr
    return tmp


def assert_same_losses(got, expected, steps):
    for step in steps:
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])


def _one_read_checks(path, rank, world_size):
    """Rank 0 reads, the others receive: each rank's FSDP shards, RoPE's inv_freq and the tied embedding equal,
    bit for bit, those of a model every rank read itself; eval's whole bf16 model equals from_pretrained's."""
    import eval as E
    import model as M
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    d, failures = train.Dist(rank, world_size, fsdp_mesh=init_device_mesh("cpu", (world_size,))), []
    args = Namespace(model=path, ctx=256, rope="yarn", original_window=64, activation_checkpointing=False,
                     compile=False, dtype="fp32")
    received = train.build_model(args, d)
    read = M.Llama.from_pretrained(path, dtype=torch.float32)
    read.set_rope(received.args.rope)
    for module in [*read.layers, read]:
        fully_shard(module, mesh=d.fsdp_mesh)
    for name, ours in received.state_dict().items():
        if not torch.equal(ours.to_local(), read.state_dict()[name].to_local()):
            failures.append(f"rank {rank}: {name} differs")
    if not torch.equal(received.inv_freq, read.inv_freq) or received.output.weight is not received.tok_embeddings.weight:
        failures.append(f"rank {rank}: inv_freq differs or the embedding is no longer tied")
    whole, _ = E.load_model(path, "bf16", d)
    expected = M.Llama.from_pretrained(path, dtype=torch.bfloat16).state_dict()
    failures += [f"rank {rank}: eval's {k} differs" for k, v in whole.state_dict().items() if not torch.equal(v, expected[k])]
    if whole.output.weight is not whole.tok_embeddings.weight:
        failures.append(f"rank {rank}: eval's embedding is no longer tied")
    return failures


def test_the_checkpoint_read_by_rank_0_reaches_every_rank_bit_for_bit(tmp_path):
    import data
    import model as M
    tied = M.Llama(replace(M.preset("tiny"), tie_embeddings=True))  # the shared matrix: a case of its own
    tied.init_weights(seed=1)
    tied.save_pretrained(str(tmp_path / "tied"), tokenizer=data.builtin_tokenizer())
    assert run_on_gloo(partial(_one_read_checks, str(tmp_path / "tied")), world_size=2) == []


@pytest.mark.parametrize("layout", [["--cp", "2"], ["--cp", "1"]], ids=["cp2", "dp2"])
def test_two_processes_reproduce_single_process_losses(reference, layout):
    out = reference / f"two_{layout[1]}"
    run(train_cmd(reference, out, nproc=2, extra=layout), reference)
    assert_same_losses(losses(out), losses(reference / "single"), range(1, STEPS + 1))


def test_cp2_with_document_mask_and_activation_checkpointing(reference):
    single, ring = reference / "docmask1", reference / "docmask2"
    extra = ["--doc-mask", "--steps", "3"]
    run(train_cmd(reference, single, extra=extra), reference)
    run(train_cmd(reference, ring, nproc=2, extra=[*extra, "--cp", "2"], activation_checkpointing=True), reference)
    assert_same_losses(losses(ring), losses(single), range(1, 4))
    assert losses(single)[1] != pytest.approx(losses(reference / "single")[1], rel=1e-4)  # the mask matters


def test_sigkill_then_resume_gives_the_same_losses(reference):
    out = reference / "killed"
    proc = subprocess.Popen(train_cmd(reference, out, extra=["--save-every", "2"]), cwd=reference,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "step_00000002" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a save that was cut short must not be mistaken for a checkpoint
    (out / "checkpoints" / "step_00000099.tmp").mkdir(parents=True)
    run(train_cmd(reference, out, extra=["--save-every", "2", "--resume"]), reference)
    assert_same_losses(losses(out), losses(reference / "single"), range(3, STEPS + 1))


def test_keeps_two_checkpoints_and_no_mfu_without_a_known_peak(reference):
    """KEEP = 2 complete checkpoints survive; on CPU there is no datasheet peak, so MFU is null."""
    assert sorted(os.listdir(reference / "single" / "checkpoints")) == ["step_00000004", "step_00000006"]
    with open(reference / "single" / "metrics.jsonl") as f:
        assert all(json.loads(line)["mfu"] is None for line in f)


def test_export_loads_in_transformers_with_our_logits(reference):
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, ROOT)
    from model import Llama
    hf_dir = str(reference / "single" / "hf")
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["max_position_embeddings"] == 256 and config["rope_scaling"]["factor"] == 4.0
    ours = Llama.from_pretrained(hf_dir)
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, 512, (1, 256))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--ctx", "1001", "--cp", "2", "--world", "2", "--plan"], "divisible by 2 x cp = 4"),
    (["--cp", "3", "--world", "4", "--plan"], "world size 4 is not divisible by --cp 3"),
    (["--resume", "{tmp}/nowhere"], "no complete checkpoint there"),
    (["--model", "{tmp}/empty_model"], "config.json is missing"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "empty_model").mkdir()
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out),
           *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_model_directory_without_weights(tmp_path):
    sys.path.insert(0, ROOT)
    import model as M
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(M.hf_config(M.preset("tiny"), torch.float32)))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", str(tmp_path / "m"),
                             "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "has no weights" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--ctx", "0"], "--ctx must be at least 1, not 0"),
    (["--steps", "0"], "--steps must be at least 1, not 0"),
    (["--batch", "0"], "--batch must be at least 1, not 0"),
    (["--lr", "-1"], "--lr must be a positive number, not -1.0"),
    (["--tokens", "0"], "--tokens must be at least 1, not 0"),
    (["--save-every", "-1"], "--save-every must be at least 0, not -1"),
    (["--ctx", "1M", "--cp", "3"], "world size 1 is not divisible by --cp 3"),
])
def test_bad_flags_are_refused_before_anything_is_loaded(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(train, "prepare", lambda *a: loaded.append(a))  # the step that would load
    with pytest.raises(SystemExit) as stopped:
        train.main([*args, "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and capsys.readouterr().err.startswith("error: " + message)
    assert not loaded and not os.listdir(tmp_path)
