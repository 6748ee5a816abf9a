"""RULER (Hsieh et al., 2024) built as NVIDIA/RULER builds it, so that our scores stand beside the
paper's table (the average of the 13 tasks at each length: Llama-3.1-8B-Instruct 61.3 below 1M,
UltraLong-1M 79.1). Followed: scripts/synthetic.yaml (the 13 tasks), scripts/data/synthetic/
constants.py (templates, answer prefixes, generation budgets), template.py ('meta-llama3': a user
turn with no system turn), the generators niah.py, variable_tracking.py, common_words_extraction.py,
freq_words_extraction.py, qa.py, and scripts/eval (string_match_all / string_match_part).

A prompt is the whole framed text, answer prefix included; RULER stores it split at the prefix
(`input`, `answer_prefix`), and its length accounting is tokens(prompt) + budget <= the length.
Where we differ, and why: random draws come from our own seeded generators (the same distributions,
not the same samples); the essay haystack is split into sentences by a rule (after . ! or ?
followed by a space) instead of nltk's punkt; adjective-noun keys are drawn as an adjective and a
noun (RULER draws from the set of all pairs: the same distribution but for the rare duplicates).
"""

import gzip, itertools, json, math, os, random, re, uuid
from collections.abc import Iterator

import data, rope
from rope import UserError

FRAME = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n")  # RULER's 'meta-llama3' template
NIAH = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128)
VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
      "Question: Find all variables that are assigned the value {query} in the text above.",
      " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
      "assigned the value {query}, they are: ", 30)
CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
       "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
       " Answer: The top 10 words that appear most often in the list are:", 120)
FWE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
       "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
       "the dots '....'. What are the three most frequently appeared words in the above coded text?",
       " Answer: According to the coded text above, the three most frequently appeared words are:", 50)
QA = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
      "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
      "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
      " Answer:", 32)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)): needle depths in %
ZETA_2 = math.pi ** 2 / 6  # zeta(alpha) for fwe's Zipf counts, alpha = 2 (synthetic.yaml)

KINDS = {"niah": NIAH, "vt": VT, "cwe": CWE, "fwe": FWE, "qa": QA}  # (template, answer prefix, budget)
# synthetic.yaml: niah (haystack, key type, value type, keys, values per key, queries)
TASKS = {"niah_single_1": ("niah", "noise", "words", "numbers", 1, 1, 1),
         "niah_single_2": ("niah", "essay", "words", "numbers", 1, 1, 1),
         "niah_single_3": ("niah", "essay", "words", "uuids", 1, 1, 1),
         "niah_multikey_1": ("niah", "essay", "words", "numbers", 4, 1, 1),
         "niah_multikey_2": ("niah", "needle", "words", "numbers", 1, 1, 1),
         "niah_multikey_3": ("niah", "needle", "uuids", "uuids", 1, 1, 1),
         "niah_multivalue": ("niah", "essay", "words", "numbers", 1, 4, 1),
         "niah_multiquery": ("niah", "essay", "words", "numbers", 1, 1, 4),
         "vt": ("vt",), "cwe": ("cwe",), "fwe": ("fwe",), "qa_1": ("qa", "squad"), "qa_2": ("qa", "hotpotqa")}
SPECIAL = re.compile(r"(<\|(?:begin_of_text|start_header_id|end_header_id|eot_id)\|>)")

def budget(task: str) -> int:  # the task's tokens_to_generate (constants.py), counted in the length
    return KINDS[TASKS[task][0]][2]

def encode(tok, text: str) -> list[int]:
    """Token ids of a RULER prompt: the frame's special tokens by id, the text between them encoded
    as text (what a Hugging Face tokenizer does with the template's strings)."""
    return [t for piece in SPECIAL.split(text) if piece
            for t in ([tok.token_id(piece)] if SPECIAL.fullmatch(piece) else tok.encode(piece))]

def load_words() -> dict[str, list[str]]:
    """ruler_words.txt.gz: the wonderwords lists RULER uses, and a large English list (see its header)."""
    words, section = {}, None
    with gzip.open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ruler_words.txt.gz"), "rt") as f:
        for line in map(str.rstrip, f):  # as wonderwords reads its lists
            if line.startswith("[") and line.endswith("]"):
                section = words.setdefault(line[1:-1], [])
            elif section is not None and not line.startswith("#"):
                section.append(line)
    return words

def read_sources(haystack, squad, hotpotqa) -> dict:
    """The data RULER downloads, from the user's files: essays (.txt files, folders of them, or RULER's
    PaulGrahamEssays.json), SQuAD v2.0 dev JSON, HotpotQA dev distractor JSON. None: not given."""
    texts = []
    for path in haystack or []:
        for file in (sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns if n.endswith(".txt"))
                     if os.path.isdir(path) else [path]):
            with open(file, encoding="utf-8") as f:
                texts.append(json.load(f)["text"] if file.endswith(".json") else f.read())
    essay = re.sub(r"\s+", " ", " ".join(texts)).split(" ") if haystack else None  # RULER's haystack: a list of words
    return {"essay": essay, "squad": squad and read_qa(squad, "squad"),
            "hotpotqa": hotpotqa and read_qa(hotpotqa, "hotpotqa")}

def read_qa(path: str, kind: str):
    """(questions, documents) as qa.py reads them: SQuAD's answerable questions with their paragraph
    (and the article's other paragraphs as preferred distractors), or HotpotQA's with its contexts."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if kind == "squad":
            docs = sorted({p["context"] for d in raw["data"] for p in d["paragraphs"]})
            index = {c: i for i, c in enumerate(docs)}
            qas = [{"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                    "context": [index[p["context"]]],
                    "more": [index[o["context"]] for o in d["paragraphs"] if o["context"] != p["context"]]}
                   for d in raw["data"] for p in d["paragraphs"] for q in p["qas"] if not q["is_impossible"]]
        else:
            docs = sorted({f"{t}\n{''.join(p)}" for d in raw for t, p in d["context"]})
            index = {c: i for i, c in enumerate(docs)}
            qas = [{"query": d["question"], "outputs": [d["answer"]], "more": [],
                    "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in raw]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--{kind}: {path} is not a readable {kind} JSON file ({type(e).__name__}: {e})") from None
    return qas, docs

def unavailable(task: str, sources: dict) -> str | None:
    """Why a task cannot run with the given sources (never a silent substitute under RULER's name)."""
    spec = TASKS[task]
    if spec[0] == "niah" and spec[1] == "essay" and sources["essay"] is None:
        return "needs essays for its haystack (--haystack: .txt files or folders, or PaulGrahamEssays.json)"
    if spec[0] == "qa" and sources[spec[1]] is None:
        return f"needs --{spec[1]} ({'SQuAD v2.0 dev' if spec[1] == 'squad' else 'HotpotQA dev distractor'} JSON)"

def draw(rng: random.Random, kind: str, words: dict) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # 7 digits
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(words['adjectives'])}-{rng.choice(words['nouns'])}"

def insert_at_depths(rng, words: list[str], items: list[str]) -> str:
    """Essay haystack: the first words joined, cut into sentences, an item placed at each of a few
    depths drawn from DEPTHS (niah.py, variable_tracking.py)."""
    sentences = re.split(r"(?<=[.!?]) ", " ".join(words).strip())
    cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(items))) + [len(sentences)]
    chunks = [" ".join(sentences[a:b]) for a, b in zip(cuts, cuts[1:])]  # one more than the items
    return " ".join([x for chunk, item in zip(chunks, items) for x in (chunk, item)] + chunks[-1:])

def make_niah(rng, n, spec, words, sources, seed, template):
    _, haystack, k_type, v_type, n_keys, n_values, n_queries = spec
    keys, values, needles = [], [], []
    for _ in range(max(n_keys, n_queries)):
        keys.append(draw(rng, k_type, words))
        values.append([draw(rng, v_type, words) for _ in range(n_values)])
        needles += [NEEDLE.format(type_needle_v=v_type, key=keys[-1], value=v) for v in values[-1]]
    random.Random(seed).shuffle(needles)
    if haystack == "essay":  # the first n words, the essays repeated as needed
        context = insert_at_depths(rng, list(itertools.islice(itertools.cycle(sources["essay"]), n)), needles)
    else:
        lines = [NOISE] * n if haystack == "noise" else [
            NEEDLE.format(type_needle_v=v_type, key=draw(rng, k_type, words), value=draw(rng, v_type, words))
            for _ in range(n)]
        for at, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            lines.insert(at, needle)
        context = "\n".join(lines)
    picked = rng.sample(range(len(keys)), n_queries)
    queries = [keys[i] for i in picked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    if n_queries * n_values == 1:  # niah.py's singular wording
        for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(plural, singular)
        v_type = v_type[:-1]
    return template.format(type_needle_v=v_type, context=context, query=query), [v for i in picked for v in values[i]]

def make_vt(rng, n, template, icl=False, hops=4):
    """One chain of 5 variables (num_chains 1, num_hops 4) in the noise haystack. The one-shot
    example (icl) has 3-letter names and the value 12345 and carries no chat frame."""
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=3 if icl else 5))
        names += [name] if name not in names else []
    value = "12345" if icl else str(rng.randint(10000, 99998))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    lines = [NOISE] * n
    for j, at in enumerate(sorted(rng.sample(range(n), len(chain)))):
        lines.insert(at + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    return template.format(context=context, query=value, num_v=hops + 1), names

def make_cwe(rng, n, length, words, seed, template):
    """A numbered list where 10 words appear often; one solved example first, framed like the task."""
    def example(n_words, common_repeats, uncommon_repeats):
        pool = words["cwe"] if n_words <= len(words["cwe"]) else words["english"]
        if n_words > len(pool):  # RULER draws from a 470K-word list there; ours holds 247K
            raise UserError(f"cwe at {length} tokens needs {n_words} distinct words; ruler_words.txt.gz has {len(pool)}")
        picked = rng.sample(pool, n_words)
        listed = picked[:10] * common_repeats + picked[10:] * uncommon_repeats
        random.Random(seed).shuffle(listed)
        return template.format(context=" ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))), picked[:10]
    short = length < 4096  # common_words_extraction.py's repeats for short and long lengths
    shot, shot_answer = example(20 if short else 40, 3 if short else 10, 1 if short else 3)
    text, answer = example(n, 6 if short else 30, 1 if short else 3)
    return shot + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer)) + "\n" + text, answer

def make_fwe(rng, n_words, vocab_size, seed, template):
    """Zipf-distributed 6-letter coded words (alpha 2); rank 1 is '...' (noise), the answer ranks 2-4."""
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6)))
    vocab = sorted(vocab)
    random.Random(seed).shuffle(vocab)
    vocab[0] = "..."
    coded = [w for k, w in enumerate(vocab, 1) for _ in range(int(n_words * k ** -2.0 / ZETA_2))]
    random.Random(seed).shuffle(coded)
    return template.format(context=" ".join(coded)), vocab[1:4]

def make_qa(rng, n_docs, question, qa, seed, template):
    """The question's own documents, then its article's other paragraphs, then random others."""
    qas, docs = qa
    q = qas[question % len(qas)]
    own, more = q["context"], q["more"]
    if n_docs >= len(docs):
        chosen = list(itertools.islice(itertools.cycle(docs), n_docs))
    elif n_docs - len(own) > len(more):
        others = [i for i in range(len(docs)) if i not in set(own + more)]
        chosen = [docs[i] for i in own + more + rng.sample(others, n_docs - len(own) - len(more))]
    else:
        chosen = [docs[i] for i in own + rng.sample(more, max(0, n_docs - len(own)))]
    random.Random(seed).shuffle(chosen)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(chosen))
    return template.format(context=context, query=q["query"]), q["outputs"]

def generator(task, tok, length, seed, sources, words, frame):
    """(make(n, i) -> (prompt, answers) for sample i with haystack size n, the step RULER searches
    the size in, the generation budget). frame: FRAME, or "{task_template}" (RULER's 'base')."""
    spec, rng = TASKS[task], random.Random(seed)
    template = frame.format(task_template=KINDS[spec[0]][0]) + KINDS[spec[0]][1]
    if spec[0] == "niah":
        step = 500 if spec[1] == "essay" else (5 if length < 4096 else 25)
        return (lambda n, i: make_niah(rng, n, spec, words, sources, seed, template)), step, NIAH[2]
    if spec[0] == "vt":  # the one-shot example: the largest that fits 500 tokens, answered, unframed
        shot, names = make_vt(rng, fit(lambda n, i: make_vt(rng, n, VT[0] + VT[1], True), tok, 500, 0, 5),
                              VT[0] + VT[1], True)
        shot += " " + " ".join(names) + "\n"
        def make_vt_with_shot(n, i):
            text, answer = make_vt(rng, n, template)
            example = shot
            for name in names:  # the example's names and value, drawn anew for every sample
                example = example.replace(name, "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=len(name))))
            example = example.replace("12345", str(rng.randint(10000, 99998)))
            cut = text.index(VT[0][:20])
            return text[:cut] + example + "\n" + text[cut:], answer
        return make_vt_with_shot, 5 if length < 4096 else 10, VT[2]
    if spec[0] == "cwe":
        return (lambda n, i: make_cwe(rng, n, length, words, seed, template)), 10, CWE[2]
    if spec[0] == "fwe":  # its vocabulary: a 50th of the room; its search step: a 32nd
        room = length - FWE[2]
        return (lambda n, i: make_fwe(rng, n, room // 50, seed, template)), max(1, room // 32), FWE[2]
    return (lambda n, i: make_qa(rng, n, i, sources[spec[1]], seed, template)), 10, QA[2]

def fit(make, tok, length, budget, step) -> int:
    """RULER's length accounting: the largest haystack size n (searched by halving between step and
    ~3x an estimate) with tokens(prompt) + budget <= length."""
    per_item = len(encode(tok, make(step, 0)[0])) / step
    lo, hi, best = step, max(int(length / per_item * 3), 2 * step), None
    while lo <= hi:
        mid = (lo + hi) // 2
        if len(encode(tok, make(mid, 0)[0])) + budget <= length:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best or step

def fit_fwe(make, tok, length, budget, step) -> int:
    """freq_words_extraction.py's search: from a 6th of the room in words, grow by a step until the
    prompt fills the room, then take one step back."""
    n = (length - budget) // 6
    while len(encode(tok, make(n, 0)[0])) < length - budget:
        n += step
    return n - step

def build(task, tok, length, n_samples, seed, sources, words, chat=True) -> Iterator[dict]:
    """RULER's records, one at a time, for one task at one length: index, input (the framed prompt up
    to the answer prefix), outputs (the references), length (tokens of input + prefix, plus the budget),
    answer_prefix, tokens_to_generate. chat=False: no frame (RULER's 'base' template)."""
    words = dict(words, cwe=sorted(set(words["nouns"] + words["adjectives"] + words["verbs"])))
    random.Random(seed).shuffle(words["cwe"])
    make, step, budget = generator(task, tok, length, seed, sources, words, FRAME if chat else "{task_template}")
    n = (fit_fwe if task == "fwe" else fit)(make, tok, length, budget, step)
    prefix = KINDS[TASKS[task][0]][1][:10]
    for i in range(n_samples):
        used = n
        while True:  # a draw that came out longer gives back one step of haystack
            text, answers = make(used, i)
            tokens = len(encode(tok, text)) + budget
            if tokens <= length:
                break
            if used <= step:
                raise UserError(f"--lengths {length} is too short for RULER's {task}: its shortest prompt "
                                f"and {budget}-token answer take {tokens} tokens")
            used -= step
        cut = text.rfind(prefix)
        yield {"index": i, "input": text[:cut], "outputs": answers, "length": tokens,
               "answer_prefix": text[cut:], "tokens_to_generate": budget}

def postprocess(prediction: str) -> str:  # evaluate.py's postprocess_pred: control characters become newlines
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()

def item_score(task: str, prediction: str, references: list[str]) -> float:
    """string_match_part for qa (any reference found), string_match_all for the rest (the share of
    references found), case-insensitive substring matches, as RULER scores them (0-1 per item)."""
    found = [r.lower() in postprocess(prediction).lower() for r in references]
    return float(max(found)) if task.startswith("qa") else sum(found) / len(found)

def task_score(task, predictions, references) -> float:  # as RULER reports it: mean item score x 100, 2 decimals
    return round(sum(map(item_score, [task] * len(predictions), predictions, references)) / len(predictions) * 100, 2)

def read_prepared(folder: str, tasks) -> tuple[dict, dict, int | None]:
    """RULER's own files, folder/<task>/validation.jsonl as its prepare.py writes them: ({task: its file}, {task:
    why} for those without a file, the length named by the nearest folder named as a size: RULER's
    .../synthetic/131072/data). prepared_records reads them."""
    length = next((rope.parse_size(part) for part in reversed(os.path.abspath(folder).split(os.sep))
                   if re.fullmatch(r"[0-9]+[KkMm]?", part)), None)
    paths = {task: os.path.join(folder, task, "validation.jsonl") for task in tasks}
    skipped = {task: f"has no {path}" for task, path in paths.items() if not os.path.isfile(path)}
    return {task: path for task, path in paths.items() if task not in skipped}, skipped, length

def prepared_records(task: str, path: str) -> Iterator[dict]:
    """One record of RULER's file at a time (at 1M tokens, one is megabytes): index, input, outputs, length,
    length_w_model_temp, answer_prefix, token_position_answer, with the task's budget added. The prompt is sent as
    RULER wrote it: input + answer_prefix."""
    for line, r in data.read_jsonl(path):
        outputs = r.get("outputs")
        if not (isinstance(r.get("input"), str) and isinstance(r.get("answer_prefix", ""), str) and
                isinstance(outputs, list) and outputs and all(isinstance(o, str) for o in outputs)):
            raise UserError(f"{path} line {line}: not a RULER record (a string 'input' and 'answer_prefix', "
                            f"and 'outputs', a non-empty list of strings)")
        yield dict(r, index=r.get("index", line), answer_prefix=r.get("answer_prefix", ""),
                   tokens_to_generate=budget(task))
