"""sft.py: the loss covers the assistant's tokens only, averaged over the global batch; data
parallelism and resuming change nothing; the export carries the chat template. Every run's working
directory is a temporary one: sft.py without --model would take a user's out/train/hf from it."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import model as M
import sft
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conversations():
    """Uneven on purpose: a one-word answer beside long ones, so per-rank means would differ."""
    rng = torch.Generator().manual_seed(0)
    out = []
    for i in range(24):
        n = int(torch.randint(1, 60, (1,), generator=rng))
        answer = " ".join(["word"] * n) if i % 3 else "yes"
        out.append({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": f"question {i}?"},
                                 {"role": "assistant", "content": answer}]})
    return out


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations()))
    return path


def test_loss_is_the_mean_over_assistant_tokens_only():
    tok = data.load_tokenizer(None)
    convs = [c["messages"] for c in conversations()[:3]]
    dataset = sft.ChatDataset([(convs, 1.0)], tok, max_len=1024, seed=0, doc_mask=True, log=None)
    row = dataset[0]
    m = M.Llama(M.preset("tiny"))
    m.init_weights(seed=0)
    tokens, labels = row["tokens"][None], row["labels"][None]
    loss = m(tokens, labels=labels, positions=row["positions"][None], doc_ids=row["doc_ids"][None])
    # by hand: every conversation alone, its own positions, CE where format_chat marks the assistant
    total, count = 0.0, 0
    for messages in convs:
        ids, mask = data.format_chat(tok, messages)
        with torch.no_grad():
            logits = m(torch.tensor([ids]))[0]
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                total += F.cross_entropy(logits[t], torch.tensor(ids[t + 1])).item()
                count += 1
    assert count == int((labels != -100).sum())
    assert abs(loss.item() - total / count) < 1e-5


def test_conversation_weighting_is_the_mean_of_each_conversations_mean():
    """--loss-weighting conversation: two rows of packed conversations, each conversation's mean
    answer loss computed alone, then averaged over conversations (LongAlign's loss weighting)."""
    tok = data.load_tokenizer(None)
    convs = [c["messages"] for c in conversations()[:6]]
    dataset = sft.ChatDataset([(convs, 1.0)], tok, max_len=512, seed=0, doc_mask=True, log=None)
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in data.BATCH_KEYS}
    assert len(dataset) >= 2
    m = M.Llama(M.preset("tiny"))
    m.init_weights(seed=0)
    weights = train.label_weights(batch["labels"], batch["doc_ids"])
    total = m(batch["tokens"], labels=batch["labels"], positions=batch["positions"], doc_ids=batch["doc_ids"],
              reduction="sum", label_weights=weights)
    means = []
    for messages in convs:
        ids, mask = data.format_chat(tok, messages)
        with torch.no_grad():
            logits = m(torch.tensor([ids]))[0]
        losses = [F.cross_entropy(logits[t], torch.tensor(ids[t + 1])).item()
                  for t in range(len(ids) - 1) if mask[t + 1]]
        means.append(sum(losses) / len(losses))
    assert abs(weights.sum().item() - len(convs)) < 1e-4  # the divisor: one per conversation
    assert abs(total.item() / weights.sum().item() - sum(means) / len(means)) < 1e-5
    # and it differs from the token mean: the one-word answers weigh as much as the long ones
    token_mean = m(batch["tokens"], labels=batch["labels"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    assert abs(token_mean.item() - sum(means) / len(means)) > 1e-3


def sft_cmd(chat_file, out, nproc=1, extra=()):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launcher, os.path.join(ROOT, "sft.py"), "--data", str(chat_file), "--out", str(out),
            "--max-len", "256", "--batch", "4", "--steps", "4", "--heldout", "0", "--lr", "1e-3",
            "--no-activation-checkpointing", *extra]


def run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["tokens"]) for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def single(chat_file):
    out = chat_file.parent / "single"
    run(sft_cmd(chat_file, out, extra=["--save-every", "2"]), chat_file.parent)
    return out


def test_data_parallel_gives_the_same_losses_for_uneven_conversations(chat_file, single):
    out = chat_file.parent / "dp2"
    run(sft_cmd(chat_file, out, nproc=2), chat_file.parent)
    expected, got = losses(single), losses(out)
    assert len({tokens for _, tokens in expected.values()}) > 1  # the batches really are uneven
    for step in expected:
        assert got[step][1] == expected[step][1]
        assert abs(got[step][0] - expected[step][0]) <= 1e-5 * expected[step][0], step


def test_conversation_weighting_gives_the_same_losses_with_data_parallel(chat_file):
    one, two = chat_file.parent / "conv1", chat_file.parent / "conv2"
    run(sft_cmd(chat_file, one, extra=["--loss-weighting", "conversation"]), chat_file.parent)
    run(sft_cmd(chat_file, two, nproc=2, extra=["--loss-weighting", "conversation"]), chat_file.parent)
    expected, got = losses(one), losses(two)
    assert expected != losses(chat_file.parent / "single")  # a different loss from the token mean
    for step in expected:
        assert abs(got[step][0] - expected[step][0]) <= 1e-5 * expected[step][0], step


def test_conversation_weighting_refuses_context_parallel(chat_file, tmp_path):
    result = subprocess.run(sft_cmd(chat_file, tmp_path, extra=["--loss-weighting", "conversation", "--cp", "2"]),
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "--loss-weighting conversation" in result.stdout + result.stderr


def test_resume_equals_uninterrupted(chat_file, single):
    out = chat_file.parent / "resumed"
    shutil.copytree(single, out)
    shutil.rmtree(out / "checkpoints" / "step_00000004")  # as if the run died after step 2's save
    run(sft_cmd(chat_file, out, extra=["--save-every", "2", "--resume"]), chat_file.parent)
    expected, got = losses(single), losses(out)
    for step in (3, 4):
        assert abs(got[step][0] - expected[step][0]) <= 1e-6 * expected[step][0]


def test_export_carries_the_chat_template_the_tokenizer_ids_and_the_window(chat_file, single):
    config = json.loads((single / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == data.LLAMA31_CHAT_TEMPLATE
    model_config = json.loads((single / "hf" / "config.json").read_text())
    assert model_config["max_position_embeddings"] == 512
    tok = data.builtin_tokenizer()  # the tiny preset's: its ids go into the config, for serving tools
    assert model_config["bos_token_id"] == tok.bos_id and model_config["eos_token_id"] == list(tok.stop_ids)


def test_bad_records_stop_with_a_sentence_or_are_skipped_and_counted(chat_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = chat_file.read_text().splitlines()
    lines.insert(2, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    bad.write_text("\n".join(lines) + "\n")
    result = subprocess.run(sft_cmd(bad, tmp_path / "o1"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "line 3" in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = run(sft_cmd(bad, tmp_path / "o2", extra=["--skip-bad", "--steps", "1"]), tmp_path)
    assert "1 bad skipped" in result.stdout


def test_synthetic_chat_names_the_repeated_letter_and_holds_out_a_tenth_of_the_prompts():
    """The demo's task as the README states it: "Letter: " and one letter 12 to 40 times, the answer that letter;
    the held-out prompts are a fixed tenth of the 26 x 29 possible ones, never drawn for training."""
    train_set, test_set = sft.synthetic_chat(4000, seed=0), sft.synthetic_chat(200, seed=1, split="test")
    assert train_set == sft.synthetic_chat(4000, seed=0) and train_set != sft.synthetic_chat(4000, seed=1)
    every = {"Letter: " + c * n for c in sft.SYNTHETIC_LETTERS for n in range(12, 41)}
    test_prompts = {q["content"] for q, _ in test_set}
    held = {p for p in every if hashlib.blake2b(p.encode(), digest_size=8).digest()[0] % 10 == 0}
    assert len(every) == 26 * 29 and 50 <= len(held) <= 100 and test_prompts <= held
    assert not {q["content"] for q, _ in train_set} & held and len(test_prompts) > 40
    for question, answer in train_set + test_set:
        assert question["content"] in every and set(question["content"][8:]) == {answer["content"]}

def test_the_demos_held_out_prompts_are_never_among_those_it_trains_on(tmp_path, monkeypatch):
    """`python sft.py` as the README runs it (built-in SYNTHETIC set): the prompts it scores before and after share
    no prompt text with the rows the loop is handed (the README's exact match 0% -> 32% rests on it)."""
    monkeypatch.chdir(tmp_path)  # no out/train/hf here: the tiny preset
    scored, handed = [], []
    def scores(model, tok, conversations):
        scored.append(conversations)
        return {"exact_match": 0.0, "answer_loss": 0.0}
    def loop(args, model, dataset, tok, d):  # the rows it would train on; no training needed here
        handed.append((dataset, tok))
        return True  # as if it ran to the end: sft.py scores the held-out prompts again
    monkeypatch.setattr(sft, "heldout_scores", scores)
    monkeypatch.setattr(train, "train", loop)
    train.main(["--out", str(tmp_path / "out")], run=sft.run, parser=sft.build_parser, defaults=sft.fill_defaults)
    (dataset, tok), = handed
    user_turn = re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)
    trained = [p for i in range(len(dataset)) for p in user_turn.findall(tok.decode(dataset[i]["tokens"].tolist()))]
    assert len(trained) == dataset.stats["blended"] == 4000 and all(p.startswith("Letter: ") for p in trained)
    assert len(scored) == 2 and scored[0] == scored[1] and len(scored[0]) == 40  # before and after, --heldout's 40
    heldout = {m["content"] for conversation in scored[0] for m in conversation if m["role"] == "user"}
    assert len(heldout) > 20 and all(p.startswith("Letter: ") for p in heldout)
    overlap = sorted(heldout & set(trained))
    assert not overlap, f"{len(overlap)} held-out prompts are trained on, e.g. {overlap[0]!r}"

@pytest.mark.parametrize("args, message", [
    (["--max-len", "0"], "--max-len must be at least 1, not 0"),
    (["--steps", "0"], "--steps must be at least 1, not 0"),
    (["--heldout", "-1"], "--heldout must be at least 0, not -1"),
])
def test_bad_flags_are_refused_before_anything_is_loaded(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)  # no out/train/hf here: the tiny preset
    monkeypatch.setattr(train, "prepare", lambda *a: pytest.fail("loaded despite a bad flag"))
    with pytest.raises(SystemExit) as stopped:
        train.main([*args, "--out", str(tmp_path / "out")], run=sft.run, parser=sft.build_parser,
                   defaults=sft.fill_defaults)
    assert stopped.value.code == 2 and capsys.readouterr().err.startswith("error: " + message)
