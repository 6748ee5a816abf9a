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


# --- the SFT sets as published --------------------------------------------------------------------
def plain_conversations():
    """One question and answer each, as Alpaca and MetaMath hold them; every other one has an input after "\n\n"."""
    return [[{"role": "user", "content": f"Add {i} and {i}." + (f"\n\nThe numbers: {i}, {i}." if i % 2 else "")},
             {"role": "assistant", "content": f"{i} + {i} = {2 * i}"}] for i in range(12)]


def published(messages, fmt):
    """The conversation as the published set writes it (its extra fields, which are ignored, included)."""
    if fmt == "ShareGPT":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"id": "x1", "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    question, answer = messages[0]["content"], messages[1]["content"]
    if fmt == "MetaMath":
        return {"query": question, "response": answer, "type": "GSM_Rephrased", "original_question": question}
    instruction, _, extra = question.partition("\n\n")
    return {"Alpaca": {"instruction": instruction, "input": extra, "output": answer},
            "GPTeacher": {"instruction": instruction, "input": extra, "response": answer},
            "WizardCoder": {"instruction": question, "output": answer},  # no input field
            "MathInstruct": {"source": "data/CoT/gsm_rft.json", "instruction": question, "output": answer}}[fmt]


FORMAT_NAMES = {"ShareGPT": "ShareGPT", "MetaMath": "MetaMath"}  # the others are all read as Alpaca


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("fmt", ["ShareGPT", "Alpaca", "GPTeacher", "WizardCoder", "MathInstruct", "MetaMath"])
def test_each_published_format_gives_the_tokens_mask_and_losses_of_its_messages(tmp_path, fmt):
    tok = data.load_tokenizer(None)
    convs = plain_conversations()
    if fmt == "ShareGPT":  # system turns and several rounds too
        convs += [c["messages"] for c in conversations()[:6]] + [convs[0] + convs[1]]
    ours_path = write_records(tmp_path / "published.jsonl", [published(c, fmt) for c in convs])
    messages_path = write_records(tmp_path / "messages.jsonl", [{"messages": c} for c in convs])
    for weight in (1.0, 2.5):  # file:weight blends every format alike
        logs = []
        ours = sft.ChatDataset([(ours_path, weight)], tok, max_len=256, seed=0, doc_mask=True, log=logs.append)
        expected = sft.ChatDataset([(messages_path, weight)], tok, max_len=256, seed=0, doc_mask=True, log=None)
        assert len(ours) == len(expected) and ours.stats == expected.stats
        batches = [{k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in data.BATCH_KEYS}
                   for ds in (ours, expected)]
        for key in data.BATCH_KEYS:  # tokens, labels (the mask), positions, conversations
            assert batches[0][key].tolist() == batches[1][key].tolist(), key
        assert f"{ours_path}: {len(convs)} {FORMAT_NAMES.get(fmt, 'Alpaca')} records" in logs[0]
    m = M.Llama(M.preset("tiny"))
    m.init_weights(seed=0)
    with torch.no_grad():  # the loss the training loop takes of the first two rows
        losses = [m(b["tokens"][:2], labels=b["labels"][:2], positions=b["positions"][:2],
                    doc_ids=b["doc_ids"][:2]).item() for b in batches]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("record, message", [
    ({"conversations": "hi"}, "'conversations' is not a non-empty list"),
    ({"conversations": [{"from": "human"}]}, "'conversations' turn 0 is not an object with 'from' and a string"),
    ({"conversations": [{"from": "human", "value": 5}]}, "'conversations' turn 0 is not an object with 'from' and"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function", "value": "{}"}]},
     "'conversations' turn 1 is from 'function' \\(expected system, human, user, gpt, assistant\\)"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "the conversation has no assistant turn"),
    ({"instruction": 5, "output": "a"}, "the record's 'instruction' is not a string"),
    ({"instruction": "q"}, "the record has neither 'output' nor 'response', so it has no answer"),
    ({"instruction": "q", "input": ["x"], "output": "a"}, "the record's 'input' is not a string"),
    ({"instruction": "q", "response": None}, "the record has neither 'output' nor 'response'"),
    ({"instruction": "q", "output": ["a"]}, "the record's 'output' is not a string"),
    ({"instruction": "q", "output": "a", "response": "b"},
     "the record has both 'output' and 'response', so its answer is ambiguous"),
    ({"query": "q", "response": None}, "the record's 'response' is missing"),
    ({"query": "q", "response": 4}, "the record's 'response' is not a string"),
    ({"query": "q", "instruction": "i", "response": "a"},
     r"the record's fields \(query, instruction, response\) fit several formats at once: Alpaca and MetaMath \("),
    ({"messages": [], "conversations": []},
     r"the record's fields \(messages, conversations\) fit several formats at once: messages and ShareGPT \("),
    ({"question": "q", "answer": "a"},
     r"the record's fields \(question, answer\) fit none of the formats messages, ShareGPT, Alpaca, MetaMath, "
     r"prompt/completion \("),
])
def test_a_bad_record_of_each_format_is_named_by_file_and_line(tmp_path, record, message):
    tok = data.load_tokenizer(None)
    good = published(plain_conversations()[1], "Alpaca")
    path = write_records(tmp_path / "chat.jsonl", [good, record])
    with pytest.raises(data.UserError, match=rf"chat\.jsonl line 2: {message}"):
        sft.ChatDataset([(path, 1.0)], tok, max_len=256, log=None)
    assert sft.ChatDataset([(path, 1.0)], tok, max_len=256, skip_bad=True, log=None).stats["bad_skipped"] == 1


def test_published_sets_read_from_parquet_and_zstd_jsonl(tmp_path):
    """The hub's Parquet export of a ShareGPT set (conversations: a list of structs) and a .jsonl.zst read
    as its JSONL: the same rows."""
    pa, pq, zstd = (pytest.importorskip(m) for m in ("pyarrow", "pyarrow.parquet", "zstandard"))
    tok = data.load_tokenizer(None)
    records = [published(c["messages"], "ShareGPT") for c in conversations()]
    jsonl = write_records(tmp_path / "sharegpt.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "sharegpt.parquet", row_group_size=5)
    zst = tmp_path / "sharegpt.jsonl.zst"
    zst.write_bytes(zstd.ZstdCompressor().compress((tmp_path / "sharegpt.jsonl").read_bytes()))

    def rows(path):
        ds = sft.ChatDataset([(str(path), 1.0)], tok, max_len=256, log=None)
        return [ds[i][key].tolist() for i in range(len(ds)) for key in data.BATCH_KEYS]
    assert rows(tmp_path / "sharegpt.parquet") == rows(jsonl) == rows(zst)
    # Parquet writes a field a row lacks as None: an Alpaca set where only some rows have an input
    alpaca = [published(c, "Alpaca") for c in plain_conversations()]
    for record in alpaca[::2]:
        del record["input"]
    schema = pa.schema([(field, pa.string()) for field in ("instruction", "input", "output")])
    pq.write_table(pa.Table.from_pylist(alpaca, schema=schema), tmp_path / "alpaca.parquet")
    assert rows(tmp_path / "alpaca.parquet") == rows(write_records(tmp_path / "alpaca.jsonl", alpaca))
