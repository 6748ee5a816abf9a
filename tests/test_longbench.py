"""longbench.py: InfiniteBench's and LV-Eval's prompts, cuts, budgets and scorers against the benchmarks' own
strings and rules (quoted here as facts from OpenBMB/InfiniteBench and infinigence/LVEval); ROUGE against the
packages the benchmarks call; eval.py's infinitebench / lveval / ruler --data end to end on a tiny model."""
import json
import os
import random
import re
import shutil

import pytest

import data
import eval as E
import longbench as L
import rope
import ruler
from test_eval import Crash, count_calls, tiny_dir, tok  # noqa: F401 (fixtures)

BOOK = "The grass is green. The sky is blue. " * 40

# ----------------------------------------------------------------------------------------------
# prompts, as create_prompt and DATASET_PROMPT fill them

def test_infinitebench_templates_filled_as_create_prompt_fills_them():
    r = dict(context="CTX", input="INPUT", options=["o1", "o2", "o3", "o4"], answer=["o3"])
    assert L.ib_prompt("passkey", r) == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
        "about the important information.\n\nCTX\n\nINPUT\n\nThe pass key is")
    assert L.ib_prompt("number_string", r).endswith("about the important information there.\n\nCTX\n\nINPUT\n\n"
                                                    "The sequence of digits is")
    assert L.ib_prompt("kv_retrieval", r) == ("Extract the value corresponding to the specified key in the JSON object "
                                              "below.\n\nCTX\n\nINPUT")
    assert L.ib_prompt("longbook_sum_eng", r) == "Summarize the book below.\n\nCTX\n\nSummary:"
    assert L.ib_prompt("longbook_choice_eng", r) == ("Read the book and answer the question.\n\nCTX\n\nQuestion: INPUT\n"
                                                     "A. o1\nB. o2\nC. o3\nD. o4\n\nThe letter of the correct answer is")
    assert L.ib_prompt("longbook_qa_eng", r) == ("Read the book and answer the question. Be very concise in your "
                                                 "answer.\n\nCTX\n\nQuestion: INPUT\nAnswer:")
    assert L.ib_prompt("longbook_qa_chn", r) == "阅读以下书籍然后回答问题。\n\nCTX\n\n问题：INPUT\n答案："
    assert L.ib_prompt("longdialogue_qa_eng", r) == (
        "Below is a dialogue script where one random occurrence of a character name is replaced with \"$$MASK$$\", "
        "and you should try to guess who that character is.\n\nCTX\n\nThe name that has been replaced with $$MASK$$ "
        "is likely")
    assert L.ib_prompt("math_calc", r) == (
        "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\n"
        "Expression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: CTX\nValues:")
    assert L.ib_prompt("code_debug", r) == (
        "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it "
        "crash.\n\nCTX\n\nOptions:\nA. o1\nB. o2\nC. o3\nD. o4\n\nThe correct option is:")
    # code_run: the call found in the input; math_find: "What is <the target> in the following list?"
    run = dict(r, input="Please give me the exact number of the return value of func_6351(-2). Be concise.")
    assert L.ib_prompt("code_run", run) == ("There is a function called func_6351 in the following Python code.\n\n"
                                            "CTX\n\nPlease compute the exact value of func_6351(-2). The value of "
                                            "func_6351(-2) is")
    find = dict(r, input="What is the largest number in the list? The largest number of the list is: ")
    assert L.ib_prompt("math_find", find) == ("What is the largest number in the following list?\n\nCTX\n\n"
                                              + find["input"])
    # get_answer: the choice tasks' label is [the option, its letter]
    assert L.ib_answer("longbook_choice_eng", r) == ["o3", "C"]
    assert L.ib_answer("code_debug", dict(r, answer="o1")) == ["o1", "A"]
    assert L.ib_answer("code_debug", dict(r, answer=["name", "B"])) == ["name", "B"]
    assert L.ib_answer("passkey", dict(r, answer=["123"])) == ["123"]


def test_infinitebench_budgets_are_its_own():  # DATA_NAME_TO_MAX_NEW_TOKENS
    assert L.IB_BUDGET == {"passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_sum_eng": 1200,
                           "longbook_choice_eng": 40, "longbook_qa_eng": 40, "longbook_qa_chn": 40,
                           "longdialogue_qa_eng": 40, "math_find": 3, "math_calc": 30000, "code_run": 5, "code_debug": 5}


def test_lveval_prompts_budgets_and_metrics_are_its_own():
    r = dict(context="CTX", input="Q", answers=["a"])
    assert L.LV_PROMPT["hotpotwikiqa_mixup"].format(**r) == (
        "Answer the question based on the given passages. Questions and answers are only relevant to some passages. "
        "Only give me the answer and do not output any other explanation and evidence.\n\nArticle: CTX\n\nPlease "
        "answer the following question based on the above passages. Questions and answers are only relevant to some "
        "passages. Only give me the answer and do not output any other explanation and evidence.\n\nQuestion: Q\n"
        "Answer:")
    one = ("Please answer the following question based on the given passages. Questions and answers are only relevant "
           "to one passage. Only give me the answer and do not output any other explanation and evidence.\n\nArticle: "
           "CTX\n\nPlease answer the following question based on the above passages. Questions and answers are only "
           "relevant to one passage. Only give me the answer and do not output any other explanation and evidence."
           "\n\nQuestion: Q\nAnswer:")
    for d in ("loogle_SD_mixup", "loogle_CR_mixup", "loogle_MIR_mixup", "multifieldqa_en_mixup"):
        assert L.LV_PROMPT[d].format(**r) == one
    assert L.LV_PROMPT["factrecall_en"].format(**r) == (
        "Please answer the following questions based on the given article.\n\nArticle: CTX\n\nPlease answer the "
        "following questions based on the above article.\n\nQuestion: Q\nAnswer:")
    assert L.LV_PROMPT["factrecall_zh"].format(**r) == ("请基于给定的文章回答下述问题。\n\n文章：CTX\n\n现在请基于上述文章回答下面的问题。"
                                                        "\n\n问题：Q\n回答：")
    assert L.LV_PROMPT["lic_mixup"].format(**r) == ("请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：CTX\n\n"
                                                    "请现在基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n问题：Q\n回答：")
    for d in ("cmrc_mixup", "dureader_mixup"):
        assert L.LV_PROMPT[d].format(**r) == ("请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：CTX\n\n"
                                              "现在请基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n问题：Q\n回答：")
    assert L.LV_PROMPT["multifieldqa_zh_mixup"].format(**r) == (
        "请阅读以下文章并用中文回答问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，不要输出其他任何解释和证据。\n\n文章：CTX\n\n"
        "请基于上面的文章回答下面的问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，不要输出其他任何解释和证据。\n\n问题：Q\n回答：")
    assert L.LV_BUDGET == dict({d: 64 for d in L.LV_DATASETS}, factrecall_en=16, factrecall_zh=16)
    assert L.LV_METRIC == dict({d: "qa_f1_score_with_gold_ans" for d in L.LV_DATASETS[:5]},
                               multifieldqa_zh_mixup="qa_f1_zh_score_with_gold_ans", factrecall_en="qa_f1_score",
                               factrecall_zh="qa_f1_zh_score", cmrc_mixup="qa_f1_zh_score_with_gold_ans",
                               lic_mixup="qa_f1_zh_score_with_gold_ans", dureader_mixup="rouge_zh_score_blacklist")
    assert len(L.ABANDON_EN) == 38 and {"and", "does", "which"} <= L.ABANDON_EN
    assert len(L.ABANDON_ZH) == 85 and {"的", "亿元", "度"} <= L.ABANDON_ZH
    assert L.lv_name("cmrc_mixup_16k") == ("cmrc_mixup", "16k") and L.lv_name("loogle_SD_mixup_256k")[0] == "loogle_SD_mixup"

# ----------------------------------------------------------------------------------------------
# cutting in the middle

@pytest.mark.parametrize("max_len", [101, 100])
def test_cut_middle_keeps_each_benchmarks_ends(tok, max_len):
    text = " ".join(f"w{i}" for i in range(400))
    ids = [tok.bos_id] + tok.encode(text)  # as a Hugging Face tokenizer counts: <|begin_of_text|> included
    half = max_len // 2  # truncate_input: input[:max_len // 2] + input[-(max_len // 2):]; int(max_len / 2) the same
    ib, cut = L.cut_middle(tok, text, max_len, "infinitebench")
    assert cut and ib == tok.decode(ids[1:half] + ids[-half:])  # the <|begin_of_text|> skipped as a special token
    lv, _ = L.cut_middle(tok, text, max_len, "lveval")
    assert lv == tok.decode(ids[1:half]) + tok.decode(ids[-half:])  # each end decoded on its own
    assert ib.startswith("w0 w1") and ib.endswith("w398 w399") and len(tok.encode(ib)) <= 2 * half - 1
    zh = "北京是中国的首都。" * 40  # a cut inside a character: decoded together its bytes meet, decoded apart they do not
    ids = [tok.bos_id] + tok.encode(zh)
    assert L.cut_middle(tok, zh, max_len, "infinitebench")[0] == tok.decode(ids[1:half] + ids[-half:]) \
        != L.cut_middle(tok, zh, max_len, "lveval")[0] == tok.decode(ids[1:half]) + tok.decode(ids[-half:])
    short = " ".join(f"w{i}" for i in range(10))
    assert L.cut_middle(tok, short, len(tok.encode(short)) + 1, "lveval") == (short, False)  # fits with the bos
    assert L.cut_middle(tok, short, len(tok.encode(short)), "lveval")[1]


def test_default_max_len_reserves_the_budget_and_frame(tok):
    it = dict(task="passkey", line=1, id=0, text=L.ib_prompt("passkey", dict(context=BOOK * 3, input="What?")),
              answers=["1"], budget=6)
    frame = len(L.prompt_tokens(tok, "", "", True)[0])
    s = L.bench_sample(tok, it, "infinitebench", None, 512, True)
    assert s["truncated"] and s["length"] <= 512 + 2 and s["max_new_tokens"] == 6  # re-tokenising the join: +-2
    text, _ = L.cut_middle(tok, it["text"], 512 - 6 - frame, "infinitebench")
    assert s["tokens"] == L.prompt_tokens(tok, text, "", True)[0]
    lv = L.bench_sample(tok, dict(it, budget=64), "lveval", None, 1024, False)  # LV-Eval: the window less 500
    assert lv["tokens"] == L.prompt_tokens(tok, L.cut_middle(tok, it["text"], 524, "lveval")[0], "", False)[0]
    with pytest.raises(rope.UserError, match="passkey: the window of 8 tokens leaves no room"):
        L.bench_sample(tok, it, "infinitebench", None, 8, True)

# ----------------------------------------------------------------------------------------------
# InfiniteBench's scorers, rule by rule

def ib(task, prediction, label):
    return L.score("infinitebench", task, prediction, label)


def test_infinitebench_retrieval_and_code_scorers():
    assert ib("passkey", "The pass key is 71432. Remember", ["71432"]) == 1  # first_int_match: the first digits
    assert ib("passkey", "2 then 71432", ["71432"]) == 0 and ib("passkey", "none", ["71432"]) == 0
    assert ib("number_string", "3000077442.", "3000077442") == 1
    assert ib("kv_retrieval", 'is: "c14cb8ba-002b".', "c14cb8ba-002b") == 1  # split on \n : " ' . , ? ! { }
    assert ib("kv_retrieval", "c14cb8ba-002bX", "c14cb8ba-002b") == 0
    assert all(ib("kv_retrieval", f"key{c}c14cb8ba-002b{c}", ["c14cb8ba-002b"]) == 1 for c in "\n:\"'.,?!{}")
    assert ib("longdialogue_qa_eng", "ace rothstein!", ["ACE", "ACE ROTHSTEIN"]) == 1  # upper-cased words, label[0]
    assert ib("longdialogue_qa_eng", "Rothstein", ["ACE", "ROTHSTEIN"]) == 0
    assert ib("code_run", "The value is `24`.", [24]) == 1 and ib("code_run", "24, I think", [24]) == 0  # last word
    assert ib("code_run", "", [24]) == 0 and ib("code_run", "is 24", ["24"]) == 1  # a numeric string label
    label = ["repack_carchive", "B"]
    assert ib("code_debug", " B. it is", label) == 1 and ib("code_debug", "B: x", label) == 1
    assert ib("code_debug", "The correct option is: B", label) == 1  # the first prefix found ('is:') decides
    assert ib("code_debug", "answer: repack_carchive", label) == 1 and ib("code_debug", "answer: A", label) == 0
    assert ib("code_debug", "Option B", label) == 0 and ib("code_debug", "B", label) == 0  # no prefix, no "B."
    assert ib("code_debug", "The answer is:", label) == 0  # ends with its prefix


def test_infinitebench_choice_math_and_text_scorers():
    label = ["Snowfield", "C"]
    assert ib("longbook_choice_eng", "C. Snowfield", label) == 1 and ib("longbook_choice_eng", "B", label) == 0
    assert ib("longbook_choice_eng", "Snowfield", label) == 1 and ib("longbook_choice_eng", "", label) == 0
    assert ib("longbook_choice_eng", "The answer is: C", label) == 1  # after the prefix
    assert ib("longbook_choice_eng", "the answer is Snowfield", label) == 1
    assert ib("longbook_choice_eng", "the answer is D, C", label) == 0  # the first prefix found decides
    assert ib("longbook_choice_eng", "hmm. C it is", label) == 1  # the first word that is one of A B C D
    assert ib("longbook_choice_eng", "hmm A or C", label) == 0
    assert ib("math_find", "It is 88.", [88]) == 1 and ib("math_find", "3.5", [3]) == 0  # int("3.5"): scored 0
    assert ib("math_find", "3.5 or 4", [3.5]) == 1 and ib("math_find", "88", ["88"]) == 1 and ib("math_find", "x", [1]) == 0
    assert ib("math_calc", "[1, 4, 8, 10]", [[1, 4, 8, 9]]) == 0.75  # right values from the first until one is wrong
    assert ib("math_calc", "[1, 5, 8]", [1, 4, 8]) == pytest.approx(1 / 3) and ib("math_calc", "[-1]", [[-1]]) == 0
    assert ib("longbook_qa_eng", "The cat sat.", ["a cat sat down", "dog"]) == pytest.approx(0.8)  # P 1, R 2/3
    # character F1 after removing Chinese punctuation and spaces: 6 of 6 predicted, 6 of 9 reference characters
    assert ib("longbook_qa_chn", "田归农，商老太", ["田归农, 商老太, 王剑英"]) == pytest.approx(0.8)


def test_rouge_lsum_by_hand_and_against_rouge_score():
    # reference sentences "a b c d" / "e f"; prediction "a c x" / "f e": union LCS hits a c, then e or f: 3 of 6, 3 of 5
    assert L.rouge_lsum("a c x\nf e", "a b c d\ne f") == pytest.approx(2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6))
    assert L.rouge_lsum("", ["a b"]) == 0 and L.rouge_lsum("a b", ["x", "a b"]) == 1  # the best reference
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge_score checks rougeLsum (test only)")
    scorer, rng = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False), random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "Cat", "mat.", "it's", "42", "é"]
    for _ in range(300):  # few distinct words: many ties between longest common subsequences
        text = lambda: "\n".join(" ".join(rng.choices(words, k=rng.randint(0, 8))) for _ in range(rng.randint(1, 4)))
        prediction, references = text(), [text() for _ in range(rng.randint(1, 3))]
        assert L.rouge_lsum(prediction, references) == pytest.approx(
            scorer.score_multi(references, prediction)["rougeLsum"].fmeasure, abs=1e-12)

# ----------------------------------------------------------------------------------------------
# LV-Eval's metrics

def lv(dataset, prediction, answers, keywords=None):
    return L.score("lveval", f"{dataset}_16k", prediction, answers, keywords)


def test_lveval_english_metrics():
    # qa_f1_score_with_gold_ans: keyword recall below 0.2 scores 0, blacklisted words found do not count
    assert lv("hotpotwikiqa_mixup", "Paris is nice", ["Paris"], "Paris") == pytest.approx(0.5)  # then plain F1
    assert lv("hotpotwikiqa_mixup", "of and in", ["of and in Paris"], "of and in Paris") == 0  # recall 0 (blacklist)
    assert lv("loogle_SD_mixup", "x y z w v", ["x y z w v"], "b c d e f g x") == 0  # 1 of 7 keywords < 0.2
    assert lv("loogle_SD_mixup", "x y z w v", ["x y z w v"], "b c d e x") == 1  # 1 of 5 = 0.2: kept
    assert lv("multifieldqa_en_mixup", "Paris", ["Paris"], None) == 1  # no keywords: no floor
    assert lv("factrecall_en", "Ludwig van", ["Ludwig"], "zzz") == pytest.approx(2 / 3)  # plain F1, keywords unused
    assert lv("factrecall_en", "right", ["wrong", "right"]) == 0  # the first reference only, as its scorer
    assert L.rouge_l("a b. c", "a b c") == pytest.approx(2 * 1 * 1 / (2 + 1e-8))
    rouge = pytest.importorskip("rouge", reason="the `rouge` package checks LV-Eval's ROUGE-L (test only)")
    rng, words = random.Random(1), ["a", "b", "c", "d", "e", "a.", "b.", " ", "x"]
    for _ in range(300):
        prediction, reference = ("".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(2))
        try:
            want = rouge.Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
        except Exception:  # as rouge_score in LV-Eval's metrics.py: what raises scores 0
            want = 0.0
        assert L.rouge_l(prediction, reference) == pytest.approx(want, abs=1e-12)


def test_lveval_chinese_metrics():
    pytest.importorskip("jieba", reason="LV-Eval's Chinese datasets need jieba's word segmentation")
    words = L.lv_words("北京是中国的首都。", True)
    assert "首都" in words and "。" not in words
    assert lv("cmrc_mixup", "北京首都", ["北京是首都"], "") == pytest.approx(0.8)  # no keywords: the answer's words
    assert lv("cmrc_mixup", "首都", ["北京是中国的首都"], "北京 首都 中国") == 0  # 1 of 3 keywords < 0.4
    assert lv("factrecall_zh", "贝多芬", ["贝多芬"], "zzz") == 1
    rouge = pytest.importorskip("rouge", reason="the `rouge` package checks dureader's ROUGE-L (test only)")
    import jieba
    for prediction, reference in [("北京是中国的首都", "中国的首都是北京"), ("今天天气很好", "明天下雨"), ("", "北京")]:
        cut = lambda t: [L.normalize_zh(w) for w in jieba.cut(" ".join(jieba.cut(t, cut_all=False)), cut_all=False)]
        p, r = (" ".join(w for w in cut(t) if w not in L.ABANDON_ZH) for t in (prediction, reference))
        try:
            want = rouge.Rouge().get_scores([p], [r], avg=True)["rouge-l"]["f"]
        except Exception:
            want = 0.0
        assert lv("dureader_mixup", prediction, [reference]) == pytest.approx(want, abs=1e-12)


def test_missing_jieba_is_one_sentence(monkeypatch):
    real = data.importlib.import_module
    monkeypatch.setattr(data.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError(name)) if name == "jieba" else real(name))
    with pytest.raises(rope.UserError, match=re.escape("reading LV-Eval's Chinese datasets (jieba segments their "
                                                       "words) needs the jieba package: pip install jieba")):
        lv("cmrc_mixup", "北京", ["北京"])
    assert lv("factrecall_en", "Ludwig", ["Ludwig"]) == 1  # the English datasets need nothing more


def test_tables_round_as_each_benchmark_rounds():
    items = [dict(task="passkey", scores={"infinitebench": x}) for x in (1, 0, 0)]
    aggregate, summary, _, rows = L.table("infinitebench", items + [dict(task="kv_retrieval", scores={"infinitebench": 1})])
    assert aggregate == {"passkey": pytest.approx(100 / 3), "kv_retrieval": 100} and summary["tasks"] == 2
    assert summary["average"] == pytest.approx((100 / 3 + 100) / 2) and rows[-1][-1] == "2 of 12 tasks"
    items = [dict(task=t, scores={"lveval": x}) for t, x in [("factrecall_en_16k", 1), ("factrecall_en_16k", 0),
             ("factrecall_en_16k", 0), ("cmrc_mixup_16k", 0.5), ("cmrc_mixup_32k", 0.25)]]
    aggregate, summary, header, rows = L.table("lveval", items)
    assert aggregate == {"factrecall_en_16k": 33.33, "cmrc_mixup_16k": 50.0, "cmrc_mixup_32k": 25.0}
    assert header == ["dataset", "16k", "32k"] and summary["average"] == {"16k": 41.66, "32k": 25.0}
    assert rows[0] == ["factrecall_en", 33.33, "-"] and summary["datasets"] == {"16k": 2, "32k": 1}

# ----------------------------------------------------------------------------------------------
# the benchmarks' files end to end

def write(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write(root / "ib" / "passkey.jsonl", [dict(id=i, context=BOOK + f"The pass key is {71000 + i}. " + BOOK,
                                               input="What is the pass key?", answer=[str(71000 + i)], options=[])
                                          for i in range(2)])
    write(root / "ib" / "code_run.jsonl", [dict(id=0, context="def func_1(x):\n    return x + 1\n", answer=[3],
                                                input="Please give me the exact number of the return value of func_1(2).",
                                                options=[])])
    write(root / "lv" / "factrecall_en_16k.jsonl", [dict(input="Who?", context=BOOK, answers=["Ludwig"], length=300,
                                                         answer_keywords="Ludwig", confusing_facts=[])])
    write(root / "lv" / "hotpotwikiqa_mixup" / "hotpotwikiqa_mixup_32k.jsonl",
          [dict(input="What is green?", context=BOOK, answers=["the grass"], length=300, answer_keywords="grass",
                confusing_facts=[])])
    return root


def test_infinitebench_run_score_and_prepare_agree(tiny_dir, bench_dirs, tmp_path, capsys):
    argv = ["infinitebench", "--model", tiny_dir, "--data", str(bench_dirs / "ib"), "--max-len", "300"]
    assert E.main([*argv, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "skipped kv_retrieval: there is no kv_retrieval.jsonl in" in out and "2 of 12 tasks" in out
    run = json.load(open(tmp_path / "run" / "results.json"))
    assert set(run["aggregate"]) == {"passkey", "code_run"} and run["summary"]["tasks"] == 2
    assert all(it["truncated"] for it in run["items"] if it["task"] == "passkey")
    preds = [str(tmp_path / "run" / "preds" / f"preds_{t}.jsonl") for t in ("passkey", "code_run")]
    assert json.loads(open(preds[1]).readline()) == dict(id=0, prediction=run["items"][2]["prediction"], ground_truth=[3])
    assert E.main(["infinitebench", "--score", *preds, "--out", str(tmp_path / "score")]) == 0  # no model
    score = json.load(open(tmp_path / "score" / "results.json"))
    assert score["aggregate"] == run["aggregate"] and score["summary"] == run["summary"]
    assert [it["scores"] for it in score["items"]] == [it["scores"] for it in run["items"]]
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_dir, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    assert E.main([*argv, "--model", str(weightless), "--prepare-only", "--out", str(tmp_path / "prep")]) == 0
    records = [json.loads(line) for line in open(tmp_path / "prep" / "passkey.jsonl")]
    assert [sorted(r) for r in records] == [["answers", "id", "input", "max_new_tokens", "truncated"]] * 2
    assert all(r["input"].startswith("<|begin_of_text|>") and r["input"].endswith(
        "The pass key is<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n") for r in records)  # framed
    assert records[0]["max_new_tokens"] == 6 and records[0]["truncated"] and records[0]["answers"] == ["71000"]


def test_lveval_run_and_score_agree(tiny_dir, bench_dirs, tmp_path):
    argv = ["lveval", "--model", tiny_dir, "--data", str(bench_dirs / "lv"), "--tasks",
            "factrecall_en,hotpotwikiqa_mixup", "--lengths", "16k,32k", "--max-len", "200", "--no-chat"]
    assert E.main([*argv, "--out", str(tmp_path / "run")]) == 0
    run = json.load(open(tmp_path / "run" / "results.json"))
    assert set(run["aggregate"]) == {"factrecall_en_16k", "hotpotwikiqa_mixup_32k"}
    assert [it["max_new_tokens"] for it in run["items"]] == [16, 64]
    assert all(it["truncated"] and abs(it["prompt_tokens"] - 200) <= 2 for it in run["items"])  # bos + the cut text
    preds = sorted(str(p) for p in (tmp_path / "run" / "preds").iterdir())
    assert sorted(json.loads(open(preds[0]).readline())) == ["answers", "gold_ans", "input", "length", "pred"]
    assert E.main(["lveval", "--score", *preds, "--out", str(tmp_path / "score")]) == 0
    assert json.load(open(tmp_path / "score" / "results.json"))["aggregate"] == run["aggregate"]
    assert (tmp_path / "score" / "lveval.md").read_text().startswith("| dataset | 16k | 32k |")


def test_benchmark_runs_resume_where_they_crashed(tiny_dir, bench_dirs, tmp_path, monkeypatch):
    argv = ["infinitebench", "--model", tiny_dir, "--data", str(bench_dirs / "ib"), "--max-len", "300",
            "--out", str(tmp_path / "part")]
    with monkeypatch.context() as m:
        count_calls(m, E, "answer", crash_after=1)
        with pytest.raises(Crash):
            E.main(argv)
    with monkeypatch.context() as m:
        again = count_calls(m, E, "answer")
        assert E.main(argv) == 0
    assert len(again) == 2  # of 3 items, the first was done before the crash
    assert E.main([*argv[:-1], str(tmp_path / "whole")]) == 0
    whole, part = (json.load(open(tmp_path / d / "results.json")) for d in ("whole", "part"))
    assert part["items"] == whole["items"] and part["aggregate"] == whole["aggregate"]


def test_bad_benchmark_input_is_one_sentence(tiny_dir, bench_dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    write(bad / "code_run.jsonl", [dict(id=0, context="c", input="no call here", answer=[1], options=[])])
    write(bad / "passkey.jsonl", [dict(id=0, input="q", answer=["1"])])
    base = ["--model", tiny_dir, "--max-len", "300"]
    cases = [(["infinitebench", "--data", str(bad), "--tasks", "code_run"], "code_run.jsonl line 1: not infinitebench "
              "code_run record (list index out of range)"),
             (["infinitebench", "--data", str(bad), "--tasks", "passkey"], "passkey.jsonl line 1: not infinitebench "
              "passkey record (it has no 'context' field)"),
             (["infinitebench", "--data", str(tmp_path / "none")], f"{tmp_path / 'none'} is not one"),
             (["infinitebench", "--data", str(bench_dirs / "lv")], "holds none of the infinitebench files asked for"),
             (["lveval", "--data", str(bench_dirs / "lv"), "--lengths", "8k"], "--lengths: LV-Eval's levels are 16k"),
             (["infinitebench", "--tasks", "passkey"], "infinitebench --data needs one folder of the benchmark's "
              "own files; none is not one"),
             (["infinitebench", "--score", str(bench_dirs / "ib" / "passkey.jsonl")], "are named preds_<task>.jsonl"),
             (["lveval", "--score", str(bench_dirs / "ib" / "passkey.jsonl")], "are named <dataset>_<level>.jsonl (levels"),
             (["niah", "--score", "x.jsonl"], "--score scores infinitebench or lveval prediction files, not niah")]
    for i, (argv, sentence) in enumerate(cases):
        assert E.main([*argv, *base, "--out", str(tmp_path / f"out{i}")]) == 2
        err = capsys.readouterr().err
        assert sentence in err and err.startswith("error: ") and err.count("\n") == 1, (argv, err)

# ----------------------------------------------------------------------------------------------
# RULER's own files (issue 16, item 5)

def test_rulers_own_files_are_scored_as_ruler_wrote_them(tiny_dir, tok, tmp_path):
    argv = ["ruler", "--model", tiny_dir, "--lengths", "2K", "--tasks", "niah_single_1,vt"]
    assert E.main([*argv, "--prepare-only", "--out", str(tmp_path / "prep")]) == 0
    own = tmp_path / "RULER" / "synthetic" / "2048" / "data"  # RULER's layout: the length names a folder
    for task in ("niah_single_1", "vt"):
        records = [json.loads(line) for line in open(tmp_path / "prep" / task / "validation.jsonl")]
        write(own / task / "validation.jsonl", [dict(  # the fields RULER's prepare.py writes, no tokens_to_generate
            index=r["index"], input=r["input"], outputs=r["outputs"], length=r["length"], length_w_model_temp=r["length"],
            answer_prefix=r["answer_prefix"], token_position_answer=0) for r in records])
    assert E.main(["ruler", "--model", tiny_dir, "--data", str(own), "--out", str(tmp_path / "theirs")]) == 0
    result = json.load(open(tmp_path / "theirs" / "results.json"))
    row, items = result["aggregate"]["table"]["2K"], result["items"]
    assert row["tasks"] == 2 and result["aggregate"]["skipped"]["qa_1"].startswith("has no")
    assert [it["max_new_tokens"] for it in items] == [128, 30]  # the budget from the folder's name
    for it, task in zip(items, ("niah_single_1", "vt")):  # the prompt as RULER wrote it, its task's metric
        r = json.loads(open(own / task / "validation.jsonl").readline())
        assert it["prompt_tokens"] == len(ruler.encode(tok, r["input"] + r["answer_prefix"]))
        assert row[task] == 100 * ruler.item_score(task, it["prediction"], r["outputs"])
    one = own / "vt" / "validation.jsonl"
    assert E.main(["jsonl", str(one), "--model", tiny_dir, "--out", str(tmp_path / "one")]) == 0  # its task: vt
    assert json.load(open(tmp_path / "one" / "results.json"))["aggregate"]["table"]["2K"]["vt"] == row["vt"]
    write(own / "vt" / "validation.jsonl", [{"input": "x", "outputs": "not a list"}])
    with pytest.raises(rope.UserError, match=r"vt/validation.jsonl line 1: not a RULER record"):
        list(ruler.prepared_records("vt", str(one)))
