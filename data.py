"""Data for both stages, in the order it runs: the tokenizer and Llama 3.1's chat format; stage 1's
files -> documents -> one token file, length-based sampling, packing with separators; the loader
(stage 2's chat rows are built in sft.py). An item is {"tokens", "labels", "positions", "doc_ids"},
int64 (ctx,); a batch stacks them, cut to (batch_size, ctx // cp_size) for one dp and cp rank.

    tok = load_tokenizer(model_dir)  # None: the built-in byte-level one
    token_file = build_token_file(paths, tok, cache_dir)
    ds = PackedDataset(token_file, sample_by_length(token_file, 10**9, seed=0), 2**20, separator_ids(tok))
    for batch in Loader(ds, batch_size=1, dp_rank=r, dp_size=n, cp_rank=c, cp_size=m): ...
"""

import array, collections, functools, glob, gzip, hashlib, importlib, io, itertools, json, math, os, pathlib, re, shutil
import sysconfig

import numpy as np
import tokenizers, torch

from attention import zigzag_ranges
from model import atomic_write, write_json
from rope import UserError

# Length-based sampling: the paper down-samples documents shorter than 4K tokens and up-samples
# those longer than 8K. It does not publish its rates: 0.5 and 2 are this project's.
SHORT_DOC, LONG_DOC, DOWN_RATE, UP_RATE = 4096, 8192, 0.5, 2.0
BATCH_CHARS, BATCH_DOCS = 8_000_000, 4096  # a tokenizer batch: every core busy, memory bounded
BAD_EXAMPLES = 5  # bad records quoted in the log when skip_bad skips them
IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross_entropy default)
BATCH_KEYS = ("tokens", "labels", "positions", "doc_ids")
JSON_ARRAY_SUFFIXES = (".json", ".json.gz", ".json.zst")  # one JSON array; the other record files: a record a line
RECORD_SUFFIXES = JSON_ARRAY_SUFFIXES + (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".parquet")

# --- Tokenizer ------------------------------------------------------------------------------------
LLAMA3_NAMED_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL_TOKENS = LLAMA3_NAMED_SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>" for i in range(248)]
BUILTIN_VOCAB_SIZE = 256 + len(LLAMA3_SPECIAL_TOKENS)  # 512: the model's `tiny` preset
# Llama-3.1-8B-Instruct's chat template, exported in tokenizer_config.json; format_chat makes its tokens in Python.
LLAMA31_CHAT_TEMPLATE = pathlib.Path(__file__).with_name("chat_template.jinja").read_text(encoding="utf-8")

def _builtin_backend():  # a real `tokenizers` byte-level BPE, no merges: byte b is id b, specials 256..511
    # GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses.
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={char[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in LLAMA3_SPECIAL_TOKENS])
    return backend

_BUILTIN_JSON = _builtin_backend().to_str()

class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and the chat template the recipe needs."""
    def __init__(self, backend, config, source_dir=None):
        backend.no_padding()  # a tokenizer.json's batch-inference settings would change lengths
        backend.no_truncation()
        backend.encode_special_tokens = True  # "<|eot_id|>" typed in a text stays text: specials go in by id
        self._backend, self.config, self.source_dir = backend, dict(config), source_dir
        self.chat_template = config.get("chat_template")
        text = backend.to_str()  # the whole tokenizer.json
        self.identity = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self._bytes_are_ids = text == _BUILTIN_JSON  # byte b is id b: skipping the library is ~100x faster
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        def first_id(*names):  # the first one in the vocabulary; a config may write an AddedToken dict
            ids = [backend.token_to_id(n.get("content") if isinstance(n, dict) else n) for n in names if n]
            return next((i for i in ids if i is not None), None)
        bos, eos, pad = (config.get(k) for k in ("bos_token", "eos_token", "pad_token"))
        # eos ends a DOCUMENT (an ablation's separator), not the turn Llama-3.1-Instruct's eos_token ends
        self.bos_id, self.eos_id = first_id("<|begin_of_text|>", bos), first_id("<|end_of_text|>", eos)
        self.pad_id = first_id("<|finetune_right_pad_id|>", pad, "<|end_of_text|>", eos)
        stops = [first_id(name) for name in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", eos)]
        self.stop_ids = list(dict.fromkeys(t for t in stops if t is not None))

    def encode(self, text):  # plain text to ids, no bos added
        return self.encode_flat([text])[0].tolist()

    def encode_flat(self, texts):
        """A batch (on all cores) as one uint32 array and per-text lengths: what a token file stores."""
        if self._bytes_are_ids:
            encoded = [t.encode("utf-8") for t in texts]
            flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint32)
            return flat, np.array([len(b) for b in encoded], dtype=np.int64)
        ids = [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        flat = array.array("I", itertools.chain.from_iterable(ids))  # array.array takes ints ~3x faster than numpy
        return np.frombuffer(flat, dtype=np.uint32), np.array([len(i) for i in ids], dtype=np.int64)

    def decode(self, ids):
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, name):
        if self._backend.token_to_id(name) is None:
            raise UserError(f"token {name!r} is not in the tokenizer's vocabulary")
        return self._backend.token_to_id(name)

    def save(self, out_dir):
        """Writes tokenizer.json and tokenizer_config.json; load_tokenizer(out_dir) reads them back."""
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(os.path.join(out_dir, "tokenizer.json"), self._backend.save)
        atomic_write(os.path.join(out_dir, "tokenizer_config.json"),
                     lambda tmp: write_json(tmp, {**self.config, "chat_template": self.chat_template}))

def builtin_tokenizer():
    """The offline default: 256 byte ids then Llama 3's 256 special tokens (vocab_size 512)."""
    return Tokenizer(_builtin_backend(), {  # the config is shaped like Llama-3.1-8B-Instruct's
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA31_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast"})

def load_tokenizer(model_dir):
    """Reads `model_dir/tokenizer.json` (+ tokenizer_config.json); None gives the built-in one."""
    if model_dir is None:
        return builtin_tokenizer()
    path, config_path, jinja_path = (pathlib.Path(model_dir, name) for name in
                                     ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
    if not path.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json, so no tokenizer can be loaded from it")
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is the chat template
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if template is None and jinja_path.is_file():  # newer exports keep it in its own file
        template = jinja_path.read_text(encoding="utf-8")
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), {**config, "chat_template": template}, model_dir)

# --- Chat formatting: Llama 3.1's template in Python ----------------------------------------------
def chat_pieces(tok, messages, add_generation_prompt):
    """The template's output as (special token id or text, trainable) pieces, each text encoded on its own
    (the header's "\\n\\n" too: Llama 3's pre-tokenizer splits it from the stripped content anyway)."""
    if not isinstance(messages, list) or not messages:
        raise UserError("'messages' is not a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m or "tool_calls" in m:
            raise UserError(f"message {j} is not an object with 'role' and 'content' (and no tool_calls)")
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"message {j} has unknown role {m['role']!r} (expected system, user or assistant)")
        if not isinstance(m["content"], str):
            raise UserError(f"message {j} has content that is not a string")
    template = tok.chat_template or LLAMA31_CHAT_TEMPLATE
    if "<|start_header_id|>" not in template:
        raise UserError(f"the chat template of {tok.source_dir} is not a Llama 3 family template, "
                        "and format_chat implements only Llama 3.1's")
    bos, start, end, eot = (tok.token_id(t) for t in
                            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    turns = [(m["role"], m["content"].strip()) for m in messages]  # Jinja's |trim is strip()
    if "Cutting Knowledge Date" in template:  # Llama 3.1, not 3: a system turn with this preamble comes first
        date = re.search(r'set date_string = "([^"]+)"', template)
        preamble = f"Cutting Knowledge Date: December 2023\nToday Date: {date[1] if date else '26 Jul 2024'}\n\n"
        system = turns.pop(0)[1] if messages[0]["role"] == "system" else ""
        turns.insert(0, ("system", preamble + system))
    def header(role):  # <|start_header_id|>role<|end_header_id|>\n\n
        return [(start, False), (role, False), (end, False), ("\n\n", False)]
    pieces = [(bos, False)]
    for role, text in turns:
        pieces += header(role) + [(text, role == "assistant"), (eot, role == "assistant")]
    return (pieces + header("assistant")) if add_generation_prompt else pieces

def encode_pieces(tok, conversations):  # (tokens, mask) per conversation, all encoded in one batch
    flat, lengths = tok.encode_flat([p for pieces in conversations for p, _ in pieces if isinstance(p, str)])
    texts, out = iter(np.split(flat, np.cumsum(lengths)[:-1])), []
    for pieces in conversations:
        tokens, mask = [], []
        for piece, trainable in pieces:
            ids = next(texts).tolist() if isinstance(piece, str) else [piece]  # text, or a special token's id
            tokens += ids
            mask += [trainable] * len(ids)
        out.append((tokens, mask))
    return out

def format_chat(tok, messages, add_generation_prompt=False):
    """Llama 3.1 chat formatting: (tokens, mask), mask True on the assistant's content and its <|eot_id|> (the
    model learns to stop). The tokens of `apply_chat_template` with Llama 3.1's template (or Llama 3's: no system
    preamble), with one deliberate difference: special-token strings typed inside a message stay plain text."""
    return encode_pieces(tok, [chat_pieces(tok, messages, add_generation_prompt)])[0]

# --- Stage 1: files -> documents ------------------------------------------------------------------
def builtin_corpus_files():
    """The built-in corpus: every .py file of this Python's standard library (no site-packages).
    Real text on every machine, thousands of documents, hundreds longer than 8K tokens."""
    files = []
    for directory, subdirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(directory, n) for n in sorted(names) if n.endswith(".py")]
    return files

def expand_inputs(paths):  # files, directories (recursively, hidden names skipped) and globs -> files
    files = []
    for pattern in [paths] if isinstance(paths, str) else paths:
        matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise UserError(f"input {pattern!r} is neither a file, a directory nor a matching glob")
        for match in matches:  # a file, or a directory's files (glob's "**" skips hidden names)
            inside = glob.glob(os.path.join(glob.escape(match), "**"), recursive=True)
            files += sorted(f for f in [match] + inside if os.path.isfile(f))
    return files

class BadRecords:
    """The one bad-record policy: raise, or with skip_bad count them per file and keep a few for the log."""
    def __init__(self, skip_bad):
        self.skip_bad, self.count, self.per_file, self.examples = skip_bad, 0, collections.Counter(), []

    def __call__(self, file, message):  # returns None: the readers' "nothing here"
        if not self.skip_bad:
            raise UserError(message + " (pass --skip-bad to skip and count bad records)")
        self.count, self.per_file[file] = self.count + 1, self.per_file[file] + 1
        self.examples = (self.examples + [message])[:BAD_EXAMPLES]

    def quoted(self):  # for the log: the count per file (the ten most hit), then a few examples
        files = ", ".join(f"{file} {n}" for file, n in self.per_file.most_common(10))
        head = f"\n  skipped {self.count} bad records: {files}" if self.count else ""
        return head + "".join(f"\n  skipped: {example}" for example in self.examples)

def optional_import(module, path):  # pyarrow and zstandard: needed only by the files that use them
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"reading {path} needs the {package} package: pip install {package}") from None

def open_binary(path):  # a file's bytes, decompressed as its name says (.gz, .zst), streamed
    if path.endswith(".zst"):  # a window up to 2 GiB: archives made with `zstd --long=31`; pzstd's many frames
        zstd = optional_import("zstandard", path).ZstdDecompressor(max_window_size=2**31)
        return io.BufferedReader(zstd.stream_reader(open(path, "rb"), read_across_frames=True))
    return (gzip.open if path.endswith(".gz") else open)(path, "rb")

def read_jsonl(path, bad=None):
    """(line_number, record) per JSON object line of a .jsonl(.gz, .zst) file; a bad line raises, or goes to `bad`."""
    with open_binary(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                problem = None if isinstance(record, dict) else "the record is not a JSON object"
            except UnicodeDecodeError as e:
                problem = f"undecodable bytes (not UTF-8) at column {e.start + 1}"
            except json.JSONDecodeError as e:
                problem = f"malformed JSON ({e.msg} at column {e.colno})"
            if problem is None:
                yield n, record
            elif bad is None:
                raise UserError(f"{path} line {n}: {problem}")
            else:
                bad(path, f"{path} line {n}: {problem}")

def _read_text(path, bad):  # a whole file's text, or None when it is binary or not UTF-8 (told to `bad`)
    with open_binary(path) as f:
        raw = f.read()
    if b"\0" in raw:  # text never holds a NUL byte; images, archives and arrays of numbers do
        return bad(path, f"{path}: a binary file (NUL byte at byte {raw.index(0)}), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return bad(path, f"{path} line {line}: undecodable bytes (not UTF-8) at byte {e.start}")

def _json_array_records(path, bad):  # a .json file's array (`datasets`' to_json(lines=False))
    try:
        records = json.loads(_read_text(path, bad) or "[]")  # bad() returns None: a skipped file holds nothing
    except json.JSONDecodeError as e:
        records = bad(path, f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") or []
    if not isinstance(records, list):
        records = bad(path, f"{path} does not hold a JSON array of records, one object each") or []
    return [(f"{path} record {k}", r) for k, r in enumerate(records)
            if isinstance(r, dict) or bad(path, f"{path} record {k}: the record is not a JSON object")]

def _parquet_records(path, bad, columns):  # rows as dicts, one row group in memory at a time
    pq = optional_import("pyarrow.parquet", path)  # outside the try: a UserError is a ValueError too
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        return bad(path, f"{path}: not a readable Parquet file ({e})")
    names = parquet.schema_arrow.names
    if columns and columns[0] not in names:
        return bad(path, f"{path} has no '{columns[0]}' column (its columns: {', '.join(names)})")
    keep, at = [c for c in names if not columns or c in columns], 0
    for group in range(parquet.num_row_groups):  # one thread: the tokenizer has the cores, and the peak is lower
        rows = parquet.read_row_group(group, columns=keep, use_threads=False).to_pylist()
        yield from ((f"{path} row {at + k}", row) for k, row in enumerate(rows))
        at += len(rows)

def read_records(path, bad, columns=None):
    """(where, record) per object of a JSONL file (.gz, .zst), of a .json file's array, or per row of a Parquet file
    (`columns` only, the first one required; None: all). A file without any is bad: it "holds no documents"."""
    if path.endswith(".parquet"):
        records = _parquet_records(path, bad, columns)
    elif path.endswith(JSON_ARRAY_SUFFIXES):
        records = _json_array_records(path, bad)
    else:
        records = ((f"{path} line {n}", record) for n, record in read_jsonl(path, bad))
    empty = True
    for item in records:
        empty = False
        yield item
    if empty and not bad.per_file[path]:  # bad records of its own are counted already
        bad(path, f"{path} holds no documents")

def _documents(files, bad, builtin):
    """Yields (text, domain) for each record of a record file (domain: its `domain` or the file's name) or
    each other file (its directory's name; the built-in corpus has two, so per-domain sampling has work)."""
    for path in files:
        if path.endswith(RECORD_SUFFIXES):  # records; others are text
            for where, record in read_records(path, bad, columns=("text", "domain")):
                text, domain = record.get("text"), record.get("domain")  # Parquet writes an absent domain as None
                domain = os.path.basename(path).split(".")[0] if domain is None else domain
                if not isinstance(text, str):
                    bad(path, f"{where}: the record has " + ("no 'text' field" if text is None else
                                                             "a 'text' field that is not a string"))
                elif not isinstance(domain, str):
                    bad(path, f"{where}: the record's 'domain' is not a string")
                elif re.search("[\ud800-\udfff]", text):  # JSON's "\\ud800" escapes decode to lone surrogates
                    bad(path, f"{where}: 'text' holds an unpaired surrogate, which is not valid Unicode")
                else:
                    yield text, domain
        elif (text := _read_text(path, bad)) is not None:
            parts = os.path.abspath(path).split(os.sep)
            is_test = {"test", "tests"} & set(parts) or parts[-1].startswith("test_")
            yield text, ("stdlib-tests" if is_test else "stdlib") if builtin else parts[-2]

# --- Stage 1: documents -> token file -------------------------------------------------------------
class TokenFile:
    """A tokenized corpus on disk: one flat uint32 memmap plus a per-document index."""
    def __init__(self, path):
        self.path, self.tokens_path = path, os.path.join(path, "tokens.u32")
        try:  # a file cut short (a full disk, a copy that died) is named here, not by numpy later
            meta = json.loads(pathlib.Path(path, "meta.json").read_text(encoding="utf-8"))
            self.n_tokens, self.domain_names, self.stats = meta["n_tokens"], meta["domain_names"], meta["stats"]
            self.lengths = np.load(os.path.join(path, "lengths.npy"))  # (n_docs,) int64
            self.domains = np.load(os.path.join(path, "domains.npy"))  # (n_docs,) int32 into domain_names
            size, total = os.path.getsize(self.tokens_path), int(self.lengths.sum())
            if size != 4 * self.n_tokens or total != self.n_tokens or len(self.domains) != len(self.lengths):
                raise ValueError(f"tokens.u32 has {size} bytes, lengths.npy {total} tokens, meta.json {self.n_tokens}")
        except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
            raise UserError(f"the token file {path} is damaged ({type(e).__name__}: {e})") from None
        self.tokens = np.memmap(self.tokens_path, dtype=np.uint32, mode="r", shape=(self.n_tokens,))
        self.offsets, self.n_docs = np.cumsum(self.lengths) - self.lengths, len(self.lengths)  # (n_docs,) starts

    def __reduce__(self):  # pickled (into a worker process) by path: a memmap would copy the file
        return TokenFile, (self.path,)

    def doc(self, i):  # document i's tokens, a (length,) uint32 view into the memmap
        return self.tokens[self.offsets[i] : self.offsets[i] + self.lengths[i]]

    def __repr__(self):
        return f"{self.path} ({self.n_docs} documents, {self.n_tokens} tokens)"

def write_token_file(out_dir, batches, stats=dict, source="the batches"):
    """Writes batches of (flat uint32 ids, lengths, domain names) and meta.json (with stats(), asked once
    the batches are written) into a temporary directory renamed to out_dir: a token file is whole or absent.
    source: what the batches were read from, for the sentence that no document has any tokens."""
    tmp_dir = f"{out_dir}.tmp-{os.uname().nodename}-{os.getpid()}-{os.urandom(4).hex()}"  # its owner: see below
    lengths, domains, names = array.array("q"), array.array("i"), {}
    os.makedirs(tmp_dir)
    try:
        with open(os.path.join(tmp_dir, "tokens.u32"), "wb") as f:
            for flat, batch_lengths, batch_domains in batches:
                flat.astype(np.uint32, copy=False).tofile(f)
                lengths.extend(int(n) for n in batch_lengths)
                domains.extend(names.setdefault(d, len(names)) for d in batch_domains)
        lengths = np.frombuffer(lengths, dtype=np.int64)
        keep = lengths > 0  # an empty document cannot be sampled; dropping it leaves the offsets alone
        stats = {**stats(), "empty_documents": int((~keep).sum())}
        if not keep.any():
            raise UserError(f"no document of {source} has any tokens, so the corpus is empty")
        np.save(os.path.join(tmp_dir, "lengths.npy"), lengths[keep])
        np.save(os.path.join(tmp_dir, "domains.npy"), np.frombuffer(domains, dtype=np.int32)[keep])
        write_json(os.path.join(tmp_dir, "meta.json"), {"format": 2, "n_tokens": int(lengths.sum()),
                                                        "domain_names": list(names), "stats": stats})
        if not os.path.isdir(out_dir):  # another run may have written the same token file first: keep it
            os.rename(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return TokenFile(out_dir)

def _remove_dead_builds(cache_dir, log):  # the tmp dirs of this host's killed builds (SIGKILL, OOM); others stay
    mine = re.compile(rf".+\.tmp-{re.escape(os.uname().nodename)}-(\d+)-[0-9a-f]+")  # see write_token_file
    for owner in filter(None, map(mine.fullmatch, os.listdir(cache_dir))):
        try:
            os.kill(int(owner[1]), 0)  # signal 0 delivers nothing: it asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(os.path.join(cache_dir, owner[0]), ignore_errors=True)
            log(f"removed {os.path.join(cache_dir, owner[0])}: process {owner[1]} of this host died while writing it")
        except PermissionError:  # it exists: another user's
            pass

def _encode_batches(documents, tok):  # (text, domain) pairs -> write_token_file's batches, memory bounded
    batch, chars = [], 0
    for text, domain in documents:
        batch.append((text, domain))
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield *tok.encode_flat([t for t, _ in batch]), [d for _, d in batch]
            batch, chars = [], 0
    if batch:
        yield *tok.encode_flat([t for t, _ in batch]), [d for _, d in batch]

def build_token_file(paths, tok, cache_dir, skip_bad=False, log=print):
    """Tokenizes a corpus into `cache_dir`, or reuses an identical earlier run's token file (a damaged one is
    rebuilt). paths: files, directories and globs; None: the built-in corpus, whose few non-UTF-8 files are skipped."""
    builtin, log = paths is None, log or (lambda message: None)
    files = builtin_corpus_files() if builtin else expand_inputs(paths)
    key = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    key = hashlib.sha256(json.dumps([2, key, tok.identity, skip_bad, builtin]).encode("utf-8")).hexdigest()
    out_dir = os.path.join(cache_dir, "tokens-" + key[:20])
    os.makedirs(cache_dir, exist_ok=True)
    _remove_dead_builds(cache_dir, log)
    if os.path.isdir(out_dir):
        try:
            log(f"reusing {(token_file := TokenFile(out_dir))}")
            return token_file
        except UserError as e:
            log(f"{e}; removing it and tokenizing again")
            shutil.rmtree(out_dir, ignore_errors=True)
    bad = BadRecords(skip_bad or builtin)
    source = "the built-in corpus" if builtin else ", ".join([paths] if isinstance(paths, str) else paths)
    token_file = write_token_file(out_dir, _encode_batches(_documents(files, bad, builtin), tok), lambda: {
        "files": len(files), "bad_skipped": bad.count, "bad_per_file": dict(bad.per_file),
        "bad_examples": bad.examples}, source)
    log(f"tokenized {len(files)} files into {token_file}; skipped {bad.count} bad records and "
        f"{token_file.stats['empty_documents']} empty documents" + bad.quoted())
    return token_file

# --- Stage 1: length-based sampling ---------------------------------------------------------------
def sample_by_length(token_file, budget_tokens, seed, log=print):
    """Document indices (int64, in order) sampled by length up to `budget_tokens`, a document's expected copies
    proportional to its rate. Each domain's copies are drawn (seeded) and cut at its share of the corpus's tokens;
    the domains are then shuffled together and cut at the budget (the total exceeds it by less than one document)."""
    if budget_tokens <= 0:
        raise UserError(f"the token budget must be positive, not {budget_tokens}")
    lengths, domains, n_domains = token_file.lengths, token_file.domains, len(token_file.domain_names)
    rate = np.where(lengths < SHORT_DOC, DOWN_RATE, np.where(lengths > LONG_DOC, UP_RATE, 1.0))
    domain_tokens = np.bincount(domains, weights=lengths, minlength=n_domains)
    can_sample = np.bincount(domains, weights=rate * lengths, minlength=n_domains) > 0
    if not can_sample.any():
        raise UserError("every document has sampling rate 0, so nothing can be sampled")
    shares = domain_tokens / domain_tokens[can_sample].sum()  # among the domains that can contribute
    rng, picked = np.random.default_rng(seed), []
    for d in np.flatnonzero(can_sample):
        docs = np.flatnonzero(domains == d)
        domain_budget = budget_tokens * shares[d]
        expected = rate[docs] * domain_budget / (rate[docs] * lengths[docs]).sum()
        # Integer copies with the expected count: floor plus a coin flip for the fraction.
        chosen = np.repeat(docs, np.floor(expected).astype(np.int64) + (rng.random(len(docs)) < expected % 1))
        rng.shuffle(chosen)
        while lengths[chosen].sum() < domain_budget:  # the coin flips fell short: draw more by rate
            extra = rng.choice(docs, size=max(16, len(docs) // 16), p=rate[docs] / rate[docs].sum())
            chosen = np.concatenate([chosen, extra])
        picked.append(chosen[: np.searchsorted(np.cumsum(lengths[chosen]), domain_budget) + 1])
    order = rng.permutation(np.concatenate(picked))
    order = order[: np.searchsorted(np.cumsum(lengths[order]), budget_tokens) + 1]
    if log:  # what the sampling did: documents and token shares by length, before and after
        def by_length(x):
            bins = [x < SHORT_DOC, (x >= SHORT_DOC) & (x <= LONG_DOC), x > LONG_DOC]
            return " / ".join(f"{b.sum()} ({x[b].sum() / x.sum():.0%})" for b in bins)
        log(f"length-based sampling to {budget_tokens:,} tokens, documents (token share) below {SHORT_DOC} / "
            f"{SHORT_DOC}-{LONG_DOC} / above {LONG_DOC} tokens: before {by_length(lengths)}, "
            f"after {by_length(lengths[order])}")
    return order

# --- Stage 1: packing with separators -------------------------------------------------------------
def separator_ids(tok, separator="<s>"):
    """The ids after every document: the paper's "<s>" (tokenized as text), bos, eos, or none (ablations)."""
    ids = {"<s>": tok.encode("<s>"), "bos": [tok.bos_id], "eos": [tok.eos_id], "none": []}
    if separator not in ids:
        raise UserError(f"unknown separator {separator!r}; expected one of {', '.join(ids)}")
    return ids[separator]

def empty_batch(*shape):  # four int64 tensors to fill, allocated by numpy: for tens of MB it asks the
    # kernel for huge pages, which fill several times faster here than torch.empty's fresh 4 KB pages
    return {key: torch.from_numpy(np.empty(shape, dtype=np.int64)) for key in BATCH_KEYS}

@functools.lru_cache(maxsize=2)
def _count_up(n):  # 0..n-1, kept: copying it is ~2x faster than computing it for every 4M-token read
    return np.arange(n)

class PackedDataset:
    """Sequence i = stream[i*ctx : i*ctx + ctx + 1], the stream being the sampled documents, each followed by the
    separator: a document longer than what is left continues in the next sequence, whose first input is i's last
    label, so every stream token but the first is a label exactly once. The last, partial sequence is padded (token 0,
    labels -100, doc_ids -1). doc_ids: the index in `doc_order` (the separator belongs to its document); positions:
    0..ctx-1, or with doc_mask the offset since the document (or the sequence) began. A read holds one sequence only."""
    def __init__(self, token_file, doc_order, ctx, sep_ids, doc_mask=False):
        self.token_file, self.ctx, self.doc_mask = token_file, ctx, doc_mask
        self.sep = np.asarray(sep_ids, dtype=np.uint32)
        if ctx <= len(self.sep):
            raise UserError(f"the window ctx={ctx} must be longer than the separator ({len(self.sep)} tokens)")
        self.doc_offsets, self.doc_lengths = token_file.offsets[doc_order], token_file.lengths[doc_order]  # (n,)
        # doc_starts[k]: where document k starts in the stream; doc_starts[-1]: the stream's length.
        self.doc_starts = np.concatenate([[0], np.cumsum(self.doc_lengths + len(self.sep))])
        self.stream_len = int(self.doc_starts[-1])
        self.n_sequences = -(-(self.stream_len - 1) // ctx)  # ceil(labels / ctx): the first stream token is no label
        if self.n_sequences <= 0:
            raise UserError(f"the sampled stream ({self.stream_len} tokens) holds no label to learn")

    def __len__(self):
        return self.n_sequences

    def __getitem__(self, i):
        return self.read(i, 0, self.ctx)

    def read(self, i, start, stop, out=None):
        """Positions [start, stop) of sequence i (one context-parallel chunk), into `out` (four (stop - start,)
        int64 tensors, rows of the loader's batch: a million-token sequence is written once) or new ones."""
        if not 0 <= i < self.n_sequences:
            raise IndexError(f"sequence {i} is out of range for {self.n_sequences} sequences")
        n, first, seq_start = stop - start, i * self.ctx + start, i * self.ctx  # stream positions
        out = empty_batch(n) if out is None else out
        tokens, labels, positions, doc_ids = (out[key].numpy() for key in BATCH_KEYS)  # (n,) each
        positions[:] = _count_up(self.ctx)[start:stop]
        raw = np.empty(n + 1, dtype=np.uint32)  # (n+1,) stream tokens; raw[1:] are the labels
        have = max(0, min(n + 1, self.stream_len - first))  # the rest is past the stream's end
        k, filled = int(np.searchsorted(self.doc_starts, first, side="right")) - 1, 0
        with open(self.token_file.tokens_path, "rb", buffering=0) as f:
            while filled < have:  # document k's tokens, then its separator
                at, body_end = first + filled, int(self.doc_starts[k] + self.doc_lengths[k])
                take = min(int(self.doc_starts[k + 1]), first + have) - at
                body = max(0, min(body_end - at, take))
                # os.preadv, unlike reading through the memmap, maps nothing: resident memory does not grow
                in_file = int(self.doc_offsets[k] + at - self.doc_starts[k])  # whole: TokenFile checked its size
                os.preadv(f.fileno(), [raw[filled : filled + body]], 4 * in_file)
                sep_at = max(0, at - body_end)
                raw[filled + body : filled + take] = self.sep[sep_at : sep_at + take - body]
                end = min(filled + take, n)  # raw[n] is a label only
                doc_ids[filled:end] = k
                if self.doc_mask:  # positions restart where the document starts within the sequence
                    positions[filled:end] -= max(0, int(self.doc_starts[k]) - seq_start)
                filled, k = filled + take, k + 1
        real = min(have, n)  # inputs that come from the stream
        tokens[:real], tokens[real:], doc_ids[real:] = raw[:real], 0, -1  # padding: any id does, its labels are -100
        labels[: max(have - 1, 0)], labels[max(have - 1, 0) :] = raw[1:have], IGNORE_INDEX
        if self.doc_mask:  # and the padding counts from 0
            positions[real:] -= start + real
        return out

# --- Loader ---------------------------------------------------------------------------------------
class Loader:
    """Batches for one (data-parallel, context-parallel) rank, epoch after epoch. Every step takes the next
    batch_size * dp_size sequences of the epoch's permutation (seeded by seed and epoch); dp rank r gets the r-th run
    of batch_size, each sequence cut to (and reading only) the cp rank's zigzag chunks. An epoch's last step is
    filled with its first sequences: every rank takes the same number of steps, together they see every sequence."""
    def __init__(self, dataset, batch_size, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1, seed=0):
        if dataset.ctx % (2 * cp_size):
            raise UserError(f"sequence length {dataset.ctx} must be divisible by 2 x cp = {2 * cp_size}")
        self.dataset, self.batch_size, self.dp_rank, self.seed = dataset, batch_size, dp_rank, seed
        self.ranges = zigzag_ranges(dataset.ctx, cp_rank, cp_size) if cp_size > 1 else [(0, dataset.ctx)]
        self.global_batch = batch_size * dp_size
        self.steps_per_epoch = -(-len(dataset) // self.global_batch)
        self.epoch, self.step = 0, 0  # the next step within the epoch

    def epoch_order(self, epoch):  # (steps_per_epoch * global_batch,) the epoch's order, whole global batches
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return np.resize(order, self.steps_per_epoch * self.global_batch)  # resize repeats from the start

    def __iter__(self):
        while True:
            order = self.epoch_order(self.epoch)
            while self.step < self.steps_per_epoch:
                first = self.step * self.global_batch + self.dp_rank * self.batch_size
                batch = empty_batch(self.batch_size, sum(b - a for a, b in self.ranges))
                for row, index in enumerate(order[first : first + self.batch_size]):
                    at = 0
                    for a, b in self.ranges:  # the dataset writes straight into the batch's row
                        self.dataset.read(int(index), a, b, {k: batch[k][row, at : at + b - a] for k in BATCH_KEYS})
                        at += b - a
                self.step += 1  # before yielding: a state_dict() taken now resumes after this batch
                yield batch
            self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_sequences": len(self.dataset),
                "global_batch": self.global_batch}

    def load_state_dict(self, state):  # a checkpoint's other keys (an older loader's knobs) are not compared
        for key, mine in self.state_dict().items():
            if key not in ("epoch", "step") and state[key] != mine:
                raise UserError(f"cannot resume: the saved loader has {key}={state[key]} but this one has {mine}")
        self.epoch, self.step = state["epoch"], state["step"]
