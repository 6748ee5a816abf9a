"""InfiniteBench (Zhang et al., 2024) and LV-Eval (Yuan et al., 2024), the paper's two realistic long-context
benchmarks, built and scored as their own code does, so that our numbers stand beside the paper's tables
(InfiniteBench: UltraLong-1M 32%, Llama-3.1-8B-Instruct 24%); eval.py runs them (`infinitebench`, `lveval`).
Followed, as facts: OpenBMB/InfiniteBench src/prompt.py (yarn_mistral_templates: the open-model template that
its scripts give YaRN-Mistral, Yi and ChatGLM3), src/eval_utils.py (create_prompt, get_answer,
DATA_NAME_TO_MAX_NEW_TOKENS), src/eval_yarn_mistral.py (truncate_input), src/compute_scores.py (one scorer
per task); infinigence/LVEval config.py (DATASET_PROMPT, DATASET_MAXGEN, DATASET_METRIC), utils.py
(truncate_prompt), metrics.py, evaluation.py (the scorer: the first reference only, round(100 x mean, 2)).
The deliberate differences are listed in the README. Here too: the frame every evaluation prompt shares.
"""
import collections, json, os, pathlib, re, string
from collections.abc import Iterator

import data
from rope import UserError

# ---- Every evaluation prompt: the chat frame, the budget, the first problem as a sentence --------------------
def refuse(problems):  # raises the sentence of the first (condition, sentence) that holds
    for bad, sentence in problems:
        if bad:
            raise UserError(sentence)

def prompt_tokens(tok, message: str, answer_prefix: str, chat: bool):
    """(tokens, start, lead): format_chat's frame (or <|begin_of_text|> alone) around the message, then
    the answer prefix; the message's tokens begin at `start` and are tok.encode(lead + message)."""
    if not chat:
        bos = [] if tok.bos_id is None else [tok.bos_id]
        return bos + tok.encode(message + (f"\n{answer_prefix}" if answer_prefix else "")), len(bos), ""
    tokens, _ = data.format_chat(tok, [{"role": "user", "content": message}], add_generation_prompt=True)
    header_ends = [i + 1 for i, t in enumerate(tokens) if t == tok.token_id("<|end_header_id|>")]
    return tokens + tok.encode(answer_prefix), header_ends[-2], "\n\n"  # [-1] is the assistant's header

def generation_budget(tok, answers: list[str]) -> int:
    """Twice the references' tokens (models add words and punctuation) + 8 for the stop token."""
    return 2 * len(tok.encode(" " + ", ".join(answers))) + 8

# ---- Any long-context QA records: one generic prompt (eval.py jsonl) --------------------------------------------
JSONL_HEAD = "Read the following text and answer the question. Be very concise in your answer.\n\n"

def read_records(path: str) -> list[dict]:
    """InfiniteBench/LV-Eval records: 'context', optional 'input' (or a raw 'prompt' instead, as sft.py's
    records), and 'answers' (InfiniteBench: 'answer'): a string or a non-empty list of strings."""
    records = []
    for line, r in data.read_jsonl(path):
        answers = r.get("answers", r.get("answer"))
        answers = [answers] if isinstance(answers, str) else answers
        refuse((bad, f"{path} line {line} {problem}") for bad, problem in [
            ("prompt" in r and not isinstance(r["prompt"], str), "has a 'prompt' that is not a string"),
            ("prompt" not in r and not isinstance(r.get("context"), str), "has no 'context' string (nor a raw 'prompt')"),
            (not isinstance(r.get("input", ""), str), "has an 'input' that is not a string"),
            (not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)),
             "has no 'answers' (a string or a non-empty list of strings)")])
        records.append(dict(r, id=r.get("id", line), input=r.get("input", ""), answers=answers))
    refuse([(not records, f"{path} holds no records")])
    return records

def make_jsonl_sample(tok, record: dict, max_len: int, *, chat=True, max_new_tokens=None) -> dict:
    """A record's prompt, its context cut in the middle (first and last halves kept, as InfiniteBench
    and LV-Eval do) when prompt + answer would pass max_len. A raw 'prompt' is the whole message."""
    raw = "prompt" in record
    head, tail, answer_prefix = ("", "", "") if raw else (
        JSONL_HEAD, f"\n\nQuestion: {record['input']}" if record["input"] else "\n\n", "Answer:")
    budget = max_new_tokens or generation_budget(tok, record["answers"])
    room = max_len - budget - len(prompt_tokens(tok, head + tail, answer_prefix, chat)[0])
    refuse([(room < 2, f"record {record['id']}: its question and answer alone exceed --max-len {max_len}")])
    ids = tok.encode(record["prompt" if raw else "context"])
    cut = len(ids) > room
    context = tok.decode(ids[:room // 2]) + tok.decode(ids[len(ids) - (room - room // 2):]) if cut else tok.decode(ids)
    tokens = prompt_tokens(tok, head + context + tail, answer_prefix, chat)[0]
    return dict(task="jsonl", id=record["id"], tokens=tokens, max_new_tokens=budget, answers=record["answers"],
                length=len(tokens) + budget, truncated=cut)

# ---- InfiniteBench: the 12 tasks, their prompts and generation budgets --------------------------------------
FACTS = json.loads(pathlib.Path(__file__).with_name("longbench.json").read_text(encoding="utf-8"))
IB_TEMPLATES = FACTS["infinitebench"]  # prompt.py's yarn_mistral_templates, one per task
IB_BUDGET = FACTS["infinitebench_budget"]  # new tokens: passkey 6 ... longbook_sum_eng 1200, math_calc 30000
IB_TASKS = list(IB_BUDGET)

def ib_prompt(task: str, r: dict) -> str:
    """create_prompt: the template filled from the record (its 'input' is the question of the book tasks)."""
    fields = dict(context=r["context"], input=r["input"], question=r["input"])
    if task == "code_run":  # the call asked about, e.g. func_6351(2), found in the input
        call = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", r["input"])[0]
        fields.update(func=call.split("(")[0], func_call=call)
    if task == "math_find":  # "The largest number of the list" -> "What is the largest number in the following list?"
        fields["prefix"] = f"What is {re.findall(r'The .+ of', r['input'])[0].lower()[:-3]} in the following list?"
    if task in ("code_debug", "longbook_choice_eng"):
        fields.update(zip(["OPTION_A", "OPTION_B", "OPTION_C", "OPTION_D"], r["options"][:4], strict=True))
    return IB_TEMPLATES[task].format(**fields)

def ib_answer(task: str, r: dict):
    """get_answer: the record's answer; for the two choice tasks [the option's text, its letter]."""
    answer = r["answer"]
    if task not in ("code_debug", "longbook_choice_eng"):
        return answer
    if isinstance(answer, list) and len(answer) == 2 and answer[1] in ["A", "B", "C", "D"]:
        return answer
    answer = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
    return [answer, "ABCD"[r["options"].index(answer)]]

# ---- LV-Eval: 11 datasets at 5 length levels ----------------------------------------------------------------
LV_PROMPT, LV_BUDGET = FACTS["lveval"], FACTS["lveval_budget"]  # DATASET_PROMPT; DATASET_MAXGEN: 64, factrecall 16
LV_METRIC = FACTS["lveval_metric"]  # DATASET_METRIC, by the name of metrics.py's function
LV_DATASETS, LV_LEVELS = list(LV_PROMPT), ["16k", "32k", "64k", "128k", "256k"]
LV_RESERVE = 500  # the README's "model_max_length (-500 to reserve output window)": the default --max-len
# metrics.py's blacklists: words that do not count towards an answer keyword's recall
ABANDON_EN, ABANDON_ZH = set(FACTS["lveval_blacklist_en"]), set(FACTS["lveval_blacklist_zh"])

def lv_name(stem: str) -> tuple[str, str]:  # "cmrc_mixup_16k" -> ("cmrc_mixup", "16k"), as evaluation.py splits it
    return re.split(r"_.{1,3}k", stem)[0], stem.split("_")[-1]

# ---- Shared pieces: cutting in the middle, normalising, F1, ROUGE-L --------------------------------------------
def cut_middle(tok, text: str, max_len: int, bench: str) -> tuple[str, bool]:
    """The text cut to max_len tokens in the middle, as a Hugging Face tokenizer counts them (<|begin_of_text|>
    included), then decoded: InfiniteBench's truncate_input keeps max_len // 2 tokens at each end and decodes
    them together; LV-Eval's truncate_prompt keeps int(max_len / 2) and decodes each end on its own."""
    bos = [] if tok.bos_id is None else [tok.bos_id]
    ids = bos + tok.encode(text)
    if len(ids) <= max_len:
        return text, False
    half = max_len // 2
    decode = lambda part: tok.decode([t for t in part if t not in bos])  # skip_special_tokens=True
    return (decode(ids[:half] + ids[-half:]) if bench == "infinitebench" else
            decode(ids[:half]) + decode(ids[-half:])), True

def normalize_answer(text: str) -> str:  # SQuAD's, and both benchmarks': lower case, no punctuation or articles
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())

ZH_PUNCTUATION = set(string.punctuation + FACTS["zh_punctuation"])

def normalize_zh(text: str) -> str:  # normalize_zh_answer: lower case, no punctuation (Chinese too), no spaces
    return "".join(ch for ch in "".join(text.lower().split()) if ch not in ZH_PUNCTUATION)

def f1(predicted: list, reference: list) -> float:
    """Bag-of-words F1, as both benchmarks (and SQuAD) compute it."""
    same = sum((collections.Counter(predicted) & collections.Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(reference)
    return 2 * precision * recall / (precision + recall)

def token_f1(prediction: str, answers: list[str]) -> float:  # the best F1 over the references, on SQuAD's words
    return max(f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers)

def lcs(x: list, y: list, tie_up: bool) -> list[int]:
    """Indices into x of one longest common subsequence of x and y. Where both ways keep the length, rouge_score
    steps back in x (tie_up) and the `rouge` package in y: the two libraries can pick different words."""
    t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(t[i - 1][j], t[i][j - 1])
    i, j, out = len(x), len(y), []
    while i and j:
        if x[i - 1] == y[j - 1]:
            out, i, j = [i - 1] + out, i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1] or tie_up and t[i - 1][j] == t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out

def rouge_lsum(prediction: str, references) -> float:
    """rouge_score's rougeLsum F-measure, no stemming (InfiniteBench's evaluate.load("rouge")), the best over the
    references: lines are sentences, words are [a-z0-9]+ of the lower-cased text, and each reference sentence's
    union LCS with the prediction's sentences counts its words once, up to their counts on either side."""
    def sentences(text):
        return [re.sub(r"[^a-z0-9]+", " ", s.lower()).split() for s in text.split("\n") if s]
    def one(reference):
        ref, pred = sentences(reference), sentences(prediction)
        m, n = sum(map(len, ref)), sum(map(len, pred))
        if not m or not n:
            return 0.0
        left_r, left_p, hits = collections.Counter(sum(ref, [])), collections.Counter(sum(pred, [])), 0
        for s in ref:
            for word in [s[i] for i in sorted(set().union(*(lcs(s, p, True) for p in pred)))]:
                if left_r[word] > 0 and left_p[word] > 0:
                    hits, left_r[word], left_p[word] = hits + 1, left_r[word] - 1, left_p[word] - 1
        precision, recall = hits / n, hits / m
        return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return max(map(one, [references] if isinstance(references, str) else references))

def rouge_l(prediction: str, reference: str) -> float:
    """The `rouge` package's ROUGE-L F (rouge_l_summary_level, exclusive), as LV-Eval calls it: sentences are cut
    at '.', words at spaces, and the union LCS and both lengths count distinct words; 0 where it raises (an
    empty side)."""
    def sentences(text):
        return [" ".join(s.split()).split(" ") for s in text.split(".") if s]
    pred, ref = sentences(prediction), sentences(reference)
    if not pred or not ref:
        return 0.0
    union = {r[i] for r in ref for p in pred for i in lcs(r, p, False)}
    precision, recall = len(union) / len(set(sum(pred, []))), len(union) / len(set(sum(ref, [])))
    return 2.0 * (precision * recall / (precision + recall + 1e-8))

# ---- InfiniteBench's scorers (compute_scores.py), one per task: prediction, label -> 0..1 ----------------------
KV_SPLIT = ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]

def first(label):  # a one-answer label, list or not
    return label[0] if isinstance(label, list) else label

def number(label):  # an int or float label; a numeric string (as Hugging Face datasets store it) read as one
    return (float(label) if "." in label else int(label)) if isinstance(label, str) else label

def score_first_int(prediction, label):  # first_int_match: the first run of digits is the label
    return first(label) == next((x for x in re.split("[^0-9]", prediction) if x), "")

def score_code_run(prediction, label):  # the prediction's last word as an integer
    words = squeeze(prediction.strip(), ["\n", ".", "`", "'", '"', ":"]).split()
    try:
        return bool(words) and int(words[-1]) == number(first(label))
    except ValueError:
        return False

def after_prefix(text: str, prefixes, starts) -> bool | None:  # the first prefix found: does what follows start so?
    for prefix in prefixes:
        at = text.find(prefix)
        if at != -1:
            rest = text[at + len(prefix) + 1:]
            return len(text) >= at + len(prefix) + 1 and any(rest.startswith(s) for s in starts)
    return None

def squeeze(text: str, characters) -> str:  # the characters become spaces, runs of spaces one
    for c in characters:
        text = text.replace(c, " ")
    while "  " in text:
        text = text.replace("  ", " ")
    return text

def score_code_debug(prediction, label):  # label: [function name, letter]
    pred, (name, letter) = prediction.strip(), label[:2]
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    pred = squeeze(pred, ["\n", "`", "'", '"', "-", "*", "Option", "option"])
    return bool(after_prefix(pred, ["answer is:", "is:", "answer:", "correct option is:"], [letter, name]))

def score_choice(prediction, label):  # label: [option text, letter]
    pred = prediction.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = squeeze(pred, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"])
    found = after_prefix(pred, ["answer is:", "answer:", "answer is", "option is"], label)
    if found is not None:
        return found
    return next((word in label for word in pred.split() if word in "ABCD"), False)  # the first A-D word

def score_math_find(prediction, label):  # the first number, compared as the label's type
    label, found = number(first(label)), re.search(r"\d+\.\d+|\d+", prediction)
    try:
        return found is not None and (int if isinstance(label, int) else float)(found.group(0)) == label
    except ValueError:  # "3.5" for an integer label
        return False

def score_math_calc(prediction, label):  # the share of values right from the first until the first wrong one
    label = label[0] if isinstance(label[0], list) else label
    values = [int(x) for x in re.split("[^0-9]", prediction) if x]  # digits only: a minus sign is lost, as theirs
    pairs = list(zip(label, values))
    return next((i for i, (want, got) in enumerate(pairs) if want != got), len(pairs)) / len(label)

IB_SCORERS = {
    "passkey": score_first_int, "number_string": score_first_int,
    "kv_retrieval": lambda p, label: first(label) in squeeze(p, KV_SPLIT).split(),
    "longdialogue_qa_eng": lambda p, label: first(label) in [w.upper() for w in squeeze(p.strip(), KV_SPLIT).split()],
    "longbook_sum_eng": rouge_lsum,
    "longbook_choice_eng": score_choice,
    "longbook_qa_eng": lambda p, label: token_f1(p, [label] if isinstance(label, str) else label),
    "longbook_qa_chn": lambda p, label: max(f1(list(normalize_zh(p)), list(normalize_zh(a)))  # one character
                                            for a in ([label] if isinstance(label, str) else label)),  # one token
    "math_find": score_math_find, "math_calc": score_math_calc, "code_run": score_code_run,
    "code_debug": score_code_debug,
}

# ---- LV-Eval's scorers (metrics.py), through DATASET_METRIC -------------------------------------------------
def jieba():  # imported only for LV-Eval's Chinese datasets
    return data.optional_import("jieba", "LV-Eval's Chinese datasets (jieba segments their words)")

def lv_words(text: str, chinese: bool) -> list[str]:  # normalised words: English by spaces, Chinese by jieba
    if not chinese:
        return normalize_answer(text).split()
    return [w for w in map(normalize_zh, jieba().cut(text, cut_all=False)) if w]

def lv_f1(prediction: str, reference: str, keywords, chinese: bool, floor: float | None) -> float:
    """qa_f1(_zh)_score, and with floor the _with_gold_ans variants: the share of the answer keywords found in
    the prediction (blacklisted words not counted) below the floor (0.2, Chinese 0.4) scores 0."""
    pred, ref = lv_words(prediction, chinese), lv_words(reference, chinese)
    keywords = keywords or (reference if chinese else None)  # the Chinese variant falls back on the answer
    if floor and keywords:
        gold = lv_words(keywords, chinese)
        found = collections.Counter(pred) & collections.Counter(gold)
        blacklist = ABANDON_ZH if chinese else ABANDON_EN
        if sum(n for w, n in found.items() if w not in blacklist) / max(len(gold), 1) < floor:
            return 0.0
    return f1(pred, ref)

def lv_rouge_zh(prediction: str, reference: str, keywords=None) -> float:
    """rouge_zh_score_blacklist: jieba's words of the space-joined jieba words (it segments twice), normalised,
    blacklisted words dropped, then the `rouge` package's ROUGE-L."""
    words = lambda t: [normalize_zh(w) for w in jieba().cut(" ".join(jieba().cut(t, cut_all=False)), cut_all=False)]
    return rouge_l(*(" ".join(w for w in words(t) if w not in ABANDON_ZH) for t in (prediction, reference)))

LV_FUNCTIONS = {  # metrics.py's, by name
    "qa_f1_score": lambda p, r, k: lv_f1(p, r, k, False, None),
    "qa_f1_score_with_gold_ans": lambda p, r, k: lv_f1(p, r, k, False, 0.2),
    "qa_f1_zh_score": lambda p, r, k: lv_f1(p, r, k, True, None),
    "qa_f1_zh_score_with_gold_ans": lambda p, r, k: lv_f1(p, r, k, True, 0.4),
    "rouge_zh_score_blacklist": lv_rouge_zh}
def score(bench: str, task: str, prediction: str, answers, keywords=None) -> float:
    """One item's score, 0 to 1: InfiniteBench's scorer of the task; LV-Eval's metric of the dataset against its
    first reference answer only (evaluation.py's scorer breaks after one)."""
    if bench == "infinitebench":
        return float(IB_SCORERS[task](prediction, answers))
    return float(LV_FUNCTIONS[LV_METRIC[lv_name(task)[0]]](prediction, answers[0], keywords))

# ---- Reading the benchmarks' files ---------------------------------------------------------------------------
def find_files(bench: str, folder: str, tasks: list[str], levels: list[str]) -> list[tuple[str, str]]:
    """[(task, path)] of the benchmark's own files in folder, those absent named once. InfiniteBench:
    folder/<task>.jsonl; LV-Eval: folder/<dataset>_<level>.jsonl, or inside folder/<dataset>/ (as its zips unpack)."""
    found = []
    names = [(t, t) for t in tasks] if bench == "infinitebench" else [(f"{d}_{n}", d) for d in tasks for n in levels]
    for task, sub in names:
        path = next((p for p in (os.path.join(folder, f"{task}.jsonl"), os.path.join(folder, sub, f"{task}.jsonl"))
                     if os.path.isfile(p)), None)
        if path is None:
            print(f"skipped {task}: there is no {task}.jsonl in {folder}")
        else:
            found.append((task, path))
    refuse([(not found, f"--data {folder} holds none of the {bench} files asked for")])
    return found

def bench_records(bench: str, task: str, path: str) -> Iterator[dict]:
    """One record at a time (InfiniteBench's books are ~200K tokens each): its task, line, id, filled prompt,
    answers, generation budget; LV-Eval's also its answer keywords, question and length in words."""
    for line, r in data.read_jsonl(path):
        try:
            if bench == "infinitebench":
                yield dict(task=task, line=line, id=r.get("id", line), text=ib_prompt(task, r),
                           answers=ib_answer(task, r), budget=IB_BUDGET[task])
                continue
            dataset, answers = lv_name(task)[0], r["answers"]
            if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
                raise ValueError("its 'answers' is not a non-empty list of strings")
            yield dict(task=task, line=line, id=line, text=LV_PROMPT[dataset].format(**r), answers=answers,
                       keywords=r.get("answer_keywords"), budget=LV_BUDGET[dataset], question=r.get("input"),
                       words=r.get("length"))
        except (KeyError, IndexError, ValueError, TypeError) as e:
            why = f"it has no {e} field" if isinstance(e, KeyError) else str(e)
            raise UserError(f"{path} line {line}: not {bench} {task} record ({why})") from None

def bench_sample(tok, it: dict, bench: str, max_len: int | None, window: int, chat: bool) -> dict:
    """A record's filled prompt cut in the middle to --max-len tokens as its benchmark cuts it (default:
    InfiniteBench, the window less the task's budget and the chat frame; LV-Eval, the window less 500), framed."""
    frame, budget = len(prompt_tokens(tok, "", "", chat)[0]), it["budget"]
    max_len = max_len or window - (budget + frame if bench == "infinitebench" else LV_RESERVE)
    refuse([(max_len < 2, f"{it['task']}: the window of {window} tokens leaves no room for a prompt beside its "
                          f"{budget}-token answer; pass --max-len, or --tasks without it")])
    text, cut = cut_middle(tok, it["text"], max_len, bench)
    tokens = prompt_tokens(tok, text, "", chat)[0]
    return dict({k: v for k, v in it.items() if k not in ("text", "budget")}, tokens=tokens, max_new_tokens=budget,
                truncated=cut, length=len(tokens) + budget)

def prediction_record(bench: str, it: dict) -> dict:  # an item as the benchmark's own prediction files hold it
    if bench == "infinitebench":  # eval_yarn_mistral.py's preds_<task>.jsonl
        return dict(id=it["id"], prediction=it["prediction"], ground_truth=it["answers"])
    return dict(pred=it["prediction"], answers=it["answers"], gold_ans=it["keywords"], input=it["question"],
                length=it["words"])  # prediction.py's <dataset>_<level>.jsonl

def read_predictions(bench: str, paths: list[str]) -> list[dict]:
    """Predictions made elsewhere, in the benchmark's own files: InfiniteBench's preds_<task>.jsonl ('prediction'
    or 'pred'; 'ground_truth' or 'label'), LV-Eval's <dataset>_<level>.jsonl ('pred', 'answers', 'gold_ans')."""
    ib, items = bench == "infinitebench", []
    for path in paths:
        stem = os.path.basename(path).removesuffix(".jsonl")
        task = stem.removeprefix("preds_") if ib else stem
        known = task in IB_TASKS and stem != task if ib else lv_name(stem) in {(d, n) for d in LV_DATASETS for n in LV_LEVELS}
        refuse([(not known, f"{path}: {bench}'s prediction files are named " + (
            "preds_<task>.jsonl after one of its 12 tasks" if ib else "<dataset>_<level>.jsonl (levels 16k ... 256k)"))])
        fields = (["prediction", "pred"], ["ground_truth", "label"]) if ib else (["pred"], ["answers"])
        for line, r in data.read_jsonl(path):
            pred, label = (next((r[k] for k in keys if k in r), None) for keys in fields)
            refuse([(not isinstance(pred, str) or label is None or not ib and not (isinstance(label, list) and label),
                     f"{path} line {line}: a prediction record needs a string '{fields[0][0]}' and '{fields[1][0]}'"
                     + (" (a non-empty list)" if not ib else ""))])
            items.append(dict(task=task, id=r.get("id", line), prediction=pred, answers=label, keywords=r.get("gold_ans")))
    return items

def table(bench: str, items: list[dict]) -> tuple[dict, dict, list[str], list[list]]:
    """(aggregate: each task's score on the benchmark's scale, 0-100; the averages; the table's header, rows).
    InfiniteBench: a mean x 100 per task, unrounded; LV-Eval: round(100 x mean, 2) per <dataset>_<level>, as its
    evaluation.py rounds, and per level the average over the datasets run there."""
    scores = collections.defaultdict(list)
    for it in items:
        scores[it["task"]].append(it["scores"][bench])
    aggregate = {t: sum(s) / len(s) * 100 if bench == "infinitebench" else round(100 * sum(s) / len(s), 2)
                 for t, s in scores.items()}
    if bench == "infinitebench":
        summary = dict(average=sum(aggregate.values()) / len(aggregate), tasks=len(aggregate))
        rows = [[t, f"{aggregate[t]:.2f}", len(scores[t])] for t in IB_TASKS if t in aggregate]
        return aggregate, summary, ["task", "score", "items"], rows + [
            ["average", f"{summary['average']:.2f}", f"{len(aggregate)} of {len(IB_TASKS)} tasks"]]
    levels = [n for n in LV_LEVELS if any(lv_name(t)[1] == n for t in aggregate)]
    ran = {n: {d: aggregate[f"{d}_{n}"] for d in LV_DATASETS if f"{d}_{n}" in aggregate} for n in levels}
    rows = [[d, *[ran[n].get(d, "-") for n in levels]] for d in LV_DATASETS if any(d in ran[n] for n in levels)]
    summary = dict(average={n: round(sum(v.values()) / len(v), 2) for n, v in ran.items()},
                   datasets={n: len(v) for n, v in ran.items()})
    return aggregate, summary, ["dataset", *levels], rows + [
        ["average", *[f"{summary['average'][n]} ({len(ran[n])} of {len(LV_DATASETS)} datasets)" for n in levels]]]
