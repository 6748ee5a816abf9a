"""eval.py: the generators put every answer where they say, at the asked token length, reproducibly;
the scorers agree with hand-made cases; the CLI runs end to end on a tiny random model."""
import csv
import json
import math
import os
import shutil

import pytest
import torch

import data
import sft
import ruler
import eval as E
import model as M
import rope


@pytest.fixture(scope="module")
def tok():
    return data.builtin_tokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def haystack(tok, cache):
    return data.build_token_file(None, tok, cache, log=None)


@pytest.fixture(scope="module")
def tiny_dir(tok, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    m = M.Llama(M.preset("tiny"))  # window 512
    m.init_weights(seed=0)
    m.save_pretrained(path, tokenizer=tok)
    return path


def total_length(sample):
    return len(sample["tokens"]) + sample["max_new_tokens"]


# ----------------------------------------------------------------------------------------------
# generators

@pytest.mark.parametrize("length", [256, 1000, 3000, 8192])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_niah_needle_at_stated_depth_and_length(tok, haystack, length, depth):
    s = E.make_sample("niah", tok, length, 7, depth=depth, haystack=haystack)
    assert abs(total_length(s) - length) <= 0.01 * length
    a, b = s["needle_span"]
    assert s["answers"][0] in tok.decode(s["tokens"][a:b])
    assert s["answers"][0] not in tok.decode(s["tokens"][:a] + s["tokens"][b:])  # only the needle has it
    c0, c1 = s["context_span"]
    n_haystack = (c1 - c0) - (b - a)
    actual = (a - c0) / n_haystack
    assert actual == pytest.approx(s["needle_depth"])
    assert abs(actual - depth) <= max(0.005, 8 / n_haystack) + 1 / n_haystack
    # spliced on a word boundary, without special tokens
    assert all(t < 256 for t in s["tokens"][c0:c1])


def user_message(tok, sample):
    """The user's message inside a chat-framed prompt, as text."""
    text = tok.decode(sample["tokens"])
    return text.split("<|start_header_id|>user<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]


def test_chat_prompt_is_format_chat_token_for_token(tok, haystack):
    s = E.make_sample("niah", tok, 1024, 1, depth=0.5, haystack=haystack)
    answer_prefix = tok.encode(E.NIAH[3])
    content = user_message(tok, s)
    assert content.startswith(E.NIAH[0])
    expected, _ = data.format_chat(tok, [{"role": "user", "content": content}], add_generation_prompt=True)
    assert s["tokens"] == expected + answer_prefix
    assert s["tokens"][0] == tok.bos_id


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A real merging BPE tokenizer (trained here, vocab 1000, Llama 3 specials and chat template) and a
    haystack of a few standard-library files: lengths must be exact where tokens are not bytes."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    texts = [open(f, encoding="utf-8").read() for f in data.builtin_corpus_files()[:40]]
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=data.LLAMA3_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root = tmp_path_factory.mktemp("bpe")
    backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": data.LLAMA31_CHAT_TEMPLATE}))
    tok = data.load_tokenizer(str(root))
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts):
        (corpus / f"{i}.txt").write_text(text)
    return tok, data.build_token_file([str(corpus)], tok, str(root / "cache"), log=None)


def test_merging_tokenizer_exact_lengths_and_chat_frame(bpe):
    tok, haystack = bpe
    assert len(tok.encode("The magic number is")) < len("The magic number is")  # it does merge
    for length, depth in [(512, 0.0), (2000, 0.4), (2000, 1.0), (6000, 0.9)]:
        s = E.make_sample("niah", tok, length, 1, depth=depth, haystack=haystack)
        assert total_length(s) == length
        expected, _ = data.format_chat(tok, [{"role": "user", "content": user_message(tok, s)}],
                                       add_generation_prompt=True)
        assert s["tokens"] == expected + tok.encode(E.NIAH[3])  # format_chat's frame, token for token
        a, b = s["needle_span"]
        assert s["answers"][0] in tok.decode(s["tokens"][a:b])
        assert abs(s["needle_depth"] - depth) <= max(0.005, 8 / length) + 1 / length


def test_plain_prompt_without_chat(tok, haystack):
    s = E.make_sample("niah", tok, 512, 1, depth=0.5, haystack=haystack, chat=False)
    assert s["tokens"][0] == tok.bos_id and tok.token_id("<|start_header_id|>") not in s["tokens"]
    assert total_length(s) == 512


def test_same_seed_same_sample(tok, haystack):
    for make in (lambda seed: E.make_sample("niah", tok, 2048, seed, depth=0.3, haystack=haystack),
                 lambda seed: E.make_sample("passkey", tok, 2048, seed, depth=0.3)):
        first, again, other = make(3), make(3), make(4)
        assert first == again
        assert first["tokens"] != other["tokens"]


def test_seeds_derive_from_everything_that_names_a_sample():
    assert E.derive_seed(0, "niah", 1024, 0.5, 0) == E.derive_seed(0, "niah", 1024, 0.5, 0)
    assert len({E.derive_seed(0, "niah", 1024, d, 0) for d in (0.0, 0.5, 1.0)}) == 3


def test_passkey(tok):
    for depth in (0.0, 0.5, 1.0):
        s = E.make_sample("passkey", tok, 1500, 2, depth=depth)
        assert total_length(s) == 1500
        a, b = s["needle_span"]
        assert f"The pass key is {s['answers'][0]}." in tok.decode(s["tokens"][a:b])
        assert abs(s["needle_depth"] - depth) <= 0.01


def test_needle_that_does_not_fit_says_so(tok, haystack):
    with pytest.raises(rope.UserError, match=r"niah: at length 100 .* the needle needs \d+; ask for a longer length"):
        E.make_sample("niah", tok, 100, 0, depth=0.5, haystack=haystack)
    with pytest.raises(rope.UserError, match="passkey: at length 150"):
        E.make_sample("passkey", tok, 150, 0, depth=0.5)


# ----------------------------------------------------------------------------------------------
# scoring

def test_exact_match_and_f1_by_hand():
    assert E.exact_match("  The Cat!", ["cat"]) == 1.0  # case, punctuation, articles
    assert E.exact_match(" 1234567.", ["1234567"]) == 1.0
    assert E.exact_match("1234567 is it", ["1234567"]) == 0.0
    assert E.exact_match("dog", ["cat", "Dog"]) == 1.0
    # "the cat sat" vs "cat sat on mat": 2 common, precision 2/2, recall 2/4 -> F1 2/3
    assert E.token_f1("the cat sat", ["cat sat on mat"]) == pytest.approx(2 / 3)
    assert E.token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clip
    assert E.token_f1("nothing", ["cat"]) == 0.0
    assert E.token_f1("cat sat", ["dog", "cat sat"]) == 1.0  # best reference


def test_string_match_by_hand():
    refs = ["ABC", "xyz", "def"]
    assert E.string_match("abc and DEF", refs) == pytest.approx(2 / 3)
    assert E.string_match("nothing", refs) == 0.0
    assert E.string_match("123456", ["12345"]) == 1.0  # RULER matches substrings


# ----------------------------------------------------------------------------------------------
# bad input

def test_malformed_jsonl_is_named(tmp_path):
    cases = {
        '{"context": "c", "input": "q", "answers": ["a"]}\n{"context": "c"\n': "line 2: malformed JSON",  # data.read_jsonl
        '{"input": "q", "answers": ["a"]}\n': "line 1 has no 'context' string",
        '{"prompt": 3, "answers": ["a"]}\n': "line 1 has a 'prompt' that is not a string",
        '\n{"context": "c", "answers": []}\n': "line 2 has no 'answers'",
        '[1, 2]\n': "line 1: the record is not a JSON object",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(text)
        with pytest.raises(rope.UserError, match=f"bad.jsonl {message}"):
            E.read_records(str(path))


def test_jsonl_accepts_infinitebench_answer_and_cuts_in_the_middle(tok, tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"context": "head " + "x" * 5000 + " tail", "input": "q?", "answer": "a"}) + "\n")
    record, = E.read_records(str(path))
    assert record["answers"] == ["a"]
    s = E.make_jsonl_sample(tok, record, 1024)
    assert s["truncated"] and total_length(s) == 1024
    text = tok.decode(s["tokens"])
    assert "head " in text and " tail" in text


def test_jsonl_raw_prompt_is_sent_as_sft_trains_it(tok, tmp_path):
    """A raw 'prompt' record gives exactly the tokens sft.py's prompt/completion record puts before
    its completion: <|begin_of_text|> + the prompt, no template; cut in the middle when too long."""
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps({"prompt": "abc The letter is", "answers": ["Z"]}) + "\n"
                    + json.dumps({"prompt": "head " + "x" * 3000 + " tail", "answers": "Z"}) + "\n")
    short, long = E.read_records(str(path))
    s = E.make_jsonl_sample(tok, short, 1024, chat=False, max_new_tokens=4)
    plain = sft.ChatDataset([([{"prompt": "abc The letter is", "completion": " Z"}], 1.0)], tok, 64, log=None)
    row = plain[0]
    assert s["tokens"] == row["tokens"][:len(s["tokens"])].tolist() == [tok.bos_id] + tok.encode("abc The letter is")
    assert not s["truncated"] and s["length"] == len(s["tokens"]) + 4
    cut = E.make_jsonl_sample(tok, long, 1024, chat=False, max_new_tokens=4)
    assert cut["truncated"] and cut["length"] == 1024 and tok.decode(cut["tokens"][1:6]) == "head "
    framed = E.make_jsonl_sample(tok, short, 1024, chat=True, max_new_tokens=4)
    expected, _ = data.format_chat(tok, [{"role": "user", "content": "abc The letter is"}], add_generation_prompt=True)
    assert framed["tokens"] == expected


def test_lengths_beyond_the_window_warn(capsys):
    args = E.build_parser().parse_args(["niah", "--lengths", "512,1K"])
    E.fill_defaults(args, 512)
    assert "beyond the model's window of 512" in capsys.readouterr().err
    assert args.lengths == [512, 1024]


def test_parse_size():  # the one size parser, which --lengths and --max-len use
    assert [rope.parse_size(x) for x in ("4096", "4K", "1M", "1.5K")] == [4096, 4096, 1 << 20, 1536]
    with pytest.raises(rope.UserError, match="cannot read size"):
        rope.parse_size("4 tokens")


def test_niah_and_ppl_end_to_end(tiny_dir, cache, tmp_path):
    out = str(tmp_path / "niah")
    argv = ["--model", tiny_dir, "--out", out, "--cache", cache]
    # a short budget keeps the random model's decoding quick; the default budget is tested above
    assert E.main(["niah", *argv, "--lengths", "256,512", "--depths", "0,0.5,1", "--max-new-tokens", "6"]) == 0
    result = json.load(open(os.path.join(out, "results.json")))
    assert result["task"] == "niah" and result["model"] == tiny_dir and len(result["items"]) == 6
    assert {(it["length"], it["depth"]) for it in result["items"]} == {(n, d) for n in (256, 512) for d in (0, 0.5, 1)}
    assert all(it["prompt_tokens"] + 6 == it["length"] and it["max_new_tokens"] == 6 for it in result["items"])
    assert set(result["items"][0]["scores"]) == {"exact_match", "string_match"}
    assert len(result["aggregate"]["grid"]["scores"]) == 3
    items, aggregate = result["items"], result["aggregate"]  # the aggregate is the items' mean (issue 19)
    assert aggregate["score"] == pytest.approx(mean_of(it["scores"]["exact_match"] for it in items), rel=1e-12)
    assert aggregate == E.grid_aggregate(items, [256, 512], [0, 0.5, 1], "exact_match")
    assert os.path.getsize(os.path.join(out, "niah_heatmap.png")) > 0

    os.remove(os.path.join(out, "niah_heatmap.png"))  # `plot` redraws it from results.json
    assert E.main(["plot", out]) == 0 and os.path.exists(os.path.join(out, "niah_heatmap.png"))

    out = str(tmp_path / "ppl")
    assert E.main(["ppl", "--model", tiny_dir, "--out", out, "--cache", cache, "--lengths", "512", "--docs", "2"]) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "ppl_by_position.csv"))))
    # buckets of length / 16 = 32 tokens: bucket 0 holds targets 1..31 (31 tokens), the others 32
    assert [(int(r["bucket_start"]), int(r["bucket_end"])) for r in rows] == [(32 * b, 32 * b + 32) for b in range(16)]
    assert sum(int(r["tokens"]) for r in rows) == 2 * 511
    assert all(200 < float(r["ppl"]) < 1000 for r in rows)  # random weights: about the vocabulary size
    assert os.path.getsize(os.path.join(out, "ppl_by_position.png")) > 0
    result = json.load(open(os.path.join(out, "results.json")))
    assert len(result["items"]) == 2
    check_ppl_is_token_weighted(result)


def check_ppl_is_token_weighted(result):
    """Issue 19: the headline loss and every bucket's loss equal a token-weighted recomputation from
    the per-item records of results.json (each target token counts once), not a mean of means."""
    items, aggregate, buckets = result["items"], result["aggregate"], result["aggregate"]["buckets"]
    targets = [it["tokens"] - 1 for it in items]
    by_items = sum(it["loss"] * n for it, n in zip(items, targets)) / sum(targets)
    assert aggregate["loss"] == pytest.approx(by_items, rel=1e-9, abs=0)
    assert aggregate["ppl"] == pytest.approx(math.exp(by_items), rel=1e-9, abs=0)
    for b, bucket in enumerate(buckets):
        n = [it["bucket_tokens"][b] for it in items]
        assert bucket["tokens"] == sum(n)
        recomputed = sum(it["bucket_loss"][b] * k for it, k in zip(items, n)) / sum(n)
        assert bucket["loss"] == pytest.approx(recomputed, rel=1e-9, abs=0)
    by_buckets = sum(b["loss"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets)
    assert aggregate["loss"] == pytest.approx(by_buckets, rel=1e-9, abs=0)
    assert len({b["tokens"] for b in buckets}) > 1  # the weights differ, so a mean of bucket means would not pass
    assert mean_of(b["loss"] for b in buckets) != pytest.approx(by_buckets, rel=1e-9, abs=0)


def mean_of(values):
    values = list(values)
    return sum(values) / len(values)


def test_niah_averages_weight_items_as_documented():
    """Issue 19: niah's score, by length and by cell, is the mean over items (each item once).
    Checked where the weights differ: cells with different numbers of items."""
    items = [{"length": 256, "depth": 0.0, "task": "niah_single", "scores": {"exact_match": 1.0, "string_match_all": 1.0}},
             {"length": 256, "depth": 0.0, "task": "niah_single", "scores": {"exact_match": 1.0, "string_match_all": 0.5}},
             {"length": 256, "depth": 0.0, "task": "niah_single", "scores": {"exact_match": 1.0, "string_match_all": 1.0}},
             {"length": 256, "depth": 1.0, "task": "vt", "scores": {"exact_match": 0.0, "string_match_all": 0.0}},
             {"length": 512, "depth": 1.0, "task": "vt", "scores": {"exact_match": 0.0, "string_match_all": 0.2}}]
    grid = E.grid_aggregate(items, [256, 512], [0.0, 1.0], "exact_match")
    assert grid["score"] == pytest.approx(3 / 5)  # item-weighted: not (1 + 0 + 0) / 3 cells
    assert grid["by_length"] == {"256": pytest.approx(3 / 4), "512": pytest.approx(0.0)}
    assert grid["grid"]["scores"][0][0] == 1.0 and grid["grid"]["scores"][1] == [0.0, 0.0]


def test_passkey_jsonl_end_to_end(tiny_dir, cache, tmp_path):
    argv = ["--model", tiny_dir, "--cache", cache, "--max-new-tokens", "4"]
    out = str(tmp_path / "passkey")
    assert E.main(["passkey", *argv, "--out", out, "--lengths", "512", "--depths", "0.5"]) == 0
    assert json.load(open(os.path.join(out, "results.json")))["aggregate"]["metric"] == "string_match"

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"context": f"doc {i} " * 50, "input": "which doc?", "answers": [f"doc {i}"]})
                            + "\n" for i in range(2)))
    out = str(tmp_path / "jsonl")
    assert E.main(["jsonl", str(path), *argv, "--out", out]) == 0
    aggregate = json.load(open(os.path.join(out, "results.json")))["aggregate"]
    assert aggregate["records"] == 2 and 0 <= aggregate["f1"] <= 1


def test_cli_refuses_bad_jsonl_in_one_sentence(tiny_dir, cache, tmp_path, capsys):
    argv = ["--model", tiny_dir, "--cache", cache, "--out", str(tmp_path / "x")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "input": "q"}\n')
    assert E.main(["jsonl", str(bad), *argv]) == 2
    assert "bad.jsonl line 1 has no 'answers'" in capsys.readouterr().err


def test_missing_matplotlib_still_writes_the_data(tiny_dir, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(E, "pyplot", lambda: None)
    out = str(tmp_path / "niah")
    assert E.main(["niah", "--model", tiny_dir, "--out", out, "--cache", cache, "--lengths", "256",
                   "--depths", "0.5", "--max-new-tokens", "2"]) == 0
    assert os.path.exists(os.path.join(out, "results.json"))
    assert not os.path.exists(os.path.join(out, "niah_heatmap.png"))
    assert f"python eval.py plot {out}" in capsys.readouterr().out


def write_squad(path):
    paragraphs = [{"context": f"The river Zyx{i} runs north of town {i}.", "qas": [
        {"question": f"Where does the river Zyx{i} run?", "is_impossible": False, "answers": [{"text": f"town {i}"}]}]}
        for i in range(30)]
    path.write_text(json.dumps({"data": [{"title": "A", "paragraphs": paragraphs}]}))
    return str(path)


def test_ruler_end_to_end_names_skipped_tasks_and_averages_the_rest(tiny_dir, cache, tmp_path, capsys):
    out, squad = str(tmp_path / "ruler"), write_squad(tmp_path / "squad.json")
    tasks = "niah_single_1,niah_single_2,vt,qa_1"
    assert E.main(["ruler", "--model", tiny_dir, "--cache", cache, "--lengths", "2K", "--tasks", tasks,
                   "--squad", squad, "--out", out, "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "skipped niah_single_2: it needs essays for its haystack (--haystack" in printed
    result = json.load(open(os.path.join(out, "results.json")))
    items, row = result["items"], result["aggregate"]["table"]["2K"]
    assert row["tasks"] == 3 and "niah_single_2" not in row and len(items) == 6
    assert {it["max_new_tokens"] for it in items} == {128, 30, 32}  # RULER's fixed budgets
    for it in items:  # RULER's metric recomputed from what the item holds
        assert it["scores"]["ruler"] == ruler.item_score(it["task"], it["prediction"], it["answers"])
        assert it["prompt_tokens"] + it["max_new_tokens"] <= 2048
    for task in ("niah_single_1", "vt", "qa_1"):
        assert row[task] == ruler.task_score(task, *zip(*[(it["prediction"], it["answers"]) for it in items
                                                           if it["task"] == task]))
    assert row["average"] == round(sum(row[t] for t in ("niah_single_1", "vt", "qa_1")) / 3, 2)
    assert "| 2K |" in printed and "(3 of 4 tasks)" in printed and os.path.isfile(os.path.join(out, "ruler.md"))


def test_ruler_average_counts_each_task_once():
    items = [{"length": 4096, "task": "vt", "scores": {"ruler": s}} for s in (1, 1, 1, 0)] + \
            [{"length": 4096, "task": "cwe", "scores": {"ruler": 0.5}}]
    row = E.ruler_table(items, [4096], ["vt", "cwe", "fwe"], {"fwe": "why"})["table"]["4K"]
    assert row == {"vt": 75.0, "cwe": 50.0, "average": 62.5, "tasks": 2}  # not the item mean, 70


def test_ruler_prepare_only_writes_rulers_layout_without_weights(tiny_dir, cache, tmp_path):
    out, squad = tmp_path / "prepared", write_squad(tmp_path / "squad.json")
    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "a.txt").write_text("The clocks were striking thirteen. Winston slipped through the doors. " * 300)
    argv = ["ruler", "--model", tiny_dir, "--prepare-only", "--haystack", str(essays), "--squad", squad,
            "--samples", "2", "--out"]
    assert E.main([*argv, str(out), "--lengths", "8K"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(t for t in ruler.TASKS if t != "qa_2")  # no HotpotQA file: named, not faked
    for task in written:
        records = [json.loads(line) for line in (out / task / "validation.jsonl").read_text().splitlines()]
        meta = json.loads((out / task / "meta.json").read_text())
        assert [r["index"] for r in records] == [0, 1] and meta["tokens_to_generate"] == ruler.budget(task)
        assert all({"index", "input", "outputs", "length", "answer_prefix"} <= set(r) for r in records)
        assert all(r["length"] <= 8192 and r["input"].startswith("<|begin_of_text|>") for r in records)
    assert E.main([*argv, str(tmp_path / "two"), "--lengths", "4K,8K", "--tasks", "vt"]) == 0
    assert (tmp_path / "two" / "4K" / "vt" / "validation.jsonl").is_file()
    assert (tmp_path / "two" / "8K" / "vt" / "validation.jsonl").is_file()


def test_ruler_refuses_unknown_tasks(tiny_dir, tmp_path, capsys):
    assert E.main(["ruler", "--model", tiny_dir, "--prepare-only", "--tasks", "niah_single_1,nope",
                   "--out", str(tmp_path)]) == 2
    assert "--tasks: unknown {'nope'}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# an evaluation never loses finished work (issue 18)

class Crash(Exception):
    pass


def count_calls(monkeypatch, owner, name, crash_after=None):
    """Wraps owner.name to count its calls; with crash_after, the call after that many raises Crash."""
    calls, real = [], getattr(owner, name)
    def counted(*args, **kwargs):
        if len(calls) == crash_after:
            raise Crash
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return calls


def crash_and_resume(monkeypatch, tmp_path, argv, work, k, built=None):
    """Runs argv whole; then into another --out crashing at the (k+1)-th call of `work` (owner, name), leaving a
    half-written line, and again. The results must be the whole run's, the rerun doing no finished item's work
    again. Returns (the whole run's results, the rerun's calls of work, of `built`)."""
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    with monkeypatch.context() as m:
        total = count_calls(m, *work)
        assert E.main([*argv, "--out", whole]) == 0
    with monkeypatch.context() as m:
        count_calls(m, *work, crash_after=k)
        with pytest.raises(Crash):
            E.main([*argv, "--out", part])
    log = os.path.join(part, "items.jsonl")
    assert len(open(log).readlines()) == 1 + k  # the settings, then each item as it finished
    with open(log, "a") as f:
        f.write('{"key": "niah 256 depth 1.0 #0", "predic')  # killed mid-write
    with monkeypatch.context() as m:
        again, builds = count_calls(m, *work), built and count_calls(m, *built)
        assert E.main([*argv, "--out", part]) == 0
    assert len(again) == len(total) - k
    first, resumed = (json.load(open(os.path.join(out, "results.json"))) for out in (whole, part))
    assert resumed["items"] == first["items"] and resumed["aggregate"] == first["aggregate"]
    lines = [json.loads(line) for line in open(log).read().splitlines()]  # the fragment is gone
    assert len(lines) == 1 + len(total) and [it["key"] for it in lines[1:]] == [it["key"] for it in first["items"]]
    return first, again, builds


def test_niah_resumes_where_it_crashed(tiny_dir, cache, tmp_path, monkeypatch, capsys):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    argv = ["niah", "--model", str(model), "--cache", cache, "--lengths", "256,512", "--depths", "0,1",
            "--max-new-tokens", "2"]
    first, again, built = crash_and_resume(monkeypatch, tmp_path, argv, (E, "answer"), 3, (E, "make_sample"))
    assert len(first["items"]) == 4 and len(built) == 1  # the 3 finished samples are not even built
    assert os.path.getsize(tmp_path / "part" / "niah_heatmap.png") > 0
    # the same --out with other settings: refused before the model loads, the log untouched
    log = (tmp_path / "part" / "items.jsonl").read_text()
    capsys.readouterr()
    assert E.main([*argv, "--out", str(tmp_path / "part"), "--seed", "1", "--no-chat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'part' / 'items.jsonl'} holds another command's items "
                          f"(seed 0 then, 1 now; chat True then, False now); pass another --out or delete it")
    assert err.count("\n") == 1 and (tmp_path / "part" / "items.jsonl").read_text() == log
    weights = model / "model.safetensors"  # retrained in place: the same command, other weights
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert E.main([*argv, "--out", str(tmp_path / "part")]) == 2
    assert "items.jsonl holds another command's items (weights {'model.safetensors': " in capsys.readouterr().err


def test_jsonl_resumes_where_it_crashed(tiny_dir, cache, tmp_path, monkeypatch):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"context": f"doc {i} " * 20, "input": "which doc?", "answers": [f"doc {i}"],
                                        "id": "same"}) + "\n" for i in range(3)))  # ids need not be unique
    monkeypatch.setattr(M.Llama, "generate", lambda self, prompt, n, stop_ids=(): prompt[1:2])  # quick answers
    first, _, _ = crash_and_resume(monkeypatch, tmp_path, ["jsonl", str(path), "--model", tiny_dir, "--cache", cache,
                                                           "--max-new-tokens", "2"], (E, "answer"), 1)
    assert first["aggregate"]["records"] == 3


def test_ruler_resumes_and_builds_no_finished_task(tiny_dir, cache, tmp_path, monkeypatch):
    argv = ["ruler", "--model", tiny_dir, "--cache", cache, "--lengths", "2K", "--tasks", "vt,niah_single_1",
            "--samples", "2"]
    # the tiny model's answers are not the point and take seconds each at 2K: the first prompt token instead
    monkeypatch.setattr(M.Llama, "generate", lambda self, prompt, n, stop_ids=(): prompt[1:2])
    # crashed in niah_single_1's second item: vt's records are not built again (RULER's length search is slow)
    first, again, fits = crash_and_resume(monkeypatch, tmp_path, argv, (E, "answer"), 3, (ruler, "fit"))
    assert len(first["items"]) == 4 and len(fits) == 1
    assert [it["task"] for it in first["items"]] == ["vt", "vt", "niah_single_1", "niah_single_1"]


def test_ppl_resumes_where_it_crashed(tiny_dir, cache, tmp_path, monkeypatch):
    argv = ["ppl", "--model", tiny_dir, "--cache", cache, "--lengths", "256", "--docs", "3"]
    first, again, _ = crash_and_resume(monkeypatch, tmp_path, argv, (M.Llama, "forward"), 2)
    assert len(first["items"]) == 3 and len(again) == 1
    check_ppl_is_token_weighted(first)


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # under a regular file: not even root can create it
    for argv in (["niah"], ["ruler", "--prepare-only"]):  # the model does not exist: it is never read
        assert E.main([*argv, "--model", str(tmp_path / "never-loaded"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"error: --out {out} is not a writable folder (Not a directory)\n"


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("hidden_size"), "config.json lacks 'hidden_size', which a Llama config needs"),
    (lambda c: c.update(rope_scaling={"rope_type": "longrope", "factor": 4.0}),
     "unsupported rope type 'longrope' in {path}/config.json; supported: default, llama3 and yarn")])
def test_bad_config_is_one_sentence_naming_the_file(tiny_dir, tmp_path, change, words, capsys):
    path = tmp_path / "model"
    M.Llama.from_pretrained(tiny_dir).save_pretrained(str(path), tokenizer=data.builtin_tokenizer())
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    for argv in (["passkey"], ["ruler", "--prepare-only"]):
        assert E.main([*argv, "--model", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}/config.json") or f"in {path}/config.json" in err
        assert words.format(path=path) in err and err.count("\n") == 1
