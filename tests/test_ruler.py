"""ruler.py against NVIDIA/RULER's own definitions (synthetic.yaml, constants.py, template.py, the
generators, evaluate.py): the frame, wording, needle types and counts, one-shot examples, budgets,
the length accounting and the metrics, with data files written here in RULER's formats."""
import json
import re
from collections import Counter

import pytest

import data
import ruler
from rope import UserError

LENGTH = 8192  # bytes are tokens with the built-in tokenizer: RULER's essay step (500 words) needs room
BUDGETS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}  # constants.py's tokens_to_generate
ESSAY = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith slipped "
         "quickly through the glass doors of Victory Mansions! Was it not so? ") * 60


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ruler")
    (root / "essays").mkdir()
    (root / "essays" / "a.txt").write_text(ESSAY[: len(ESSAY) // 2])
    (root / "PaulGrahamEssays.json").write_text(json.dumps({"text": ESSAY[len(ESSAY) // 2:]}))
    paragraphs = [{"context": f"Paragraph {i}: the river Zyx{i} runs north of town {i}.",
                   "qas": [{"question": f"Where does the river Zyx{i} run?", "is_impossible": False,
                            "answers": [{"text": f"north of town {i}"}, {"text": f"town {i}"}]},
                           {"question": "Unanswerable?", "is_impossible": True, "answers": []}]}
                  for i in range(40)]
    squad = {"data": [{"title": "A", "paragraphs": paragraphs[:20]}, {"title": "B", "paragraphs": paragraphs[20:]}]}
    hotpot = [{"question": f"Who built bridge {i}?", "answer": f"Builder{i}",
               "context": [[f"Bridge {i}", [f"Bridge {i} was built ", f"by Builder{i}."]],
                           [f"Other {i}", ["Nothing here."]]]} for i in range(30)]
    (root / "squad.json").write_text(json.dumps(squad))
    (root / "hotpot.json").write_text(json.dumps(hotpot))
    return ruler.read_sources([str(root / "essays"), str(root / "PaulGrahamEssays.json")],
                              str(root / "squad.json"), str(root / "hotpot.json"))


@pytest.fixture(scope="module")
def records(sources):
    tok, words = data.builtin_tokenizer(), ruler.load_words()
    return {task: list(ruler.build(task, tok, LENGTH, 2, 0, sources, words)) for task in ruler.TASKS}


def test_the_thirteen_tasks_of_the_paper():
    assert list(ruler.TASKS) == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                 "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                                 "vt", "cwe", "fwe", "qa_1", "qa_2"]


def test_words_are_the_english_lists_rulers_generators_read():
    words = ruler.load_words()
    assert len(words["nouns"]) == 6782 and len(words["adjectives"]) == 912 and len(words["verbs"]) == 1042
    assert len(words["english"]) > 200_000
    assert {"apple", "river", "teacher"} <= set(words["nouns"]) and "blue-eyed" in words["adjectives"]
    assert all(w == w.strip() and w for section in words.values() for w in section)


def test_every_record_has_rulers_fields_frame_budget_and_length_accounting(records):
    tok = data.builtin_tokenizer()
    for task, recs in records.items():
        kind = ruler.TASKS[task][0]
        assert [r["index"] for r in recs] == [0, 1]
        for r in recs:
            assert set(r) == {"index", "input", "outputs", "length", "answer_prefix", "tokens_to_generate"}
            assert r["tokens_to_generate"] == BUDGETS[kind], task
            assert r["input"].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"), task
            assert r["input"].endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), task
            assert "system" not in r["input"][:60]  # no system turn, for Llama 3.1 too
            assert r["answer_prefix"].startswith(" ") and "\n" not in r["answer_prefix"]
            tokens = len(ruler.encode(tok, r["input"] + r["answer_prefix"]))
            assert r["length"] == tokens + BUDGETS[kind] <= LENGTH, task
            assert r["length"] > LENGTH // 2, task  # the haystack was grown to the length, not left small
            assert r["outputs"] and all(isinstance(o, str) and o for o in r["outputs"])


@pytest.mark.parametrize("length", [LENGTH, 2 * LENGTH])
def test_rulers_search_leaves_the_budget_free_and_fills_the_rest(sources, length):
    """Every task's own search step and budget, on a prompt of exactly n tokens: RULER's search takes the
    largest n with n + tokens_to_generate <= length (fwe's: the last of its steps below that); every record
    keeps to it."""
    tok, words = data.builtin_tokenizer(), ruler.load_words()
    exact = lambda n, i: ("x" * n, [])  # bytes are tokens: n tokens
    for task in ruler.TASKS:
        _, step, budget = ruler.generator(task, tok, length, 0, sources, words, ruler.FRAME)
        assert budget == BUDGETS[ruler.TASKS[task][0]], task
        for step in (step, 1):  # the task's own, and the finest, where a token of budget counts
            if task == "fwe":
                n = ruler.fit_fwe(exact, tok, length, budget, step)
                assert n + budget <= length <= n + step + budget, (task, n, step)
            else:
                assert ruler.fit(exact, tok, length, budget, step) == length - budget, (task, step)
        for r in ruler.build(task, tok, length, 2, 0, sources, words):
            assert len(ruler.encode(tok, r["input"] + r["answer_prefix"])) + budget == r["length"] <= length, task
            assert r["length"] > length // 2, task


def test_niah_needles_keys_values_and_singular_or_plural_wording(records):
    for task, recs in records.items():
        spec = ruler.TASKS[task]
        if spec[0] != "niah":
            continue
        _, haystack, k_type, v_type, n_keys, n_values, n_queries = spec
        r = recs[0]
        needle = re.compile(rf"One of the special magic {v_type} for (\S+(?:, \S+)*?) is: (\S+)\.")
        found = needle.findall(r["input"])
        real = [(k, v) for k, v in found if v in r["outputs"]]
        assert len(real) == n_queries * n_values, task
        if haystack == "needle":
            assert len(found) > 20  # the haystack is made of needle lines too
        else:
            assert len(found) == max(n_keys, n_queries) * n_values, task
        pattern = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                   "words": r"[^\s-]+(?:-[^\s-]+)+"}
        assert all(re.fullmatch(pattern[v_type], v) for v in r["outputs"]), task
        assert all(re.fullmatch(pattern[k_type], k) for k, _ in real), task
        singular = n_queries * n_values == 1
        noun = v_type[:-1] if singular else v_type
        assert (f"A special magic {noun} is hidden" if singular else f"Some special magic {noun} are hidden") in r["input"]
        assert r["answer_prefix"].startswith(f" The special magic {noun} for ")
        assert r["answer_prefix"].endswith(" is" if singular else " are")
        if haystack == "noise":
            assert r["input"].count(ruler.NOISE) > 50
        if haystack == "essay":
            assert "Winston Smith" in r["input"]
    multi = records["niah_multiquery"][0]["answer_prefix"]
    assert multi.count(", ") == 3 and ", and " in multi  # four keys asked for at once


def test_variable_tracking_has_the_solved_one_shot_example_and_the_chain(records):
    r = records["vt"][0]
    assert r["input"].count("Question: Find all variables that are assigned the value") == 2
    _, shot, task = r["input"].split("Memorize and track")  # the frame, the solved example, the task
    shot_names = re.findall(r"VAR ([A-Z]{3}) = ", shot)
    assert len(shot_names) == 5 and shot.rstrip().endswith(" ".join(shot_names))
    assert "12345" not in shot  # the example's value is drawn anew, as randomize_icl does
    value = re.search(r"assigned the value (\d{5}) in the text above\.<\|eot_id\|>", task).group(1)
    names = r["outputs"]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    assert f"VAR {names[0]} = {value}" in task
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a} \n" in task
    assert r["answer_prefix"] == (" Answer: According to the chain(s) of variable assignment in the text above, "
                                  f"5 variables are assigned the value {value}, they are: ")


def test_common_words_one_shot_and_counts(records):
    r = records["cwe"][0]
    frames = r["input"].split("<|begin_of_text|>")[1:]
    assert len(frames) == 2  # RULER's one-shot example is a whole framed prompt, answered
    listed = re.findall(r"\d+\. (\S+)", frames[1].split("\nQuestion:")[0])
    counts = Counter(listed)
    assert all(counts[w] == 30 for w in r["outputs"]) and len(r["outputs"]) == 10
    assert all(c == 3 for w, c in counts.items() if w not in r["outputs"])
    english = set(ruler.load_words()["nouns"] + ruler.load_words()["adjectives"] + ruler.load_words()["verbs"])
    assert set(counts) <= english  # real English words, never generated syllables


def test_frequent_words_are_zipf_coded_words(records):
    r = records["fwe"][0]
    coded = r["input"].split("coded words. ")[1].split("\nQuestion:")[0].split(" ")
    ranked = [w for w, _ in Counter(coded).most_common()]
    assert ranked[0] == "..." and ranked[1:4] == r["outputs"]
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])


def test_qa_documents_and_answers(records, sources):
    squad = records["qa_1"][0]
    assert squad["outputs"] == ["north of town 0", "town 0"]  # the first answerable question, in order
    assert "Question: Where does the river Zyx0 run?" in squad["input"] and "Paragraph 0:" in squad["input"]
    assert re.search(r"Document 1:\nParagraph \d+", squad["input"]) and squad["answer_prefix"] == " Answer:"
    assert records["qa_1"][1]["outputs"][0] == "north of town 1"
    assert len(sources["squad"][0]) == 40  # the unanswerable questions are left out
    hotpot = records["qa_2"][0]
    assert hotpot["outputs"] == ["Builder0"] and "Bridge 0\nBridge 0 was built by Builder0." in hotpot["input"]


def test_rulers_metrics():
    assert ruler.item_score("niah_multivalue", " 123, 456 and 7", ["123", "456", "789", "000"]) == 0.5
    assert ruler.item_score("qa_1", "It is NORTH of town", ["north of town 0", "north of town"]) == 1.0
    assert ruler.item_score("qa_2", "nowhere", ["a", "b"]) == 0.0
    assert ruler.item_score("cwe", "\x01ABC\n", ["abc"]) == 1.0
    assert ruler.task_score("niah_multikey_1", ["x 1", "2"], [["1"], ["1"]]) == 50.0
    assert ruler.task_score("vt", ["A B", "A"], [["A", "B", "C"], ["A", "B", "C"]]) == 50.0  # (2/3 + 1/3) / 2
    assert ruler.postprocess("  a\tb\x00 ") == "a\nb"


def test_missing_sources_are_named_and_bad_files_refused(tmp_path):
    none = ruler.read_sources(None, None, None)
    assert "--haystack" in ruler.unavailable("niah_single_2", none)
    assert "--squad" in ruler.unavailable("qa_1", none) and "--hotpotqa" in ruler.unavailable("qa_2", none)
    assert ruler.unavailable("niah_single_1", none) is None and ruler.unavailable("vt", none) is None
    bad = tmp_path / "squad.json"
    bad.write_text('{"data": [')
    with pytest.raises(UserError, match="--squad: .*squad.json is not a readable squad JSON file"):
        ruler.read_sources(None, str(bad), None)
    with pytest.raises(UserError, match="too short for RULER's niah_single_1"):
        list(ruler.build("niah_single_1", data.builtin_tokenizer(), 300, 1, 0, none, ruler.load_words()))


def test_without_the_chat_frame_the_prompt_is_the_task_alone():
    none = ruler.read_sources(None, None, None)
    for task in ("niah_single_1", "vt", "fwe"):
        r = next(ruler.build(task, data.builtin_tokenizer(), 4096, 1, 0, none, ruler.load_words(), chat=False))
        assert "<|" not in r["input"] and r["length"] <= 4096, task
        assert r["length"] == len(ruler.encode(data.builtin_tokenizer(), r["input"] + r["answer_prefix"])) + \
            BUDGETS[ruler.TASKS[task][0]]
