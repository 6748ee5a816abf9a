"""eval.py's context-parallel generation against one device: two gloo processes split a prompt
(padded to a multiple of 2 x cp) and must produce exactly the tokens Llama.generate produces in one
process, and the prefill's last-position logits within 1e-4; a launch that does not match --cp
fails with one sentence."""

import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch

import attention
import data
from gloo import run_on_gloo
import eval as E
import model as M
import rope

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CP = 2
# (prompt length, max new tokens, block size). 1: rank 1 holds only pads; 5: the pads span two
# chunks on two ranks; 13: not a multiple of 2 x cp = 4; 16: a multiple, no pad. Block size 3 cuts
# the decode attention and the ring's tiles into several blocks.
CASES = [(1, 4, 4096), (5, 6, 4096), (13, 8, 4096), (13, 8, 3), (16, 8, 4096)]
LOGIT_TOLERANCE = 1e-4


def tiny_model():
    # std 0.1 rather than 0.02: sharp attention, so a wrong position or a key counted twice
    # changes the greedy tokens (at 0.02 attention is nearly uniform and hides such bugs)
    model = M.Llama(M.preset("tiny"))
    model.init_weights(std=0.1, seed=0)
    return model.eval()


def _cp_checks(rank, world_size):
    """Every comparison one rank makes; returns a list of failure messages."""
    model, failures = tiny_model(), []
    generator = torch.Generator().manual_seed(0)  # the same prompts on every rank
    for n, max_new, block_size in CASES:
        prompt = torch.randint(0, model.args.vocab_size, (n,), generator=generator).tolist()
        expected_logits = model(torch.tensor([prompt]))[0, -1]  # (vocab,), one device, no cache
        expected = model.generate(prompt, max_new)
        model.set_attention(partial(attention.ring_attention, group=None, block_size=block_size))
        logits, _, _ = E.cp_prefill(model, prompt, room=max_new)
        model.set_attention(M.chunked_attention)
        error = (logits[0] - expected_logits).abs().max().item()
        if not error <= LOGIT_TOLERANCE:
            failures.append(f"rank {rank}, length {n}: prefill logits differ by {error:.2e}")
        got = E.cp_generate(model, prompt, max_new, block_size=block_size)
        if got != expected:
            failures.append(f"rank {rank}, length {n}, block {block_size}: cp gave {got}, one device {expected}")
        # a stop token ends both at the same place
        stop = expected[2]
        got = E.cp_generate(model, prompt, max_new, stop_ids=(stop,), block_size=block_size)
        if got != expected[:expected.index(stop) + 1]:
            failures.append(f"rank {rank}, length {n}: with stop {stop} cp gave {got}, one device {expected}")
    if model.layers[0].attention.attention_fn is not M.chunked_attention:
        failures.append(f"rank {rank}: cp_generate did not put the model's attention function back")
    return failures


def test_cp_generation_matches_one_device():
    failures = run_on_gloo(_cp_checks, CP)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("cp, world, words", [
    (2, 1, "--cp 2 needs 2 processes but 1 were started"),
    (2, 3, "world size 3 is not divisible by --cp 2"),
    (2, 4, "pass --cp 4"),
    (0, 1, "--cp must be at least 1"),
])
def test_cp_launch_that_does_not_fit_is_refused(cp, world, words):
    with pytest.raises(rope.UserError, match=words):
        E.check_cp_launch(cp, world)


def test_cli_refuses_cp_without_enough_processes_in_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # not under torchrun: one process
    argv = ["passkey", "--model", str(tmp_path / "never-loaded"), "--cp", "2", "--lengths", "256"]
    assert E.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --cp 2 needs 2 processes") and "\n" not in err
    E.check_cp_launch(1, 1)  # and the ordinary single-process run passes the check


def test_ppl_under_torchrun_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; ppl has no --cp
    assert E.main(["ppl", "--model", str(tmp_path / "never-loaded")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ppl has no context-parallel path") and "\n" not in err


def test_torchrun_passkey_with_cp_matches_one_process(tmp_path, monkeypatch):
    """The CLI path: `torchrun --nproc_per_node 2 eval.py passkey --cp 2` writes, from rank 0 only,
    the predictions a single process writes. A prompt of 442 tokens: not a multiple of 4."""
    model_dir, cache = str(tmp_path / "tiny"), str(tmp_path / "cache")
    tiny_model().save_pretrained(model_dir, tokenizer=data.builtin_tokenizer())
    argv = ["passkey", "--model", model_dir, "--cache", cache, "--lengths", "450", "--depths", "0.5",
            "--max-new-tokens", "8"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(CP),
              "eval.py", *argv, "--cp", str(CP), "--out", str(tmp_path / "cp")]
    run = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("results.json") == 1  # rank 1 stays quiet
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert E.main([*argv, "--out", str(tmp_path / "one")]) == 0
    cp, one = (json.load(open(tmp_path / d / "results.json")) for d in ("cp", "one"))
    assert [it["prompt_tokens"] for it in cp["items"]] == [442]
    assert [it["prediction"] for it in cp["items"]] == [it["prediction"] for it in one["items"]]
    assert cp["settings"]["cp"] == CP


def test_torchrun_resume_skips_the_same_items_on_every_rank(tmp_path):
    """Under --cp rank 0 alone reads and writes OUT/items.jsonl and every rank skips what it holds: a finished
    item is read back (tampered with here, to show it is not recomputed), the missing one generated by both."""
    model_dir, out = str(tmp_path / "tiny"), tmp_path / "cp"
    tiny_model().save_pretrained(model_dir, tokenizer=data.builtin_tokenizer())
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(CP), "eval.py",
              "passkey", "--model", model_dir, "--cache", str(tmp_path / "cache"), "--lengths", "400",
              "--depths", "0.25,0.75", "--max-new-tokens", "4", "--cp", str(CP), "--out", str(out)]
    for _ in range(2):
        run = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]
        if _ == 0:
            first = json.loads((out / "results.json").read_text())
            settings, done, _lost = (out / "items.jsonl").read_text().splitlines()
            (out / "items.jsonl").write_text(settings + "\n" + json.dumps(dict(json.loads(done), prediction="TAMPERED"))
                                             + "\n")
    resumed = json.loads((out / "results.json").read_text())
    assert [it["prediction"] for it in resumed["items"]] == ["TAMPERED", first["items"][1]["prediction"]]
    assert len((out / "items.jsonl").read_text().splitlines()) == 3
