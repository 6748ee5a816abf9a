"""Data for both training stages: tokenizer, corpus, length-based sampling, packing, chat data, loader.

Stage 1 (continued pretraining) turns a corpus into windows of exactly `ctx` tokens:

    tok = load_tokenizer(model_dir)                         # None: the built-in byte-level tokenizer
    tf = build_token_file(paths, tok, cache_dir)            # None: the Python standard library's sources
    order = sample_by_length(tf, budget_tokens=10**9, seed=0)
    ds = PackedDataset(tf, order, ctx=2**20, sep_ids=separator_ids(tok, "<s>"))
    for batch in Loader(ds, batch_size=1, dp_rank=r, dp_size=n, cp_rank=c, cp_size=m): ...

Stage 2 (instruction tuning) packs chat conversations with a loss mask:

    ds = ChatDataset([("sharegpt.jsonl", 1.0), ("math.jsonl", 0.5)], tok, max_len=8192)
    for batch in Loader(ds, batch_size=8): ...

Public API
----------
Tokenizer
    load_tokenizer(model_dir: str | None) -> Tokenizer
    builtin_tokenizer() -> Tokenizer
        256 byte ids, then the 256 Llama 3 special tokens: vocab_size 512.
    Tokenizer
        vocab_size, bos_id, eos_id (<|end_of_text|>), eot_id, pad_id, stop_ids, chat_template, source_dir
        encode(text) -> list[int]            plain text: no bos added, "<|eot_id|>" typed in text stays text
        encode_batch(texts) -> list[list[int]]   all cores
        encode_flat(texts) -> (uint32 array of all ids, int64 array of lengths)
        decode(ids) -> str, token_id(name) -> int, save(dir)
    format_chat(tok, messages, add_generation_prompt=False) -> (tokens: list[int], mask: list[bool])
        Llama 3.1's chat template, token for token; mask is True on the assistant's content and its
        <|eot_id|>.
    LLAMA31_CHAT_TEMPLATE: the template text that tokenizer_config.json carries.

Stage 1
    builtin_corpus_files() -> list[str]
    build_token_file(paths, tok, cache_dir, skip_bad=False, log=print, progress=False) -> TokenFile
    TokenFile(path): tokens (np.memmap uint32), offsets, lengths, domains (per document),
        domain_names, stats, doc(i)
    TokenFileWriter(out_dir): add(tokens, domain), add_many(flat, lengths, domains), abort(),
        close(stats=None) -> TokenFile (appears atomically)
    sample_by_length(token_file, budget_tokens, seed, short=4096, long=8192,
                     down_rate=0.5, up_rate=2.0, log=print) -> np.ndarray of document indices
    separator_ids(tok, separator="<s>") -> list[int]     "<s>" | "bos" | "eos" | "none"
    PackedDataset(token_file, doc_order, ctx, sep_ids, doc_mask=False, pad_id=0, drop_last=False)
        ds[i] -> dict(tokens, labels, positions, doc_ids), each a LongTensor of shape (ctx,)
        ds.read(i, start, stop, out=None)   the same for positions [start, stop) (a cp chunk)
        ds.read_stream(i) -> (ctx+1,) uint32 array: the packed tokens alone

Stage 2
    synthetic_chat(n, seed=0, split="train") -> list[messages]     SYNTHETIC tasks for the CPU demo
    ChatDataset(sources, tok, max_len, seed=0, skip_bad=False, truncate=True, doc_mask=False,
                log=print)                                          the same dict as PackedDataset

Loading
    zigzag_indices(seq_len, cp_rank, cp_size) -> LongTensor   (attention.py's, re-exported)
    Loader(dataset, batch_size, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1, seed=0, shuffle=True,
           drop_last=False, epochs=None)
        yields dicts of (batch_size, ctx // cp_size) LongTensors; state_dict() / load_state_dict();
        steps_per_epoch, epoch_order(epoch), batch_indices(epoch, step)

Errors
    DataError (a ValueError): one sentence that names the file and line when there is one.
"""

import array
import glob
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import sysconfig
import uuid

import numpy as np
import torch
import tokenizers
from tqdm import tqdm

from attention import zigzag_indices  # noqa: F401  (re-exported: one sharding permutation everywhere)


from rope import UserError

DataError = UserError  # transition alias: the one error type lives in rope.py


IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross_entropy default)
BATCH_KEYS = ("tokens", "labels", "positions", "doc_ids")  # what every dataset item and batch holds


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

# Llama 3's 256 special tokens, in the order the built-in tokenizer numbers them (ids 256..511).
LLAMA3_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = LLAMA3_NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(256 - len(LLAMA3_NAMED_SPECIAL_TOKENS))
]
BUILTIN_VOCAB_SIZE = 256 + len(LLAMA3_SPECIAL_TOKENS)  # 512: the model's `tiny` preset

# The chat template of Llama-3.1-8B-Instruct's tokenizer_config.json. format_chat implements it in
# Python (messages with roles system/user/assistant, no tools); tests render it with jinja2 and compare.
LLAMA31_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _builtin_backend():
    """A real `tokenizers` byte-level BPE with no merges: byte b is id b, specials are 256..511."""
    byte_char = _bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS]
    )
    return backend


def _builtin_config():
    """tokenizer_config.json for the built-in tokenizer, shaped like Llama-3.1-8B-Instruct's."""
    return {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA31_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_BUILTIN_IDENTITY = _sha256(_builtin_backend().to_str())


def _token_name(value):
    """tokenizer_config.json writes a token either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and the chat template the recipe needs."""

    def __init__(self, backend, config, source_dir=None):
        # The tokenizer.json may carry padding/truncation settings meant for batched inference;
        # here they would silently change document lengths.
        backend.no_padding()
        backend.no_truncation()
        # Text is text: a document that contains the characters "<|eot_id|>" must not produce the
        # end-of-turn token (specials are placed by id, in format_chat and separator_ids).
        backend.encode_special_tokens = True
        self._backend = backend
        self.config = dict(config)
        self.source_dir = source_dir
        self.chat_template = config.get("chat_template")
        self.identity = _sha256(backend.to_str())
        # The built-in tokenizer maps byte b to id b, so UTF-8 bytes ARE its ids: skipping the
        # library there makes the CPU demo and the tests ~100x faster (tests check it is identical).
        self._bytes_are_ids = self.identity == _BUILTIN_IDENTITY
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

        def first_present(*names):
            for name in names:
                if name is not None and backend.token_to_id(name) is not None:
                    return backend.token_to_id(name)
            return None

        config_bos = _token_name(config.get("bos_token"))
        config_eos = _token_name(config.get("eos_token"))
        config_pad = _token_name(config.get("pad_token"))
        self.bos_id = first_present("<|begin_of_text|>", config_bos)
        # eos is the end of a DOCUMENT (the separator ablation's token), not the end of a chat turn
        # that Llama-3.1-Instruct's config names as eos_token; stop_ids holds both.
        self.eos_id = first_present("<|end_of_text|>", config_eos)
        self.eot_id = first_present("<|eot_id|>", config_eos)
        self.pad_id = first_present("<|finetune_right_pad_id|>", config_pad, "<|end_of_text|>", config_eos)
        stop_names = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", config_eos]
        self.stop_ids = []
        for name in stop_names:
            token = first_present(name)
            if token is not None and token not in self.stop_ids:
                self.stop_ids.append(token)

    def encode(self, text):
        if self._bytes_are_ids:
            return list(text.encode("utf-8"))
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """Encodes many texts at once; the library spreads a batch over all cores."""
        if self._bytes_are_ids:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_flat(self, texts):
        """Encodes a batch into one uint32 array plus per-text lengths: what the token file stores."""
        if self._bytes_are_ids:
            encoded = [t.encode("utf-8") for t in texts]
            flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint32)
            return flat, np.array([len(b) for b in encoded], dtype=np.int64)
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        # array.array converts a list of ints ~3x faster than np.array does.
        buffer = array.array("I")
        lengths = np.empty(len(encodings), dtype=np.int64)
        for i, encoding in enumerate(encodings):
            ids = encoding.ids
            lengths[i] = len(ids)
            buffer.extend(ids)
        return np.frombuffer(buffer, dtype=np.uint32), lengths

    def _encode_split(self, texts_and_cuts):
        """Encodes (text, cut) pairs in one batch; returns (ids, n) pairs, where the first n ids come
        from text[:cut]. The text is encoded whole, exactly as a chat template's output would be."""
        if self._bytes_are_ids:
            out = []
            for text, cut in texts_and_cuts:
                head = text[:cut].encode("utf-8")
                out.append((list(head + text[cut:].encode("utf-8")), len(head)))
            return out
        encodings = self._backend.encode_batch([t for t, _ in texts_and_cuts], add_special_tokens=False)
        out = []
        for encoding, (_, cut) in zip(encodings, texts_and_cuts):
            # A token that straddles the cut counts as head: it is not wholly the assistant's.
            n_head = sum(1 for start, end in encoding.offsets if start < cut)
            out.append((encoding.ids, n_head))
        return out

    def decode(self, ids):
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, name):
        token = self._backend.token_to_id(name)
        if token is None:
            raise DataError(f"token {name!r} is not in the tokenizer's vocabulary")
        return token

    def save(self, out_dir):
        """Writes tokenizer.json and tokenizer_config.json; load_tokenizer(out_dir) reads them back."""
        os.makedirs(out_dir, exist_ok=True)
        self._backend.save(os.path.join(out_dir, "tokenizer.json"))
        config = dict(self.config)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_json_atomic(os.path.join(out_dir, "tokenizer_config.json"), config)

    def __repr__(self):
        source = self.source_dir or "built-in byte-level"
        return f"Tokenizer({source}, vocab_size={self.vocab_size})"


def builtin_tokenizer():
    """The offline default: 256 byte ids then Llama 3's 256 special tokens (vocab_size 512)."""
    return Tokenizer(_builtin_backend(), _builtin_config(), source_dir=None)


def load_tokenizer(model_dir):
    """Reads `model_dir/tokenizer.json` (+ tokenizer_config.json); None gives the built-in one."""
    if model_dir is None:
        return builtin_tokenizer()
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"{model_dir} has no tokenizer.json, so no tokenizer can be loaded from it")
    backend = tokenizers.Tokenizer.from_file(path)
    config = {}
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is the chat template
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_path):  # newer exports keep it in its own file
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    if template is not None:
        config["chat_template"] = template
    return Tokenizer(backend, config, source_dir=model_dir)


def _write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Chat formatting (Llama 3.1)
# ----------------------------------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant")


def _chat_style(tok):
    """Which Llama 3 family template the tokenizer carries, and Llama 3.1's default date."""
    template = tok.chat_template
    if template is None or "Cutting Knowledge Date" in template:
        match = re.search(r'set date_string = "([^"]+)"', template or "")
        return "llama3.1", (match.group(1) if match else "26 Jul 2024")
    if "<|start_header_id|>" in template:  # Llama 3 (not 3.1): no system preamble
        return "llama3", None
    raise DataError(
        f"the chat template of {tok.source_dir} is not a Llama 3 family template, "
        "and format_chat implements only Llama 3.1's"
    )


def _check_messages(messages):
    """Raises DataError (one sentence, no file: the caller adds it) for a malformed conversation."""
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' is not a non-empty list")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"message {j} is not an object with 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise DataError(
                f"message {j} has unknown role {message['role']!r} (expected system, user or assistant)"
            )
        if not isinstance(message["content"], str):
            raise DataError(f"message {j} has content that is not a string")
        if "tool_calls" in message:
            raise DataError(f"message {j} has tool_calls, which format_chat does not support")


def _chat_pieces(tok, messages, add_generation_prompt):
    """The template's output as pieces: (special_id, trainable) or (text, cut, trainable).

    A text piece is everything between two special tokens: the real tokenizer encodes exactly these
    spans on their own, so encoding them separately reproduces its ids. In "\\n\\n" + content the
    first `cut` characters belong to the header; the rest is trainable when the speaker is the
    assistant. Trainable specials: the assistant's <|eot_id|>, so the model learns to stop.
    """
    _check_messages(messages)
    style, date = _chat_style(tok)
    if tok.bos_id is None:
        raise DataError("the tokenizer has no <|begin_of_text|> token, which the Llama 3.1 chat format needs")
    start_header = tok.token_id("<|start_header_id|>")
    end_header = tok.token_id("<|end_header_id|>")
    eot = tok.token_id("<|eot_id|>")

    pieces = [(tok.bos_id, False)]

    def header(role):
        pieces.extend([(start_header, False), (role, 0, False), (end_header, False)])

    if style == "llama3.1":
        # Llama 3.1 always opens with a system turn carrying its knowledge-cutoff preamble; a
        # leading system message's text goes after that preamble.
        system_text = ""
        if messages[0]["role"] == "system":
            system_text = messages[0]["content"].strip()
            messages = messages[1:]
        header("system")
        preamble = f"\n\nCutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
        pieces.extend([(preamble + system_text, 0, False), (eot, False)])
    for message in messages:
        trainable = message["role"] == "assistant"
        header(message["role"])
        # Jinja's |trim is Python's str.strip().
        pieces.extend([("\n\n" + message["content"].strip(), 2, trainable), (eot, trainable)])
    if add_generation_prompt:
        header("assistant")
        pieces.append(("\n\n", 0, False))
    return pieces


def _tokenize_pieces(tok, conversations_pieces):
    """Encodes many conversations' pieces in one batch; returns (tokens, mask) per conversation."""
    texts = [(p[0], p[1]) for pieces in conversations_pieces for p in pieces if len(p) == 3]
    encoded = iter(tok._encode_split(texts))
    out = []
    for pieces in conversations_pieces:
        tokens, mask = [], []
        for piece in pieces:
            if len(piece) == 2:
                tokens.append(piece[0])
                mask.append(piece[1])
            else:
                ids, n_head = next(encoded)
                tokens.extend(ids)
                mask.extend([False] * n_head + [piece[2]] * (len(ids) - n_head))
        out.append((tokens, mask))
    return out


def format_chat(tok, messages, add_generation_prompt=False):
    """Llama 3.1 chat formatting: (tokens, mask), mask True on the assistant's content + <|eot_id|>.

    Matches `apply_chat_template` with Llama 3.1's template token for token, with one deliberate
    difference: special-token strings typed inside a message stay plain text.
    """
    return _tokenize_pieces(tok, [_chat_pieces(tok, messages, add_generation_prompt)])[0]


# ----------------------------------------------------------------------------------------------
# Stage 1: corpus -> token file
# ----------------------------------------------------------------------------------------------

def builtin_corpus_files():
    """The built-in corpus: every .py file of this Python's standard library (no site-packages).

    Real text on every machine, thousands of documents, hundreds longer than 8K tokens.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
    return files


def _builtin_domain(path):
    """Two domains for the built-in corpus, so per-domain sampling has something to do."""
    parts = path.split(os.sep)
    if "test" in parts or "tests" in parts or os.path.basename(path).startswith("test_"):
        return "stdlib-tests"
    return "stdlib"


def _is_jsonl(path):
    return path.endswith((".jsonl", ".jsonl.gz", ".ndjson"))


def _open_binary(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _expand_inputs(paths):
    """Files, directories (recursively, hidden names skipped) and globs -> a sorted list of files."""
    if isinstance(paths, str):
        paths = [paths]
    files = []
    for pattern in paths:
        if os.path.isdir(pattern) or os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"input {pattern!r} is neither a file, a directory nor a matching glob")
        for match in matches:
            if os.path.isfile(match):
                files.append(match)
                continue
            found = []
            for directory, subdirs, names in os.walk(match):
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                found.extend(os.path.join(directory, n) for n in names if not n.startswith("."))
            files.extend(sorted(found))
    return files


class _BadRecords:
    """Raises on a bad record, or with skip_bad counts it and keeps a few examples for the log."""

    def __init__(self, skip_bad):
        self.skip_bad = skip_bad
        self.count = 0
        self.examples = []

    def __call__(self, message):
        if not self.skip_bad:
            raise DataError(message + " (pass skip_bad=True to skip and count bad records)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def _read_text_file(path, bad):
    """A plain-text file is one document; returns its text, or None when it was bad and skipped."""
    with _open_binary(path) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        bad(f"{path} line {line}: undecodable bytes (not UTF-8) at byte {e.start}")
        return None


def read_jsonl(path, bad=None):
    """Yields (line_number, record dict) for each JSON object line of a .jsonl (or .jsonl.gz) file.
    The one JSONL reader: a bad line raises DataError naming the file and line, or with a `bad`
    callable (a _BadRecords) is handed to it and skipped."""
    if bad is None:
        def bad(message):
            raise DataError(message)
    with _open_binary(path) as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(f"{path} line {line_number}: undecodable bytes (not UTF-8) at column {e.start + 1}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(f"{path} line {line_number}: malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                bad(f"{path} line {line_number}: the record is not a JSON object")
                continue
            yield line_number, record


def _iter_documents(files, bad, domain_of):
    """Yields (text, domain) for every document of the inputs, in order, streaming."""
    for path in files:
        if not _is_jsonl(path):
            text = _read_text_file(path, bad)
            if text is not None:
                yield text, domain_of(path)
            continue
        default_domain = os.path.basename(path).split(".")[0]
        for line_number, record in read_jsonl(path, bad):
            text = record.get("text")
            domain = record.get("domain", default_domain)
            if not isinstance(text, str):
                what = "has no 'text' field" if text is None else "has a 'text' field that is not a string"
                bad(f"{path} line {line_number}: the record {what}")
                continue
            if not isinstance(domain, str):
                bad(f"{path} line {line_number}: the record's 'domain' is not a string")
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON's \\ud800 escapes decode to unpaired surrogates
                bad(f"{path} line {line_number}: 'text' holds an unpaired surrogate, which is not valid Unicode")
                continue
            yield text, domain


class TokenFileWriter:
    """Writes a token file into `out_dir`, atomically: it appears whole in close(), or not at all.

    Layout: tokens.u32 (flat uint32 ids), offsets.npy / lengths.npy / domains.npy (int64, int64,
    int32 per document) and meta.json (domain names, counts).
    """

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.tmp_dir = f"{out_dir}.tmp-{uuid.uuid4().hex}"
        os.makedirs(self.tmp_dir)
        self._tokens = open(os.path.join(self.tmp_dir, "tokens.u32"), "wb")
        self._lengths = array.array("q")
        self._domains = array.array("i")
        self._domain_index = {}

    def _domain_id(self, domain):
        return self._domain_index.setdefault(domain, len(self._domain_index))

    def add_many(self, flat_tokens, lengths, domains):
        """Appends documents given as one flat uint32 array, their lengths and domain names."""
        flat_tokens.astype(np.uint32, copy=False).tofile(self._tokens)
        self._lengths.extend(int(n) for n in lengths)
        self._domains.extend(self._domain_id(d) for d in domains)

    def add(self, tokens, domain="default"):
        tokens = np.asarray(tokens)
        self.add_many(tokens, [len(tokens)], [domain])

    def abort(self):
        """Drops the half-written file."""
        self._tokens.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def close(self, stats=None):
        self._tokens.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64).copy()
        keep = lengths > 0  # a zero-length document cannot be packed or sampled
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        np.save(os.path.join(self.tmp_dir, "offsets.npy"), offsets[keep])
        np.save(os.path.join(self.tmp_dir, "lengths.npy"), lengths[keep])
        np.save(os.path.join(self.tmp_dir, "domains.npy"), np.frombuffer(self._domains, dtype=np.int32)[keep])
        stats = dict(stats or {})
        stats["empty_documents"] = stats.get("empty_documents", 0) + int((~keep).sum())
        meta = {
            "format": 1,
            "n_tokens": int(lengths.sum()),
            "n_docs": int(keep.sum()),
            "domain_names": sorted(self._domain_index, key=self._domain_index.get),
            "stats": stats,
        }
        if meta["n_docs"] == 0:
            shutil.rmtree(self.tmp_dir)
            raise DataError(f"the corpus for {self.out_dir} holds no documents with any tokens ({stats})")
        _write_json_atomic(os.path.join(self.tmp_dir, "meta.json"), meta)
        try:
            os.rename(self.tmp_dir, self.out_dir)
        except OSError:
            # Another process finished the same file first: theirs is identical, keep it.
            if not os.path.isfile(os.path.join(self.out_dir, "meta.json")):
                raise
            shutil.rmtree(self.tmp_dir)
        return TokenFile(self.out_dir)


class TokenFile:
    """A tokenized corpus on disk: one flat uint32 memmap plus a per-document index."""

    def __init__(self, path):
        self.path = path
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        self.tokens_path = os.path.join(path, "tokens.u32")
        self.n_tokens = meta["n_tokens"]
        self.tokens = np.memmap(self.tokens_path, dtype=np.uint32, mode="r", shape=(self.n_tokens,))
        self.offsets = np.load(os.path.join(path, "offsets.npy"))  # (n_docs,) int64, in tokens
        self.lengths = np.load(os.path.join(path, "lengths.npy"))  # (n_docs,) int64
        self.domains = np.load(os.path.join(path, "domains.npy"))  # (n_docs,) int32 into domain_names
        self.domain_names = meta["domain_names"]
        self.stats = meta["stats"]

    def __reduce__(self):
        # Pickle (e.g. into a worker process) by path: a memmap would pickle the whole file.
        return TokenFile, (self.path,)

    @property
    def n_docs(self):
        return len(self.lengths)

    def doc(self, i):
        """Document i's tokens, a (length,) uint32 view into the memmap."""
        return self.tokens[self.offsets[i] : self.offsets[i] + self.lengths[i]]

    def __repr__(self):
        return f"TokenFile({self.path}: {self.n_docs} documents, {self.n_tokens} tokens)"


def _cache_key(files, tok, skip_bad, builtin):
    described = []
    for path in files:
        st = os.stat(path)
        described.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    key = {"format": 1, "files": described, "tokenizer": tok.identity, "skip_bad": skip_bad, "builtin": builtin}
    return _sha256(json.dumps(key))[:20]


def build_token_file(paths, tok, cache_dir, skip_bad=False, log=print, progress=False):
    """Tokenizes a corpus into `cache_dir`, or reuses the token file of an identical earlier run.

    paths: files, directories and globs; JSONL files (.jsonl, .jsonl.gz, .ndjson) hold one
    document per line in a `text` field with an optional `domain` (default: the file's name),
    every other file is one plain-text document (domain: its directory's name). None = the built-in
    corpus (the standard library's sources; its few non-UTF-8 files are skipped and counted).
    The cache key covers the files' paths, sizes and mtimes and the tokenizer, so a changed input
    rebuilds. Documents stream through in batches: a corpus larger than memory is fine.
    """
    builtin = paths is None
    files = builtin_corpus_files() if builtin else _expand_inputs(paths)
    if not files:
        raise DataError(f"the inputs {paths} contain no files, so the corpus is empty")
    out_dir = os.path.join(cache_dir, "tokens-" + _cache_key(files, tok, skip_bad, builtin))
    if os.path.isfile(os.path.join(out_dir, "meta.json")):
        token_file = TokenFile(out_dir)
        if log:
            log(f"reusing {token_file}")
        return token_file

    os.makedirs(cache_dir, exist_ok=True)
    bad = _BadRecords(skip_bad or builtin)
    if builtin:
        domain_of = _builtin_domain
    else:
        def domain_of(path):
            return os.path.basename(os.path.dirname(os.path.abspath(path)))

    writer = TokenFileWriter(out_dir)
    n_documents = n_empty = 0
    batch_texts, batch_domains, batch_chars = [], [], 0

    def flush():
        flat, lengths = tok.encode_flat(batch_texts)
        writer.add_many(flat, lengths, batch_domains)
        batch_texts.clear()
        batch_domains.clear()

    try:
        for text, domain in tqdm(_iter_documents(files, bad, domain_of), disable=not progress, unit="doc"):
            if not text:
                n_empty += 1
                continue
            n_documents += 1
            batch_texts.append(text)
            batch_domains.append(domain)
            batch_chars += len(text)
            # Batches of a few MB keep every core busy in the encoder and memory bounded.
            if batch_chars >= 8_000_000 or len(batch_texts) >= 4096:
                flush()
                batch_chars = 0
        if batch_texts:
            flush()
        stats = {
            "files": len(files),
            "documents": n_documents,
            "empty_documents": n_empty,
            "bad_skipped": bad.count,
            "bad_examples": bad.examples,
        }
        if n_documents == 0:
            raise DataError(f"the inputs {paths} hold no documents with text, so the corpus is empty ({stats})")
        token_file = writer.close(stats)
    except BaseException:
        writer.abort()
        raise
    if log:
        log(
            f"tokenized {len(files)} files into {token_file}; skipped {bad.count} bad records"
            f" and {token_file.stats['empty_documents']} empty documents"
        )
        for example in bad.examples:
            log(f"  skipped: {example}")
    return token_file


# ----------------------------------------------------------------------------------------------
# Stage 1: length-based sampling
# ----------------------------------------------------------------------------------------------

def sample_by_length(token_file, budget_tokens, seed, short=4096, long=8192, down_rate=0.5, up_rate=2.0, log=print):
    """Samples documents per domain by length until `budget_tokens`, as the paper does.

    Each document's expected number of copies is proportional to its rate: `down_rate` below
    `short` tokens, `up_rate` above `long`, 1 in between (the paper does not publish its rates:
    0.5 and 2 are this project's defaults). Every domain keeps its share of the corpus's tokens.
    Within a domain the copies are drawn with a seeded generator and cut where the domain's share is
    reached; the domains are then shuffled together and cut at the budget, so the total is the
    budget plus less than one document. Returns document indices (int64) in sampled order.
    """
    if budget_tokens <= 0:
        raise DataError(f"the token budget must be positive, not {budget_tokens}")
    if not 0 < short <= long:
        raise DataError(f"the length thresholds must satisfy 0 < short <= long, not short={short}, long={long}")
    if down_rate < 0 or up_rate < 0:
        raise DataError(f"the sampling rates must be non-negative, not down_rate={down_rate}, up_rate={up_rate}")
    lengths = token_file.lengths
    rate = np.where(lengths < short, down_rate, np.where(lengths > long, up_rate, 1.0))
    rng = np.random.default_rng(seed)

    # Domain shares follow the original token counts, among the domains that can contribute at all.
    can_sample = np.zeros(len(token_file.domain_names), dtype=bool)
    domain_tokens = np.zeros(len(token_file.domain_names))
    for d in range(len(token_file.domain_names)):
        in_domain = token_file.domains == d
        domain_tokens[d] = lengths[in_domain].sum()
        can_sample[d] = (rate[in_domain] * lengths[in_domain]).sum() > 0
    if not can_sample.any():
        raise DataError("every document has sampling rate 0, so nothing can be sampled")
    shares = np.where(can_sample, domain_tokens, 0) / domain_tokens[can_sample].sum()

    picked = []
    for d in np.flatnonzero(can_sample):
        docs = np.flatnonzero(token_file.domains == d)
        domain_budget = budget_tokens * shares[d]
        expected = rate[docs] * domain_budget / (rate[docs] * lengths[docs]).sum()
        # Integer copies with the expected count: floor plus a coin flip for the fraction.
        copies = np.floor(expected).astype(np.int64) + (rng.random(len(docs)) < expected % 1)
        chosen = np.repeat(docs, copies)
        rng.shuffle(chosen)
        # The coin flips can fall short of the share: top up with draws proportional to the rate.
        probability = rate[docs] / rate[docs].sum()
        while lengths[chosen].sum() < domain_budget:
            extra = rng.choice(docs, size=max(16, len(docs) // 16), p=probability)
            chosen = np.concatenate([chosen, extra])
        cumulative = np.cumsum(lengths[chosen])
        picked.append(chosen[: np.searchsorted(cumulative, domain_budget) + 1])
    order = np.concatenate(picked)
    rng.shuffle(order)
    cumulative = np.cumsum(lengths[order])
    order = order[: np.searchsorted(cumulative, budget_tokens) + 1]
    if log:
        log(_length_histogram(lengths, lengths[order], short, long, budget_tokens))
    return order


def _length_histogram(before, after, short, long, budget_tokens):
    """A text table of token shares by document length, before and after sampling."""
    lowest = max(1, short // 8)
    edges = [0] + [lowest * 2**k for k in range(64) if lowest * 2**k <= max(before.max(), long)]
    edges = sorted(set(edges + [short, long])) + [np.inf]
    lines = [
        f"length-based sampling: {len(before)} documents, {before.sum():,} tokens -> "
        f"{len(after)} documents, {after.sum():,} tokens (budget {budget_tokens:,})",
        f"  {'':>24}  {'before':<35}  {'after':<35}",
        f"  {'doc length (tokens)':>24}  {'docs':>7} {'tokens':>6} {'':20}  {'docs':>7} {'tokens':>6}",
    ]
    for low, high in zip(edges[:-1], edges[1:]):
        in_before = (before >= low) & (before < high)
        in_after = (after >= low) & (after < high)
        share_before = before[in_before].sum() / before.sum()
        share_after = after[in_after].sum() / after.sum()
        label = f"[{int(low)}, {'inf' if high == np.inf else int(high)})"
        tag = "down" if high <= short else ("up" if low >= long else "")
        lines.append(
            f"  {label:>24}  {in_before.sum():>7} {share_before:6.1%} {'#' * round(share_before * 20):<20}"
            f"  {in_after.sum():>7} {share_after:6.1%} {'#' * round(share_after * 20):<20} {tag}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Stage 1: packing
# ----------------------------------------------------------------------------------------------

def _empty_batch_tensors(*shape):
    """Four int64 tensors to fill, allocated by numpy: for tens of MB it asks the kernel for huge
    pages, which fill several times faster here than torch.empty's fresh 4 KB pages."""
    return {key: torch.from_numpy(np.empty(shape, dtype=np.int64)) for key in BATCH_KEYS}


SEPARATORS = ("<s>", "bos", "eos", "none")


def separator_ids(tok, separator="<s>"):
    """The ids that follow every document: the paper's "<s>" (the plain text, tokenized as text),
    the tokenizer's bos or eos token, or nothing (the ablation without a separator)."""
    if separator == "<s>":
        return tok.encode("<s>")
    if separator == "bos":
        return [tok.bos_id]
    if separator == "eos":
        return [tok.eos_id]
    if separator == "none":
        return []
    raise DataError(f"unknown separator {separator!r}; expected one of {', '.join(SEPARATORS)}")


def _read_tokens_into(fd, out, first_token):
    """Fills the uint32 array `out` from the token file at token offset `first_token`, with pread:
    unlike reading through the memmap, nothing stays mapped, so resident memory does not grow."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], first_token * 4 + done)
        if n <= 0:
            raise DataError(f"the token file ended early at token {first_token + done // 4}")
        done += n


class PackedDataset:
    """Sequence i = stream[i*ctx : i*ctx + ctx + 1], where the stream is the sampled documents, each
    followed by the separator. A document longer than what is left continues in the next sequence;
    consecutive sequences share one token (the last label of i is the first token of i+1). The
    last, partial sequence is padded (pad_id, labels -100, doc_ids -1) unless drop_last. Reading a
    sequence holds only that sequence in memory.

    Every stream token but the first is a label exactly once; the last one is also an input when
    the padded last sequence holds it.

    doc_ids: the index of the document in `doc_order`, for the masked ablation; its separator
    belongs to it. positions: 0..ctx-1, or with doc_mask the offset since the document (or the
    sequence) began.
    """

    def __init__(self, token_file, doc_order, ctx, sep_ids, doc_mask=False, pad_id=0, drop_last=False):
        self.token_file = token_file
        self.doc_order = np.asarray(doc_order, dtype=np.int64)  # (n,) indices into token_file
        self.ctx = ctx
        self.sep = np.asarray(sep_ids, dtype=np.uint32)
        self.doc_mask = doc_mask
        self.pad_id = pad_id
        if ctx <= len(self.sep):
            raise DataError(f"the window ctx={ctx} must be longer than the separator ({len(self.sep)} tokens)")
        if len(self.doc_order) == 0:
            raise DataError("the document order is empty, so there is nothing to pack")
        self.doc_offsets = token_file.offsets[self.doc_order]  # (n,) where each document's tokens start
        self.doc_lengths = token_file.lengths[self.doc_order]  # (n,)
        # doc_starts[k]: where document k starts in the stream; doc_starts[-1]: the stream's length.
        self.doc_starts = np.zeros(len(self.doc_order) + 1, dtype=np.int64)
        np.cumsum(self.doc_lengths + len(self.sep), out=self.doc_starts[1:])
        self.stream_len = int(self.doc_starts[-1])
        # A sequence needs ctx+1 stream tokens; the stream's first token is never a label.
        n_full = (self.stream_len - 1) // ctx
        self.n_sequences = n_full if drop_last or (self.stream_len - 1) % ctx == 0 else n_full + 1
        if self.n_sequences == 0:
            raise DataError(f"the sampled stream ({self.stream_len} tokens) is shorter than one window of {ctx}")
        self._fd = None
        self._fd_pid = None
        self._scratch_buffer = None
        self._count_up_buffer = None

    def __len__(self):
        return self.n_sequences

    def __getitem__(self, i):
        return self.read(i, 0, self.ctx)

    def _file(self):
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.token_file.tokens_path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        state["_scratch_buffer"] = state["_count_up_buffer"] = None
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)

    def _check_index(self, i):
        if not 0 <= i < self.n_sequences:
            raise IndexError(f"sequence {i} is out of range for {self.n_sequences} sequences")

    def _assemble(self, first, raw):
        """Fills raw (uint32) with the stream from position `first` on: documents read from the
        token file, separators after them, nothing past the stream's end. Returns the pieces as
        (where in raw, how many, document k, stream position) and how many tokens exist."""
        have = max(0, min(len(raw), self.stream_len - first))  # the rest is past the stream
        fd = self._file()
        pieces = []
        k = int(np.searchsorted(self.doc_starts, first, side="right")) - 1
        filled = 0
        while filled < have:
            doc_start, doc_end = int(self.doc_starts[k]), int(self.doc_starts[k + 1])
            body_end = doc_start + int(self.doc_lengths[k])
            at = first + filled  # stream position being filled
            take = min(doc_end, first + have) - at
            if at < body_end:  # inside the document's own tokens, then maybe its separator
                from_body = min(body_end, first + have) - at
                _read_tokens_into(fd, raw[filled : filled + from_body], int(self.doc_offsets[k]) + at - doc_start)
                raw[filled + from_body : filled + take] = self.sep[: take - from_body]
            else:  # inside the separator that follows it
                raw[filled : filled + take] = self.sep[at - body_end : at - body_end + take]
            pieces.append((filled, take, k, at))
            filled += take
            k += 1
        return pieces, have

    def read_stream(self, i, start=0, stop=None, out=None):
        """The packing itself: stream tokens [start, stop + 1) of sequence i as a (stop-start+1,)
        uint32 array (inputs, and the labels shifted by one), padded with pad_id past the stream.
        4 bytes a token: the compact form to ship elsewhere."""
        self._check_index(i)
        stop = self.ctx if stop is None else stop
        raw = np.empty(stop - start + 1, dtype=np.uint32) if out is None else out
        _, have = self._assemble(i * self.ctx + start, raw)
        raw[have:] = self.pad_id
        return raw

    def read(self, i, start, stop, out=None):
        """Positions [start, stop) of sequence i (what one context-parallel chunk needs).

        out: optional dict of four (stop - start,) int64 tensors to fill in place; the loader
        passes rows of its batch, so a multi-million-token sequence is written once, not copied.
        """
        self._check_index(i)
        n = stop - start
        if out is None:
            out = _empty_batch_tensors(n)
        tokens, labels, positions, doc_ids = (out[key].numpy() for key in BATCH_KEYS)  # (n,) each
        raw = self._scratch(n + 1)  # (n+1,) uint32 stream tokens; raw[1:] are the labels
        sequence_start = i * self.ctx
        pieces, have = self._assemble(sequence_start + start, raw)
        real = min(have, n)  # inputs that come from the stream
        tokens[:real] = raw[:real]
        tokens[real:] = self.pad_id
        labels[: max(have - 1, 0)] = raw[1:have]
        labels[max(have - 1, 0) :] = IGNORE_INDEX  # no next token beyond the stream
        count_up = self._count_up()
        for filled, take, k, at in pieces:
            end = min(filled + take, n)  # raw's last token is a label only
            doc_ids[filled:end] = k
            if self.doc_mask:  # restart at the document's start, or the sequence's
                since = max(int(self.doc_starts[k]), sequence_start)
                positions[filled:end] = count_up[at - since : at - since + end - filled]
        doc_ids[real:] = -1
        if self.doc_mask:
            positions[real:] = count_up[: n - real]
        else:
            positions[:] = count_up[start:stop]
        return out

    # Buffers kept across reads: allocating and faulting in 16-32 MB afresh on every 4M-token read
    # would cost more than filling them.
    def _scratch(self, size):
        """A uint32 staging buffer for the stream tokens."""
        if self._scratch_buffer is None or len(self._scratch_buffer) < size:
            self._scratch_buffer = np.empty(size, dtype=np.uint32)
        return self._scratch_buffer[:size]

    def _count_up(self):
        """0, 1, ..., ctx: positions are copied out of it."""
        if self._count_up_buffer is None:
            self._count_up_buffer = np.arange(self.ctx + 1, dtype=np.int64)
        return self._count_up_buffer


# ----------------------------------------------------------------------------------------------
# Stage 2: chat data
# ----------------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _synthetic_example(rng):
    """One SYNTHETIC conversation: arithmetic, key-value recall or copying, with an exact answer."""
    task = rng.choice(["arithmetic", "recall", "copy"])
    if task == "arithmetic":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = f"What is {a} {op} {b}?"
    elif task == "recall":
        keys = rng.sample([a + b + c for a in _LETTERS for b in _LETTERS for c in _LETTERS[:8]], rng.randint(3, 8))
        values = [rng.randint(100, 999) for _ in keys]
        asked = rng.randrange(len(keys))
        pairs = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
        question = f"Remember these pairs:\n{pairs}\nWhat is the value of {keys[asked]}?"
        answer = values[asked]
    else:
        text = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(6, 24)))
        question = f"Copy this exactly: {text}"
        answer = text
    return [{"role": "user", "content": question}, {"role": "assistant", "content": str(answer)}]


def synthetic_chat(n, seed=0, split="train"):
    """n SYNTHETIC conversations (generated by code, not real chat data) for the CPU demo.

    Tasks: arithmetic, key-value recall, copying; the assistant's reply is the exact answer, so
    messages[-1]["content"] is the reference for an exact-match check. split="test" draws from a
    held-out tenth of prompts (by a hash of the prompt), disjoint from split="train".
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        messages = _synthetic_example(rng)
        digest = hashlib.blake2b(messages[0]["content"].encode("utf-8"), digest_size=8).digest()
        held_out = int.from_bytes(digest, "little") % 10 == 0
        if held_out == (split == "test"):
            out.append(messages)
    return out


def _completion_pieces(tok, record):
    """A plain {"prompt", "completion"} record, no chat template: <|begin_of_text|> prompt
    completion <|end_of_text|>, trained on the completion and the end token; with the optional
    "train_eos": false, on the completion alone (the end token is still there, as context). Prompt
    and completion are encoded separately, as generation sees them (the prompt's tokens, then new ones)."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataError("a prompt/completion record needs a string 'prompt' and a non-empty string 'completion'")
    train_eos = record.get("train_eos", True)
    if not isinstance(train_eos, bool):
        raise DataError(f"'train_eos' must be true or false, not {train_eos!r}")
    if tok.bos_id is None or tok.eos_id is None:
        raise DataError("prompt/completion records need a tokenizer with <|begin_of_text|> and <|end_of_text|>")
    return [(tok.bos_id, False), (prompt, 0, False), (completion, 0, True), (tok.eos_id, train_eos)]


def _read_chat_source(source, bad):
    """Yields (where, messages) from a JSONL path/glob or an in-memory list of conversations;
    a {"prompt", "completion"} record is yielded as that dict."""
    if isinstance(source, str):
        for path in _expand_inputs([source]):
            for line_number, record in read_jsonl(path, bad):
                if "messages" in record:
                    yield f"{path} line {line_number}", record["messages"]
                elif "prompt" in record or "completion" in record:
                    yield f"{path} line {line_number}", record
                else:
                    bad(f"{path} line {line_number}: the record has neither 'messages' nor 'prompt' and 'completion'")
    else:
        for k, messages in enumerate(source):
            yield f"conversation {k} of an in-memory source", messages


class ChatDataset:
    """Chat conversations, blended by weight, formatted with Llama 3.1's template and packed.

    sources: [(source, weight), ...]; a source is a JSONL path or glob (one {"messages": [{"role",
    "content"}, ...]} per line, or one plain {"prompt", "completion"} per line: no template, trained
    on the completion and <|end_of_text|>, or on the completion alone with "train_eos": false) or
    an in-memory list of conversations (e.g. synthetic_chat()).
    A weight is a multiplier: 2 repeats every conversation twice, 0.5 keeps a seeded half.
    Conversations are shuffled (seeded) and packed in order into rows of at most max_len tokens
    (a conversation that does not fit starts the next row; rows are padded). Labels are -100
    except on the assistant's content and its <|eot_id|>. A conversation longer than max_len is
    truncated (truncate=True) or skipped, and counted either way; bad records (malformed JSON,
    no 'messages', an unknown role, no assistant turn) raise DataError naming file and line, or
    with skip_bad are skipped and counted. `stats` holds the counts.
    """

    def __init__(self, sources, tok, max_len, seed=0, skip_bad=False, truncate=True, doc_mask=False, log=print):
        self.ctx = max_len
        self.doc_mask = doc_mask
        self.pad_id = tok.pad_id if tok.pad_id is not None else 0
        bad = _BadRecords(skip_bad)
        pieces, source_of = [], []
        for s, (source, weight) in enumerate(sources):
            if not (weight >= 0 and math.isfinite(weight)):
                raise DataError(f"the weight of source {s} must be a finite non-negative number, not {weight}")
            for where, messages in _read_chat_source(source, bad):
                try:
                    if isinstance(messages, dict):  # a plain prompt/completion record
                        conversation = _completion_pieces(tok, messages)
                    else:
                        conversation = _chat_pieces(tok, messages, add_generation_prompt=False)
                        if not any(m["role"] == "assistant" for m in messages):
                            raise DataError("the conversation has no assistant turn, so it has nothing to learn from")
                except DataError as e:
                    bad(f"{where}: {e}")
                    continue
                pieces.append(conversation)
                source_of.append(s)
        if not pieces:
            raise DataError(f"the chat sources hold no usable conversations ({bad.count} bad records skipped)")

        # Tokenize every distinct conversation once, in batches, into flat arrays.
        tokens_list, mask_list = [], []
        for i in range(0, len(pieces), 1024):
            for tokens, mask in _tokenize_pieces(tok, pieces[i : i + 1024]):
                tokens_list.append(np.asarray(tokens, dtype=np.uint32))
                mask_list.append(np.asarray(mask, dtype=bool))
        lengths = np.array([len(t) for t in tokens_list], dtype=np.int64)
        too_long = lengths > max_len
        kept_lengths = np.minimum(lengths, max_len)
        usable = np.array([m[:max_len].any() for m in mask_list]) & (truncate | ~too_long)
        if not usable.any():
            raise DataError(
                f"the chat sources hold no usable conversations: all {len(usable)} are longer than "
                f"max_len={max_len}" + (" before the assistant's first token" if truncate else "")
            )
        self.tokens = np.concatenate(tokens_list)  # (total,) every conversation's tokens, flat
        self.mask = np.concatenate(mask_list)  # (total,) True on trainable tokens
        self.conv_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.conv_lengths = kept_lengths

        # Blend: floor(w) copies of every conversation plus a seeded fraction, then shuffle.
        rng = np.random.default_rng(seed)
        source_of = np.asarray(source_of)
        blend = []
        for s, (_, weight) in enumerate(sources):
            members = np.flatnonzero((source_of == s) & usable)
            blend.append(np.repeat(members, int(weight)))
            fraction = weight - int(weight)
            blend.append(rng.choice(members, size=round(fraction * len(members)), replace=False))
        self.blend = np.concatenate(blend).astype(np.int64)  # (m,) conversation per occurrence
        rng.shuffle(self.blend)
        if len(self.blend) == 0:
            raise DataError("the weights leave no conversations to train on")

        # Next-fit packing keeps the shuffled order: rows are runs of consecutive occurrences.
        bounds, used = [0], 0
        for j, conversation in enumerate(self.blend):
            if used + self.conv_lengths[conversation] > max_len:
                bounds.append(j)
                used = 0
            used += self.conv_lengths[conversation]
        bounds.append(len(self.blend))
        self.row_bounds = np.asarray(bounds, dtype=np.int64)

        self.stats = {
            "conversations": len(pieces),
            "bad_skipped": bad.count,
            "bad_examples": bad.examples,
            "truncated": int((too_long & usable).sum()) if truncate else 0,
            "too_long_skipped": int((too_long & ~usable).sum()),
            "blended": len(self.blend),
            "rows": len(self),
            "fill": float(self.conv_lengths[self.blend].sum() / (len(self) * max_len)),
        }
        if log:
            log(
                f"chat data: {self.stats['conversations']} conversations, {bad.count} bad skipped, "
                f"{self.stats['truncated']} truncated, {self.stats['too_long_skipped']} too long skipped; "
                f"{len(self.blend)} after weighting, packed into {len(self)} rows of {max_len} "
                f"({self.stats['fill']:.0%} full)"
            )
            for example in bad.examples:
                log(f"  skipped: {example}")

    def __len__(self):
        return len(self.row_bounds) - 1

    def __getitem__(self, i):
        return self.read(i, 0, self.ctx)

    def read(self, i, start, stop, out=None):
        """Positions [start, stop) of row i; `out` as in PackedDataset.read."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} is out of range for {len(self)} rows")
        tokens = np.full(self.ctx, self.pad_id, dtype=np.int64)  # (ctx,)
        trainable = np.zeros(self.ctx + 1, dtype=bool)  # (ctx+1,) one spare: the last label is -100
        doc_ids = np.full(self.ctx, -1, dtype=np.int64)
        positions = np.arange(self.ctx, dtype=np.int64)
        at = 0
        for occurrence in range(self.row_bounds[i], self.row_bounds[i + 1]):
            conversation = self.blend[occurrence]
            offset, length = self.conv_offsets[conversation], self.conv_lengths[conversation]
            tokens[at : at + length] = self.tokens[offset : offset + length]
            trainable[at : at + length] = self.mask[offset : offset + length]
            doc_ids[at : at + length] = occurrence
            if self.doc_mask:
                positions[at : at + length] = np.arange(length)
            at += length
        if self.doc_mask:
            positions[at:] = np.arange(self.ctx - at)
        # labels[j] is tokens[j+1] when that token is trainable. A conversation's first token
        # (<|begin_of_text|>) never is, so no label crosses from one conversation to the next.
        labels = np.where(trainable[1:], np.append(tokens[1:], self.pad_id), IGNORE_INDEX)
        row = {"tokens": tokens, "labels": labels, "positions": positions, "doc_ids": doc_ids}
        if out is None:
            return {key: torch.from_numpy(row[key][start:stop].copy()) for key in BATCH_KEYS}
        for key in BATCH_KEYS:
            out[key].numpy()[:] = row[key][start:stop]
        return out


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------

def _zigzag_ranges(seq_len, cp_rank, cp_size):
    """The two [start, stop) chunks of 2*cp_size that rank cp_rank holds: r and 2*cp_size-1-r,
    the same split as attention.zigzag_indices (tests check it), as ranges so that the loader
    reads only those chunks of a multi-million-token sequence."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise DataError(f"cp_rank must be in [0, cp_size), not cp_rank={cp_rank}, cp_size={cp_size}")
    if seq_len % (2 * cp_size):
        raise DataError(f"sequence length {seq_len} must be divisible by 2 x cp = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    late = 2 * cp_size - 1 - cp_rank
    return [(cp_rank * chunk, (cp_rank + 1) * chunk), (late * chunk, (late + 1) * chunk)]


class Loader:
    """Batches for one (data-parallel, context-parallel) rank, deterministic given the seed.

    Every step takes the next batch_size * dp_size sequences of the epoch's permutation (seeded by
    seed and epoch); data-parallel rank r gets the r-th run of batch_size. Each sequence is cut to
    the context-parallel rank's zigzag chunks, reading only those. Without drop_last, the last step
    of an epoch is filled with the epoch's first sequences, so every rank takes the same number of
    steps and the ranks together see every sequence. Iterates epoch after epoch (or `epochs` of
    them). state_dict() after a batch resumes exactly at the next one.
    Yields {"tokens", "labels", "positions", "doc_ids"}, each (batch_size, ctx // cp_size).
    """

    def __init__(self, dataset, batch_size, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1, seed=0,
                 shuffle=True, drop_last=False, epochs=None):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank must be in [0, dp_size), not dp_rank={dp_rank}, dp_size={dp_size}")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, not {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.ranges = _zigzag_ranges(dataset.ctx, cp_rank, cp_size) if cp_size > 1 else [(0, dataset.ctx)]
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epochs = epochs
        self.global_batch = batch_size * dp_size
        n = len(dataset)
        self.steps_per_epoch = n // self.global_batch if drop_last else -(-n // self.global_batch)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} sequences do not fill one global batch of {self.global_batch} with drop_last")
        self.epoch = 0
        self.step = 0  # the next step within the epoch

    def epoch_order(self, epoch):
        """The epoch's sequence order, padded to whole global batches: (steps_per_epoch * global_batch,)."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return np.resize(order, self.steps_per_epoch * self.global_batch)  # resize repeats from the start

    def batch_indices(self, epoch, step):
        """The dataset indices this rank reads at (epoch, step)."""
        first = step * self.global_batch + self.dp_rank * self.batch_size
        return self.epoch_order(epoch)[first : first + self.batch_size]

    def __iter__(self):
        order_epoch, order = None, None
        while self.epochs is None or self.epoch < self.epochs:
            if self.step >= self.steps_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
                continue
            if order_epoch != self.epoch:
                order_epoch, order = self.epoch, self.epoch_order(self.epoch)
            first = self.step * self.global_batch + self.dp_rank * self.batch_size
            batch = self._read_batch(order[first : first + self.batch_size])
            # Advance before yielding, so a state_dict() taken after this batch resumes after it.
            self.step += 1
            yield batch

    def _read_batch(self, indices):
        """The dataset writes straight into the batch: (batch_size, local_len) per key."""
        local_len = sum(b - a for a, b in self.ranges)
        batch = _empty_batch_tensors(len(indices), local_len)
        for row, index in enumerate(indices):
            at = 0
            for a, b in self.ranges:
                self.dataset.read(int(index), a, b, out={key: batch[key][row, at : at + b - a] for key in BATCH_KEYS})
                at += b - a
        return batch

    def state_dict(self):
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "num_sequences": len(self.dataset),
            "global_batch": self.global_batch,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state):
        for key in ("seed", "num_sequences", "global_batch", "shuffle", "drop_last"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise DataError(f"cannot resume: the saved loader has {key}={state[key]} but this one has {mine}")
        self.epoch, self.step = state["epoch"], state["step"]
