"""Tests for data.py: nothing lost, nothing invented, Llama 3.1's chat format token for token,
bad input named by file and line. Randomized checks loop over fixed seeds (no hypothesis)."""

import gzip
import itertools
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

import attention
import data
import sft
from rope import UserError


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(None)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def make_token_file(tmp_path, lengths, domains=None, seed=0, name="tf"):
    """A token file whose documents have the given lengths; token values are random."""
    rng = np.random.default_rng(seed)
    batches = [(rng.integers(0, 500, size=n, dtype=np.uint32), [n], [domains[k] if domains else "default"])
               for k, n in enumerate(lengths)]
    return data.write_token_file(str(tmp_path / name), batches)


def small_chats(n, seed):
    """n short conversations (a sum, or a copy of random letters) to pack."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        a, b, word = rng.randint(0, 999), rng.randint(0, 999), "".join(rng.choices("abcdefgh", k=rng.randint(6, 24)))
        question, answer = rng.choice([(f"What is {a} + {b}?", str(a + b)), (f"Copy this exactly: {word}", word)])
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats


def random_text(rng, n):
    alphabet = "abc xyz\n\t  é漢字🙂<|>s'0123456789.,;"
    return "".join(rng.choice(alphabet) for _ in range(n))


LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A small BPE tokenizer laid out like Llama 3's (regex split + byte level, merges learned
    here), saved as a model directory with the Llama 3.1 chat template."""
    import tokenizers
    from tokenizers import pre_tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["The assistant answers the user's question.\n\n" * 3, "What is 12 + 30? It is 42.\n",
              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "system user assistant"]
    backend.train_from_iterator(corpus * 20, trainer=trainer)
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in data.LLAMA3_SPECIAL_TOKENS]
    )
    out = tmp_path_factory.mktemp("bpe")
    backend.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": data.LLAMA31_CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

def test_builtin_tokenizer_layout(tok):
    assert tok.vocab_size == 512
    assert tok.token_id("<|begin_of_text|>") == 256 == tok.bos_id
    assert [tok.token_id(t) for t in data.LLAMA3_NAMED_SPECIAL_TOKENS] == list(range(256, 264))
    assert tok.token_id("<|reserved_special_token_247|>") == 511
    assert tok.eos_id == tok.token_id("<|end_of_text|>")
    assert set(tok.stop_ids) == {tok.token_id(t) for t in ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]}
    assert tok.pad_id == tok.token_id("<|finetune_right_pad_id|>")
    assert tok.source_dir is None and tok.chat_template == data.LLAMA31_CHAT_TEMPLATE
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        tok.token_id("<|nope|>")


def test_builtin_encode_is_utf8_and_specials_stay_text(tok):
    rng = random.Random(0)
    for _ in range(50):
        text = random_text(rng, rng.randint(0, 200))
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        # the byte fast path must agree with the real tokenizers object it stands in for
        assert tok._backend.encode(text, add_special_tokens=False).ids == ids
    assert tok.encode("<|eot_id|>") == list(b"<|eot_id|>")
    flat, lengths = tok.encode_flat(["ab", "é"])
    assert flat.dtype == np.uint32 and flat.tolist() == [97, 98, 195, 169] and lengths.tolist() == [2, 2]


def test_tokenizer_save_load_roundtrip(tok, tmp_path):
    tok.save(str(tmp_path))
    loaded = data.load_tokenizer(str(tmp_path))
    assert loaded.identity == tok.identity and loaded._bytes_are_ids
    for attr in ["vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "chat_template"]:
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    assert loaded.source_dir == str(tmp_path)
    text = "héllo <s> <|eot_id|>"
    assert loaded.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert data.format_chat(loaded, msgs) == data.format_chat(tok, msgs)

    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf("abc é", add_special_tokens=False)["input_ids"] == tok.encode("abc é")
    assert len(hf) == 512


def test_bpe_tokenizer_encode_matches_library(bpe_dir):
    bpe = data.load_tokenizer(bpe_dir)
    assert not bpe._bytes_are_ids
    rng = random.Random(1)
    texts = [random_text(rng, rng.randint(0, 300)) for _ in range(30)]
    import tokenizers
    raw = tokenizers.Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    raw.encode_special_tokens = True
    expected = [raw.encode(t, add_special_tokens=False).ids for t in texts]
    assert [bpe.encode(t) for t in texts] == expected
    flat, lengths = bpe.encode_flat(texts)
    assert flat.tolist() == [i for ids in expected for i in ids]
    assert lengths.tolist() == [len(ids) for ids in expected]


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(UserError, match="has no tokenizer.json"):
        data.load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# chat formatting
# ----------------------------------------------------------------------------------------------

def random_conversation(rng):
    words = ["hello", " world", "  padded  ", "\n", "What is 2+2?", "4", "é漢", "it's", "", "a\n\nb", "<s>"]
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "".join(rng.choice(words) for _ in range(rng.randint(0, 4)))})
    for turn in range(rng.randint(1, 3)):
        for role in ["user", "assistant"]:
            messages.append({"role": role, "content": "".join(rng.choice(words) for _ in range(rng.randint(0, 5)))})
    if rng.random() < 0.3:
        messages.pop()  # ends on a user turn
    return messages


def hf_tokenizer(tokenizer_dir, template):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"))
    hf.chat_template = template
    hf.bos_token = "<|begin_of_text|>"
    return hf


@pytest.mark.parametrize("which", ["builtin", "bpe"])
def test_format_chat_matches_llama31_template(which, tok, bpe_dir, tmp_path):
    if which == "builtin":
        tok.save(str(tmp_path))
        ours, tokenizer_dir = tok, str(tmp_path)
    else:
        ours, tokenizer_dir = data.load_tokenizer(bpe_dir), bpe_dir
    hf = hf_tokenizer(tokenizer_dir, data.LLAMA31_CHAT_TEMPLATE)
    rng = random.Random(2)
    for _ in range(40):
        messages = random_conversation(rng)
        for generation_prompt in [False, True]:
            tokens, mask = data.format_chat(ours, messages, add_generation_prompt=generation_prompt)
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert tokens == hf(text, add_special_tokens=False)["input_ids"], text
            assert len(mask) == len(tokens)
            assert tokens[0] == ours.bos_id

        # The mask covers exactly each assistant turn's content and its <|eot_id|>.
        tokens, mask = data.format_chat(ours, messages)
        runs, current = [], []
        for t, m in zip(tokens, mask):
            if m:
                current.append(t)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        expected = [m["content"].strip() for m in messages if m["role"] == "assistant"]
        assert [ours.decode(r) for r in runs] == [c + "<|eot_id|>" for c in expected]


def test_format_chat_llama3_template_and_generation_prompt(tok):
    llama3_template = (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    llama3 = data.Tokenizer(tok._backend, {"chat_template": llama3_template})
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": " Q "}]
    tokens, mask = data.format_chat(llama3, messages, add_generation_prompt=True)
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert llama3.decode(tokens) == expected and not any(mask)


def test_format_chat_rejects_bad_messages(tok):
    with pytest.raises(UserError, match="unknown role 'robot'"):
        data.format_chat(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(UserError, match="not a non-empty list"):
        data.format_chat(tok, [])
    with pytest.raises(UserError, match="content that is not a string"):
        data.format_chat(tok, [{"role": "user", "content": None}])


# ----------------------------------------------------------------------------------------------
# ingestion
# ----------------------------------------------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_build_token_file_reads_all_formats_exactly(tok, tmp_path):
    rng = random.Random(3)
    corpus = tmp_path / "corpus"
    (corpus / "books").mkdir(parents=True)
    jsonl_texts = [random_text(rng, rng.randint(1, 400)) for _ in range(30)]
    write_jsonl(corpus / "web.jsonl", [{"text": t, "domain": "web" if i % 2 else "news"} for i, t in enumerate(jsonl_texts)])
    with gzip.open(corpus / "code.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "def f(): pass"}) + "\n\n")  # blank lines are not records
    (corpus / "books" / "a.txt").write_text("first book\n", encoding="utf-8")
    (corpus / "books" / "b.md").write_text("second book é\n", encoding="utf-8")
    (corpus / "books" / ".hidden").write_text("not read", encoding="utf-8")

    tf = data.build_token_file([str(corpus)], tok, str(tmp_path / "cache"), log=None)
    # directory walk order: books/a.txt, books/b.md, code.jsonl.gz, web.jsonl
    texts = ["first book\n", "second book é\n", "def f(): pass"] + jsonl_texts
    domains = ["books", "books", "code"] + ["web" if i % 2 else "news" for i in range(30)]
    assert tf.n_docs == len(texts)
    for k, text in enumerate(texts):
        assert tf.doc(k).tolist() == tok.encode(text)
        assert tf.domain_names[tf.domains[k]] == domains[k]
    assert tf.tokens.dtype == np.uint32 and tf.n_tokens == sum(len(tok.encode(t)) for t in texts)
    assert (tf.offsets == np.concatenate([[0], np.cumsum(tf.lengths)[:-1]])).all()

    # globs and single files name the same documents
    tf_glob = data.build_token_file([str(corpus / "books" / "*.txt"), str(corpus / "web.jsonl")], tok,
                                    str(tmp_path / "cache"), log=None)
    assert tf_glob.n_docs == 31 and tf_glob.doc(0).tolist() == tok.encode("first book\n")


def test_build_token_file_is_cached_and_rebuilt_on_change(tok, tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": "one"}, {"text": "two"}])
    logs = []
    first = data.build_token_file([str(path)], tok, str(tmp_path / "cache"), log=logs.append)
    second = data.build_token_file([str(path)], tok, str(tmp_path / "cache"), log=logs.append)
    assert second.path == first.path and logs[-1].startswith("reusing")
    assert not [p for p in os.listdir(tmp_path / "cache") if ".tmp-" in p]  # nothing half-written left
    write_jsonl(path, [{"text": "one"}, {"text": "two"}, {"text": "three"}])
    os.utime(path, ns=(1, 1))  # also a new mtime
    third = data.build_token_file([str(path)], tok, str(tmp_path / "cache"), log=None)
    assert third.path != first.path and third.n_docs == 3


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": "broken\n', r"bad\.jsonl line 2: malformed JSON"),
        (b'{"text": "ok"}\n\n{"body": "x"}\n', r"bad\.jsonl line 3: the record has no 'text' field"),
        (b'{"text": 5}\n', r"bad\.jsonl line 1: the record has a 'text' field that is not a string"),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"bad\.jsonl line 2: undecodable bytes"),
        (b'[1, 2]\n', r"bad\.jsonl line 1: the record is not a JSON object"),
        (b'{"text": "\\ud800"}\n', r"bad\.jsonl line 1: 'text' holds an unpaired surrogate"),
    ],
)
def test_bad_jsonl_names_file_and_line(tok, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        data.build_token_file([str(path)], tok, str(tmp_path / "cache"), log=None)
    assert not os.listdir(tmp_path / "cache")  # a failed build leaves nothing behind


def test_bad_input_skip_counts(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "good"}, {"nope": 1}, {"text": ""}, {"text": "fine"}])
    (tmp_path / "b.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(UserError, match=r"b\.txt line 2: undecodable bytes"):
        data.build_token_file([str(tmp_path / "b.txt")], tok, str(tmp_path / "cache"), log=None)
    logs = []
    tf = data.build_token_file([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], tok,
                               str(tmp_path / "cache"), skip_bad=True, log=logs.append)
    assert tf.n_docs == 2 and tf.stats["bad_skipped"] == 2 and tf.stats["empty_documents"] == 1
    assert any("skipped 2 bad records and 1 empty documents" in line for line in logs)


def test_skipped_bad_records_are_counted_per_file(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "good"}, {"nope": 1}, {"text": 5}, {"text": "fine"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "good"}, {"body": "x"}])
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(UserError, match=r"a\.jsonl line 2: .*\(pass --skip-bad to skip and count bad records\)"):
        data.build_token_file(paths, tok, str(tmp_path / "cache"), log=None)
    logs = []
    tf = data.build_token_file(paths, tok, str(tmp_path / "cache"), skip_bad=True, log=logs.append)
    assert tf.n_docs == 3 and tf.stats["bad_per_file"] == {paths[0]: 2, paths[1]: 1}
    assert f"skipped 3 bad records: {paths[0]} 2, {paths[1]} 1\n" in logs[-1]


def test_binary_files_are_bad_records(tok, tmp_path):
    (tmp_path / "x.bin").write_bytes(bytes(4096))  # 4 KB of zeros: valid UTF-8, but not text
    (tmp_path / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8) + b"IHDR")
    (tmp_path / "ok.txt").write_text("text\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"x\.bin: a binary file \(NUL byte at byte 0\), not text"):
        data.build_token_file([str(tmp_path / "x.bin")], tok, str(tmp_path / "cache"), log=None)
    with pytest.raises(UserError, match=r"y\.png: a binary file \(NUL byte at byte 8\), not text"):
        data.build_token_file([str(tmp_path / "y.png")], tok, str(tmp_path / "cache"), log=None)
    tf = data.build_token_file([str(tmp_path)], tok, str(tmp_path / "cache"), skip_bad=True, log=None)
    assert tf.n_docs == 1 and tf.doc(0).tolist() == tok.encode("text\n") and tf.stats["bad_skipped"] == 2


def test_json_array_files_are_records(tok, tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two", "domain": "d"}], indent=2), encoding="utf-8")
    tf = data.build_token_file([str(path)], tok, str(tmp_path / "cache"), log=None)
    assert [tf.doc(k).tolist() for k in range(2)] == [tok.encode("one"), tok.encode("two")]
    assert [tf.domain_names[d] for d in tf.domains] == ["export", "d"]
    cases = [
        ('[{"text": "a"}, 5]', r"bad\.json record 1: the record is not a JSON object"),
        ('[{"text": "a"}, {"text": 3}]', r"bad\.json record 1: the record has a 'text' field that is not a string"),
        ('[{"text": "a"},\n {"text": ', r"bad\.json line 2: malformed JSON"),
        ('{"text": "a"}', r"bad\.json does not hold a JSON array of records"),
        ('"a"', r"bad\.json does not hold a JSON array of records"),
    ]
    for content, message in cases:
        (tmp_path / "bad.json").write_text(content, encoding="utf-8")
        with pytest.raises(UserError, match=message):
            data.build_token_file([str(tmp_path / "bad.json")], tok, str(tmp_path / "cache"), log=None)
    # stage 2 reads the same arrays: conversations, a bad one named by its record
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "chat.json").write_text(json.dumps([good, good, {"messages": []}]), encoding="utf-8")
    with pytest.raises(UserError, match=r"chat\.json record 2: 'messages' is not a non-empty list"):
        sft.ChatDataset([(str(tmp_path / "chat.json"), 1.0)], tok, max_len=256, log=None)
    ds = sft.ChatDataset([(str(tmp_path / "chat.json"), 1.0)], tok, max_len=256, skip_bad=True, log=None)
    assert ds.stats["conversations"] == 2 and ds.stats["bad_skipped"] == 1
    assert ds[0]["tokens"][: len(data.format_chat(tok, good["messages"])[0])].tolist() == \
        data.format_chat(tok, good["messages"])[0]


@pytest.mark.parametrize("damage", ["tokens", "meta", "lengths", "domains", "missing"])
def test_damaged_token_cache_is_named_removed_and_rebuilt(tok, tmp_path, damage):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one two"}, {"text": "three"}])
    first = data.build_token_file([str(tmp_path / "a.jsonl")], tok, str(tmp_path / "cache"), log=None)
    name = {"tokens": "tokens.u32", "meta": "meta.json", "lengths": "lengths.npy", "domains": "domains.npy",
            "missing": "lengths.npy"}[damage]
    target = os.path.join(first.path, name)
    if damage == "missing":
        os.remove(target)
    else:
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) - 3)  # cut short, as by a full disk or a copy that died
    with pytest.raises(UserError, match=f"the token file {first.path} is damaged"):
        data.TokenFile(first.path)
    logs = []
    again = data.build_token_file([str(tmp_path / "a.jsonl")], tok, str(tmp_path / "cache"), log=logs.append)
    assert logs[0].startswith(f"the token file {first.path} is damaged") and "tokenizing again" in logs[0]
    assert logs[1].startswith("tokenized") and again.path == first.path
    assert [again.doc(k).tolist() for k in range(2)] == [tok.encode("one two"), tok.encode("three")]


def test_dead_builds_are_removed_live_ones_kept(tok, tmp_path):
    import subprocess
    import sys
    cache = tmp_path / "cache"
    seen = []

    def batches():  # looks at the cache while the token file is being written
        seen.extend(os.listdir(cache))
        yield np.array([1, 2], dtype=np.uint32), [2], ["d"]

    cache.mkdir()
    data.write_token_file(str(cache / "tf"), batches())
    host = os.uname().nodename
    assert len(seen) == 1 and seen[0].startswith(f"tf.tmp-{host}-{os.getpid()}-")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    stale = cache / f"tokens-0123.tmp-{host}-{dead.pid}-0badc0de"
    live = cache / f"tokens-4567.tmp-{host}-{os.getpid()}-12345678"  # another build of this very process
    elsewhere = cache / f"tokens-89ab.tmp-other-{host}-{dead.pid}-12345678"  # another host's: its pids are not ours
    for d in (stale, live, elsewhere):
        (d / "x").mkdir(parents=True)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    logs = []
    data.build_token_file([str(tmp_path / "a.jsonl")], tok, str(cache), log=logs.append)
    assert not stale.exists() and live.exists() and elsewhere.exists()
    assert logs[0] == f"removed {stale}: process {dead.pid} of this host died while writing it"


def test_empty_corpus_and_missing_input(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}])  # a document, without tokens
    empty, blank = str(tmp_path / "empty.jsonl"), str(tmp_path / "blank.jsonl")
    for name in ("empty.jsonl", "empty.json"):
        with pytest.raises(UserError, match=rf"^{tmp_path / name} holds no documents \(pass --skip-bad"):
            data.build_token_file([str(tmp_path / name)], tok, str(tmp_path / "cache"), log=None)
    # a corpus without any document names the inputs as given, not the cache, and prints no dict
    for paths, skip_bad in [([empty], True), ([blank], False), ([empty, blank], True)]:
        with pytest.raises(UserError) as e:
            data.build_token_file(paths, tok, str(tmp_path / "cache"), skip_bad=skip_bad, log=None)
        assert str(e.value) == f"no document of {', '.join(paths)} has any tokens, so the corpus is empty"
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    tf = data.build_token_file([empty, str(tmp_path / "a.jsonl")], tok, str(tmp_path / "cache"), skip_bad=True,
                               log=None)
    assert tf.n_docs == 1 and tf.stats["bad_per_file"] == {empty: 1}
    assert tf.stats["bad_examples"] == [f"{empty} holds no documents"]
    with pytest.raises(UserError, match="neither a file, a directory nor a matching glob"):
        data.build_token_file([str(tmp_path / "nothing*.jsonl")], tok, str(tmp_path / "cache"), log=None)


def write_containers(tmp_path, records, row_group_size):
    """The same records as corpus.jsonl, corpus.parquet (row groups of row_group_size), corpus.jsonl.zst (two
    zstd frames, as pzstd writes) and corpus.json.zst, each in its own folder (the domain is the file's name)."""
    pa, pq, zstd = (pytest.importorskip(m) for m in ("pyarrow", "pyarrow.parquet", "zstandard"))
    paths = {ext: tmp_path / ext / f"corpus.{ext}" for ext in ("jsonl", "parquet", "jsonl.zst", "json.zst")}
    for path in paths.values():
        path.parent.mkdir()
    write_jsonl(paths["jsonl"], records)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("domain", pa.string())])
    rows = [{"id": k, **r} for k, r in enumerate(records)]  # a record without a domain: None in Parquet
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), paths["parquet"], row_group_size=row_group_size)
    lines, half = paths["jsonl"].read_bytes(), len(records) // 2
    cut = len(b"".join(lines.splitlines(keepends=True)[:half]))
    compressor = zstd.ZstdCompressor()
    paths["jsonl.zst"].write_bytes(compressor.compress(lines[:cut]) + compressor.compress(lines[cut:]))
    paths["json.zst"].write_bytes(compressor.compress(json.dumps(records).encode("utf-8")))
    return {ext: str(path) for ext, path in paths.items()}


def test_parquet_and_zstd_corpora_equal_jsonl_token_for_token(tok, tmp_path):
    rng = random.Random(5)
    records = [{"text": random_text(rng, rng.randint(0, 300)), **({"domain": "web"} if k % 3 else {})}
               for k in range(40)]
    records[5]["text"] = ""  # an empty document: dropped alike
    paths = write_containers(tmp_path, records, row_group_size=7)
    import pyarrow.parquet as pq
    assert pq.ParquetFile(paths["parquet"]).num_row_groups == 6
    files = {ext: data.build_token_file([path], tok, str(tmp_path / "cache"), log=None)
             for ext, path in paths.items()}
    expected = files["jsonl"]
    assert expected.domain_names == ["corpus", "web"] and expected.stats["empty_documents"] > 0
    for ext, tf in files.items():
        assert (tf.tokens == expected.tokens).all() and (tf.lengths == expected.lengths).all(), ext
        assert (tf.domains == expected.domains).all() and tf.domain_names == expected.domain_names, ext
        assert tf.stats["empty_documents"] == expected.stats["empty_documents"], ext


def test_parquet_and_zstd_bad_files_and_missing_packages(tok, tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "inputs"
    root.mkdir()
    paths = write_containers(root, [{"text": "one"}, {"text": "two"}], row_group_size=1)
    pq.write_table(pa.table({"id": [1], "content": ["x"]}), root / "other.parquet")
    (root / "broken.parquet").write_bytes(b"PAR1 not a parquet file")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), root / "none.parquet")
    for name, message in [("other.parquet", r"other\.parquet has no 'text' column \(its columns: id, content\)"),
                          ("broken.parquet", r"broken\.parquet: not a readable Parquet file"),
                          ("none.parquet", r"none\.parquet holds no documents")]:
        with pytest.raises(UserError, match=message):
            data.build_token_file([str(root / name)], tok, str(tmp_path / "cache"), log=None)
    tf = data.build_token_file([str(root)], tok, str(tmp_path / "cache"), skip_bad=True, log=None)
    assert tf.n_docs == 8 and tf.stats["bad_skipped"] == 3  # the 4 containers' 2 documents; the 3 bad files
    for module, package, ext in [("pyarrow.parquet", "pyarrow", "parquet"), ("zstandard", "zstandard", "jsonl.zst")]:
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError, as when not installed
        for skip_bad in (False, True):  # a missing package is not a bad record: it is never skipped
            with pytest.raises(UserError) as e:
                data.build_token_file([paths[ext]], tok, str(tmp_path / "cache2"), skip_bad=skip_bad, log=None)
            assert str(e.value) == f"reading {paths[ext]} needs the {package} package: pip install {package}"


def test_builtin_corpus(tok, tmp_path):
    files = data.builtin_corpus_files()
    assert len(files) > 1000 and not any("site-packages" in f for f in files)
    tf = data.build_token_file(None, tok, str(tmp_path), log=None)
    assert tf.n_docs > 1000 and (tf.lengths > 8192).sum() > 100
    assert set(tf.domain_names) == {"stdlib", "stdlib-tests"}
    stats = tf.stats
    assert tf.n_docs + stats["empty_documents"] + stats["bad_skipped"] == len(files)  # every file accounted for
    texts = []
    for path in files[:200]:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError:
            continue
    texts = [t for t in texts if t]
    for k, text in enumerate(texts):
        assert tf.doc(k).tolist() == list(text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# length-based sampling
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def small_thresholds(monkeypatch):
    """Length thresholds for documents of hundreds of tokens, and stronger rates."""
    for name, value in [("SHORT_DOC", 256), ("LONG_DOC", 1024), ("DOWN_RATE", 0.25), ("UP_RATE", 4.0)]:
        monkeypatch.setattr(data, name, value)


def test_sampling_hits_budget_within_one_document(tmp_path, small_thresholds):
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 3000, size=400)
    domains = [["a", "b", "c"][i % 3] for i in range(400)]
    tf = make_token_file(tmp_path, lengths, domains)
    for trial in range(30):
        budget = int(rng.integers(1, 3 * lengths.sum()))
        order = data.sample_by_length(tf, budget, seed=trial, log=None)
        total = tf.lengths[order].sum()
        assert budget <= total < budget + tf.lengths[order[-1]]
        assert order.dtype == np.int64 and order.min() >= 0 and order.max() < tf.n_docs


def test_sampling_shifts_toward_long_documents_and_keeps_domains(tmp_path, small_thresholds):
    rng = np.random.default_rng(5)
    lengths = np.concatenate([rng.integers(10, 256, 600), rng.integers(256, 1024, 300), rng.integers(1025, 4000, 100)])
    domains = ["x" if i % 4 else "y" for i in range(len(lengths))]
    tf = make_token_file(tmp_path, lengths, domains)
    logs = []
    order = data.sample_by_length(tf, int(lengths.sum()), seed=0, log=logs.append)
    sampled = tf.lengths[order]
    long_before = lengths[lengths > 1024].sum() / lengths.sum()
    long_after = sampled[sampled > 1024].sum() / sampled.sum()
    short_before = lengths[lengths < 256].sum() / lengths.sum()
    short_after = sampled[sampled < 256].sum() / sampled.sum()
    assert long_after > 1.5 * long_before and short_after < 0.7 * short_before
    y_before = lengths[tf.domains == tf.domain_names.index("y")].sum() / lengths.sum()
    y_after = sampled[tf.domains[order] == tf.domain_names.index("y")].sum() / sampled.sum()
    assert abs(y_after - y_before) < 0.05
    assert "length-based sampling" in logs[0] and "before" in logs[0] and "after" in logs[0]
    # deterministic given the seed
    again = data.sample_by_length(tf, int(lengths.sum()), seed=0, log=None)
    other = data.sample_by_length(tf, int(lengths.sum()), seed=1, log=None)
    assert (order == again).all() and not np.array_equal(order, other)


def test_sampling_rejects_bad_settings(tmp_path, monkeypatch):
    tf = make_token_file(tmp_path, [10, 20])
    with pytest.raises(UserError, match="budget must be positive"):
        data.sample_by_length(tf, 0, seed=0, log=None)
    monkeypatch.setattr(data, "DOWN_RATE", 0)  # an edited constant that leaves nothing to sample
    with pytest.raises(UserError, match="rate 0"):
        data.sample_by_length(tf, 10, seed=0, log=None)


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------

def test_separator_ids(tok):
    assert data.separator_ids(tok) == list(b"<s>")
    assert data.separator_ids(tok, "bos") == [tok.bos_id]
    assert data.separator_ids(tok, "eos") == [tok.eos_id]
    assert data.separator_ids(tok, "none") == []
    with pytest.raises(UserError, match="unknown separator"):
        data.separator_ids(tok, "</s>")


def test_packing_reproduces_the_stream(tmp_path):
    rng = np.random.default_rng(6)
    for trial in range(25):
        lengths = rng.integers(1, 300, size=int(rng.integers(1, 40)))
        tf = make_token_file(tmp_path, lengths, seed=trial, name=f"tf{trial}")
        order = rng.integers(0, len(lengths), size=int(rng.integers(1, 60)))  # repeats allowed
        sep = [int(s) for s in rng.integers(500, 512, size=int(rng.integers(0, 4)))]
        ctx = int(rng.integers(len(sep) + 1, 200))
        ds = data.PackedDataset(tf, order, ctx, sep)
        stream = np.concatenate([np.concatenate([tf.doc(d), sep]) for d in order]).astype(np.int64)
        items = [ds[i] for i in range(len(ds))]
        tokens = torch.cat([x["tokens"] for x in items]).numpy()
        labels = torch.cat([x["labels"] for x in items]).numpy()
        doc_ids = torch.cat([x["doc_ids"] for x in items]).numpy()
        n = len(stream)
        assert len(ds) == -(-(n - 1) // ctx)
        # the stream's last token is an input only when a padded last sequence holds it
        assert (tokens[:n - 1] == stream[:-1]).all() and (tokens[n:] == 0).all()
        assert len(tokens) == n - 1 or tokens[n - 1] == stream[-1]
        assert (labels[:n - 1] == stream[1:]).all() and (labels[n - 1:] == -100).all()
        # doc ids: every document's tokens and its separator carry its place in the order
        expected_ids = np.repeat(np.arange(len(order)), tf.lengths[order] + len(sep))
        assert (doc_ids[:n - 1] == expected_ids[:-1]).all() and (doc_ids[n:] == -1).all()
        # the whole stream is the inputs plus the last label; minus the separators, it is the
        # sampled documents, exactly and in order
        full = np.append(tokens[: n - 1], labels[n - 2]) if n > 1 else stream
        full_ids = np.append(doc_ids[: n - 1], len(order) - 1)
        bodies = []
        for k, d in enumerate(order):
            piece = full[full_ids == k]
            assert (piece[tf.lengths[d]:] == sep).all()
            bodies.append(piece[: tf.lengths[d]])
        assert (np.concatenate(bodies) == np.concatenate([tf.doc(d) for d in order])).all()
        for x in items:
            assert all(v.shape == (ctx,) and v.dtype == torch.int64 for v in x.values())
            assert (x["positions"] == torch.arange(ctx)).all()
        # any sub-range reads the same as the slice of the whole sequence
        i = int(rng.integers(0, len(ds)))
        a = int(rng.integers(0, ctx))
        b = int(rng.integers(a + 1, ctx + 1))
        part = ds.read(i, a, b)
        for key in part:
            assert (part[key] == items[i][key][a:b]).all()


def test_packing_doc_mask_positions(tmp_path):
    tf = make_token_file(tmp_path, [5, 12, 3])
    ds = data.PackedDataset(tf, [0, 1, 2], ctx=8, sep_ids=[511], doc_mask=True)
    # stream: doc0 (5) + sep, doc1 (12) + sep, doc2 (3) + sep = 23 tokens -> 2 full sequences + 1
    assert len(ds) == 3
    pos = torch.cat([ds[i]["positions"] for i in range(3)]).tolist()
    # each document restarts at 0 and so does each sequence (doc1 continues into sequence 1)
    assert pos[:8] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert pos[8:16] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert pos[16:22] == [0, 1, 2, 0, 1, 2]


def test_packing_rejects_tiny_window(tmp_path, tok):
    tf = make_token_file(tmp_path, [5])
    with pytest.raises(UserError, match="must be longer than the separator"):
        data.PackedDataset(tf, [0], ctx=3, sep_ids=data.separator_ids(tok, "<s>"))


# ----------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------

def test_zigzag_indices():
    assert attention.zigzag_indices(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert attention.zigzag_indices(8, 1, 2).tolist() == [2, 3, 4, 5]
    for cp in [1, 2, 3, 4]:
        parts = torch.cat([attention.zigzag_indices(24, r, cp) for r in range(cp)])
        assert sorted(parts.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="divisible by 2 x cp = 6"):
        attention.zigzag_indices(8, 0, 3)
    # the loader reads the same chunks as ranges
    for cp in [1, 2, 3]:
        for rank in range(cp):
            ranges = attention.zigzag_ranges(24, rank, cp)
            expected = attention.zigzag_indices(24, rank, cp).tolist()
            assert torch.cat([torch.arange(a, b) for a, b in ranges]).tolist() == expected


def packed(tmp_path, n_tokens=3000, ctx=24, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 100, size=n_tokens // 50)
    tf = make_token_file(tmp_path, lengths, seed=seed, name=f"loader{seed}")
    return data.PackedDataset(tf, np.arange(len(lengths)), ctx, [511])


def test_loader_ranks_are_distinct_and_cover_everything(tmp_path):
    ds = packed(tmp_path)
    for dp_size, batch_size in [(1, 4), (2, 3), (3, 2), (4, 5)]:
        seen = []
        steps = None
        for rank in range(dp_size):
            loader = data.Loader(ds, batch_size, dp_rank=rank, dp_size=dp_size, seed=1)
            order = loader.epoch_order(0)
            first = [s * batch_size * dp_size + rank * batch_size for s in range(loader.steps_per_epoch)]
            indices = [order[f : f + batch_size] for f in first]
            batches = list(itertools.islice(loader, loader.steps_per_epoch))  # one epoch
            steps = steps or len(batches)
            assert len(batches) == steps  # every rank takes the same number of steps
            for idx, batch in zip(indices, batches):
                assert batch["tokens"].shape == (batch_size, ds.ctx)
                assert (batch["tokens"] == torch.stack([ds[int(i)]["tokens"] for i in idx])).all()
            seen.append(np.concatenate(indices))
        everything = np.concatenate(seen)
        assert set(everything.tolist()) == set(range(len(ds)))  # together they see it all
        # only the wrap-around fill of the last step repeats anything
        assert len(everything) - len(set(everything.tolist())) < batch_size * dp_size


def test_loader_context_parallel_shards(tmp_path):
    ds = packed(tmp_path)
    full = next(iter(data.Loader(ds, 2, seed=3)))
    for cp in [2, 3]:
        for rank in range(cp):
            shard = next(iter(data.Loader(ds, 2, cp_rank=rank, cp_size=cp, seed=3)))
            idx = attention.zigzag_indices(ds.ctx, rank, cp)
            for key in full:
                assert shard[key].shape == (2, ds.ctx // cp)
                assert (shard[key] == full[key][:, idx]).all()
    with pytest.raises(UserError, match="divisible by 2 x cp"):
        data.Loader(ds, 2, cp_rank=0, cp_size=5)


def test_loader_deterministic_reshuffles_and_resumes(tmp_path):
    ds = packed(tmp_path)
    loader = data.Loader(ds, 4, dp_rank=1, dp_size=2, seed=7)
    steps = loader.steps_per_epoch
    assert not np.array_equal(loader.epoch_order(0), loader.epoch_order(1))
    assert np.array_equal(loader.epoch_order(0), data.Loader(ds, 4, dp_rank=1, dp_size=2, seed=7).epoch_order(0))
    reference = [b for _, b in zip(range(2 * steps + 3), data.Loader(ds, 4, dp_rank=1, dp_size=2, seed=7))]
    for stop_after in [1, steps - 1, steps, steps + 2]:
        first = data.Loader(ds, 4, dp_rank=1, dp_size=2, seed=7)
        iterator = iter(first)
        for _ in range(stop_after):
            next(iterator)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        resumed = data.Loader(ds, 4, dp_rank=1, dp_size=2, seed=7)
        resumed.load_state_dict(state)
        for expected, got in zip(reference[stop_after:], resumed):
            assert all((expected[k] == got[k]).all() for k in expected)
    with pytest.raises(UserError, match="cannot resume"):
        data.Loader(ds, 4, dp_rank=1, dp_size=2, seed=8).load_state_dict(state)
    # a checkpoint of the older loader, which had shuffle and drop_last knobs, resumes
    data.Loader(ds, 4, dp_rank=1, dp_size=2, seed=7).load_state_dict({**state, "shuffle": True, "drop_last": False})


# ----------------------------------------------------------------------------------------------
# chat data
# ----------------------------------------------------------------------------------------------

def test_chat_dataset_labels_and_packing(tok):
    conversations = small_chats(60, seed=1)
    ds = sft.ChatDataset([(conversations, 1.0)], tok, max_len=256, seed=0, log=None)
    assert ds.stats["conversations"] == 60 and ds.stats["blended"] == 60
    rows = [ds[i] for i in range(len(ds))]
    seen = []
    for row in rows:
        assert all(v.shape == (256,) for v in row.values())
        tokens, labels, doc_ids = row["tokens"], row["labels"], row["doc_ids"]
        for occurrence in sorted(set(doc_ids.tolist()) - {-1}):
            where = doc_ids == occurrence
            conversation = conversations[int(ds.blend[occurrence])]
            expected_tokens, mask = data.format_chat(tok, conversation)
            assert tokens[where].tolist() == expected_tokens
            # labels[j] = tokens[j+1] exactly where tokens[j+1] is the assistant's, else -100
            got = labels[where].tolist()
            expected = [t if m else -100 for t, m in zip(expected_tokens[1:] + [0], mask[1:] + [False])]
            assert got == expected
            seen.append(occurrence)
        assert (tokens[doc_ids == -1] == tok.pad_id).all() and (labels[doc_ids == -1] == -100).all()
    assert sorted(seen) == list(range(60))  # nothing lost, nothing repeated


def test_chat_dataset_weights_truncation_and_doc_mask(tok, tmp_path):
    short = small_chats(40, seed=2)
    long = [[{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y" * 50}]]
    ds = sft.ChatDataset([(short, 2.0), (long, 0.5)], tok, max_len=256, seed=0, log=None)
    assert ds.stats["blended"] == 80 + 0  # round(0.5 * 1) = 0 copies of the long one
    full = len(data.format_chat(tok, long[0])[0])  # the assistant's 51 tokens come last
    ds = sft.ChatDataset([(short, 0.5), (long, 1.0)], tok, max_len=full, seed=0, log=None)
    assert ds.stats["blended"] == 21 and ds.stats["truncated"] == 0
    logs = []
    truncated = sft.ChatDataset([(long, 1.0)], tok, max_len=full - 10, log=logs.append)
    assert truncated.stats["truncated"] == 1 and "1 truncated" in logs[0]
    row = truncated[0]
    assert (row["labels"] != -100).sum() == 51 - 10 and (row["doc_ids"] == 0).all()
    # no assistant token survives truncation before the reply: counted as skipped
    with pytest.raises(UserError, match="no usable conversations"):
        sft.ChatDataset([(long, 1.0)], tok, max_len=full - 51, log=None)
    skipped = sft.ChatDataset([(long + short[:1], 1.0)], tok, max_len=full - 51, log=None)
    assert skipped.stats["too_long_skipped"] == 1 and skipped.stats["blended"] == 1
    masked = sft.ChatDataset([(short, 1.0)], tok, max_len=512, doc_mask=True, log=None)
    row = masked[0]
    for occurrence in set(row["doc_ids"].tolist()) - {-1}:
        where = row["doc_ids"] == occurrence
        assert row["positions"][where].tolist() == list(range(int(where.sum())))


def test_chat_bad_input(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = [
        ('{"messages": [', r"chat\.jsonl line 2: malformed JSON"),
        (json.dumps({"text": "x"}), r"chat\.jsonl line 2: the record's fields \(text\) fit none of the formats "
                                    r"messages, ShareGPT, Alpaca, MetaMath, prompt/completion \(pass --skip-bad"),
        (json.dumps({"prompt": "x"}), r"chat\.jsonl line 2: a prompt/completion record needs .* 'completion'"),
        (json.dumps({"prompt": "x", "completion": "y", "train_eos": "no"}), r"chat\.jsonl line 2: 'train_eos' must be"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), r"chat\.jsonl line 2: .*no assistant turn"),
        (json.dumps({"messages": [{"role": "bot", "content": "q"}]}), r"chat\.jsonl line 2: .*unknown role 'bot'"),
        (json.dumps({"messages": "hi"}), r"chat\.jsonl line 2: 'messages' is not a non-empty list"),
    ]
    for bad_line, message in cases:
        path.write_text(json.dumps(good) + "\n" + bad_line + "\n", encoding="utf-8")
        with pytest.raises(UserError, match=message):
            sft.ChatDataset([(str(path), 1.0)], tok, max_len=256, log=None)
    path.write_text("\n".join([json.dumps(good)] + [line for line, _ in cases]) + "\n", encoding="utf-8")
    logs = []
    ds = sft.ChatDataset([(str(path), 1.0)], tok, max_len=256, skip_bad=True, log=logs.append)
    assert ds.stats["bad_skipped"] == len(cases) and ds.stats["conversations"] == 1
    assert "7 bad skipped" in logs[0]


def test_prompt_completion_records_train_on_the_completion_only(tok, tmp_path):
    """Plain {"prompt", "completion"} records (no template) blend with chat records: bos + prompt +
    completion + eos, labels on the completion and the end token, exactly; on the completion alone
    where a record says "train_eos": false."""
    path = tmp_path / "plain.jsonl"
    records = [{"prompt": f"Q{i}: what is {i} + {i}?\nA:", "completion": f" {2 * i}"} for i in range(30)]
    for record in records[::3]:
        record["train_eos"] = False
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    chats = small_chats(10, seed=4)
    ds = sft.ChatDataset([(str(path), 1.0), (chats, 1.0)], tok, max_len=256, seed=0, log=None)
    assert ds.stats["conversations"] == 40
    plain = 0
    for i in range(len(ds)):
        row = ds[i]
        for occurrence in set(row["doc_ids"].tolist()) - {-1}:
            k = int(ds.blend[occurrence])
            if k >= len(records):
                continue
            where = row["doc_ids"] == occurrence
            prompt = [tok.bos_id] + tok.encode(records[k]["prompt"])
            completion = tok.encode(records[k]["completion"]) + [tok.eos_id]
            assert row["tokens"][where].tolist() == prompt + completion
            trained = completion if records[k].get("train_eos", True) else completion[:-1] + [-100]
            assert row["labels"][where].tolist() == [-100] * (len(prompt) - 1) + trained + [-100]
            plain += 1
    assert plain == len(records)


def test_chat_dataset_in_loader(tok):
    ds = sft.ChatDataset([(small_chats(40, seed=3), 1.0)], tok, max_len=128, log=None)
    batch = next(iter(data.Loader(ds, 2, cp_rank=1, cp_size=2)))
    assert batch["tokens"].shape == (2, 64) and batch["labels"].shape == (2, 64)


def test_tokenizer_config_variants(tok, tmp_path):
    """Templates as a named list or in chat_template.jinja; tokens written as AddedToken dicts."""
    tok._backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": {"content": "<|eot_id|>"},
              "chat_template": [{"name": "default", "template": "T1"}, {"name": "tool_use", "template": "T2"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = data.load_tokenizer(str(tmp_path))
    assert loaded.chat_template == "T1" and loaded.bos_id == 256 and tok.token_id("<|eot_id|>") in loaded.stop_ids
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text(data.LLAMA31_CHAT_TEMPLATE)
    assert data.load_tokenizer(str(tmp_path)).chat_template == data.LLAMA31_CHAT_TEMPLATE
    with pytest.raises(UserError, match="not a Llama 3 family template"):
        data.format_chat(loaded, [{"role": "user", "content": "x"}])


def test_packed_dataset_pickles_for_worker_processes(tmp_path):
    import pickle
    ds = packed(tmp_path)
    ds[0]
    assert len(pickle.dumps(ds.token_file)) < 1000  # the token file travels by path, not by value
    copy = pickle.loads(pickle.dumps(ds))
    for key, value in ds[3].items():
        assert (copy[3][key] == value).all()
