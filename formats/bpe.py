"""Tokenizer files of other formats: byte-level BPE in GPT-2's format (SmolLM2, StarCoder,
Qwen2, ...), and Hugging Face's tokenizer_config.json beside any tokenizer.

A vocabulary of byte strings and a list of merges, read from a llama.cpp `.gguf` file (its
tokenizer.ggml.* metadata) or from a Hugging Face `tokenizer.json` into the parts of a
tokenizer.BPETokenizer, and written back as a `tokenizer.json` + `tokenizer_config.json` pair
(`BPETokenizer.save`), so that a model exported from a GGUF file loads in transformers with its
tokenizer and chat template. The pre-tokenizer patterns, Llama-3's among them, are here too.

tokenizer.py's `Tokenizer.from_file` comes here for .gguf and .json files; this file never
imports tokenizer.py (no import cycle).
"""
import json
from pathlib import Path

import numpy as np

from formats.files import read_json
from errors import UserError
from records import json_type

# Llama-3's pre-tokenizer split (Meta's llama3/tokenizer.py): text is first cut into pieces by
# this regex (contractions, words, 1-3 digit numbers, punctuation runs, newlines, spaces), and
# each piece is then tokenized on its own, so no token ever spans two pieces.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Pre-tokenizer patterns. Text is first cut into pieces by one of these regexes; each piece is
# then tokenized on its own, so no token ever spans two pieces.
#
# GPT-2 (OpenAI's encoder.py; Hugging Face's ByteLevel(use_regex=True)): contractions, words,
# numbers, punctuation runs, whitespace. A piece takes at most one leading space, and a run of
# spaces leaves its last space to the word after it (`\s+(?!\S)`).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# StarCoder and SmolLM2: every digit is a piece of its own. Hugging Face does it in two steps,
# Digits(individual_digits=True) and then the GPT-2 regex on the text between the digits. In one
# regex, a digit must end the text before it as the end of the string would: the spaces in
# "a  1" stay one piece ("a", "  ", "1") because `(?![^\s\p{N}])` also accepts a digit next;
# with GPT-2's `(?!\S)` there they would split into " ", " ". A digit takes no leading space.
DIGITS_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
# Qwen2: Llama-3's split with single digits.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's names for them (GGUF key tokenizer.ggml.pre; its converter writes "gpt-2").
GGUF_PRE_PATTERNS = {"gpt2": GPT2_PATTERN, "gpt-2": GPT2_PATTERN,
                     "smollm": DIGITS_PATTERN, "starcoder": DIGITS_PATTERN,
                     "llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def gpt2_byte_of_char() -> dict:
    """GPT-2 writes a token's bytes as printable characters: bytes that are printable Latin-1
    stand for themselves, the other 68 (controls, space, ...) become U+0100, U+0101, ... in byte
    order, so a space is 'Ġ' and a newline 'Ċ'. This maps those characters back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_of_char = {chr(b): b for b in printable}
    byte_of_char.update({chr(256 + n): b for n, b in enumerate(others)})
    return byte_of_char


BYTE_OF_CHAR = gpt2_byte_of_char()


def gpt2_token_bytes(token: str, path: Path) -> bytes:
    """The bytes a token of the file at `path` stands for."""
    if not isinstance(token, str):
        raise UserError(f"{path}: token {token!r} is not a string")
    try:
        return bytes([BYTE_OF_CHAR[char] for char in token])
    except KeyError as e:
        raise UserError(f"{path}: token {token!r} has a character outside GPT-2's byte alphabet "
                        f"({e.args[0]!r}): not a byte-level BPE vocabulary") from None


CHAR_OF_BYTE = {b: char for char, b in BYTE_OF_CHAR.items()}


def gpt2_token_text(token: bytes) -> str:
    return "".join(CHAR_OF_BYTE[b] for b in token)


def merge_pairs(merges, path: Path) -> list:
    """[(left, right) bytes] of merges written "Ġ t" (older files, GGUF) or ["Ġ", "t"] (newer
    files). GPT-2's alphabet writes a space as 'Ġ', so the space in "Ġ t" only separates the two
    parts."""
    if not isinstance(merges, list):
        raise UserError(f"{path}: the merges must be a list, got {json_type(merges)}")
    pairs = []
    for number, merge in enumerate(merges, 1):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2 or not all(parts):
            raise UserError(f"{path}: merge {number} is {merge!r}, not two tokens (\"a b\" or "
                            "[\"a\", \"b\"])")
        pairs.append((gpt2_token_bytes(parts[0], path), gpt2_token_bytes(parts[1], path)))
    return pairs


# -- Hugging Face tokenizer.json ------------------------------------------------------------------

def tokenizer_json_parts(path: Path) -> dict:
    """A byte-level BPE `tokenizer.json`, with `tokenizer_config.json` (BOS, EOS, add_bos,
    chat_template) and `chat_template.jinja` beside it when present. All its added_tokens count
    as special: templates insert them by id, and their text in user text stays plain text."""
    path = Path(path)
    spec = read_json(path)
    if not isinstance(spec.get("model"), dict):
        raise UserError(f"{path}: not a tokenizer.json (it has no \"model\" object)")
    _check_parts(spec, path)
    model = spec["model"]
    problem = _unsupported_part(spec)
    if problem:
        raise UserError(f"{path}: {problem} is beyond this project's byte-level BPE reader; "
                        "use the model's tokenizer.model (SentencePiece or tiktoken) instead")
    special = _added_tokens(spec.get("added_tokens") or [], path)
    special_ids = set(special.values())
    vocab_texts = model.get("vocab")
    if not isinstance(vocab_texts, dict) or not all(map(_is_id, vocab_texts.values())):
        raise UserError(f"{path}: model.vocab must be an object of token → id (a whole number "
                        ">= 0)")
    vocab = {gpt2_token_bytes(token, path): i for token, i in vocab_texts.items()
             if i not in special_ids}
    merges = merge_pairs(model.get("merges"), path)
    config_path = path.with_name("tokenizer_config.json")
    config = read_json(config_path) if config_path.is_file() else {}
    bos_token = _token_text(config.get("bos_token"))
    eos_token = _token_text(config.get("eos_token"))
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # then the post-processor says whether `add_special_tokens` adds BOS
        add_bos = _template_starts_with(spec.get("post_processor"), bos_token)
    return dict(path=path, vocab=vocab, merges=merges, special=special,
                pattern=_pre_tokenizer_pattern(spec["pre_tokenizer"]),
                bos_id=special.get(bos_token), eos_id=special.get(eos_token), add_bos=add_bos,
                chat_template=read_chat_template(path, config))


def _is_id(value) -> bool:
    return type(value) is int and value >= 0  # (not True)


def _added_tokens(added: list, path: Path) -> dict:
    """tokenizer.json's added_tokens [{"id", "content", ...}] → {content: id}."""
    if not isinstance(added, list) or not all(
            isinstance(token, dict) and isinstance(token.get("content"), str)
            and _is_id(token.get("id")) for token in added):
        raise UserError(f"{path}: added_tokens must be a list of {{\"id\": a whole number >= 0, "
                        "\"content\": text}")
    return {token["content"]: token["id"] for token in added}


def _check_parts(spec: dict, path: Path):
    """The pipeline parts of a tokenizer.json are null or {"type": ...}, and a Sequence lists
    parts of that shape: what the readers below may assume."""
    for name in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        part = spec.get(name)
        if part is None:
            continue
        steps = part.get("pretokenizers", part.get("processors", [])) if isinstance(
            part, dict) else None
        if not isinstance(steps, list) or not all(
                isinstance(step, dict) and isinstance(step.get("type"), str)
                for step in [part, *steps]):
            raise UserError(f"{path}: the {name} must be null or an object with a \"type\" "
                            "(and a Sequence a list of such objects)")


def _unsupported_part(spec: dict) -> str | None:
    """What in a tokenizer.json this reader cannot reproduce exactly, or None."""
    model = spec["model"]
    if model.get("type") != "BPE":
        return f"a {model.get('type')} model"
    if model.get("byte_fallback"):
        return "SentencePiece-style BPE (byte_fallback)"
    if spec.get("normalizer"):
        return f"a normalizer ({spec['normalizer']['type']})"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "a subword prefix or suffix"
    if model.get("dropout"):
        return "BPE dropout"
    if _pre_tokenizer_pattern(spec.get("pre_tokenizer")) is None:
        return f"the pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]}"
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return f"the decoder {json.dumps(spec.get('decoder'))[:200]}"
    return None


def _pre_tokenizer_pattern(pre_tokenizer: dict | None) -> str | None:
    """The one regex that cuts text as this tokenizer.json pre_tokenizer does, or None. Known:
    ByteLevel with its GPT-2 regex; Digits(individual_digits) then that; Split(regex) then
    ByteLevel without a regex (Llama-3, Qwen2), where the Split regex (Oniguruma syntax) is
    handed to tiktoken (fancy-regex) as it is. ByteLevel must add no prefix space."""
    if pre_tokenizer is None:
        return None
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    if not steps:
        return None
    kinds = [step["type"] for step in steps]
    byte_level = steps[-1]
    if kinds[-1] != "ByteLevel" or byte_level.get("add_prefix_space"):
        return None
    uses_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and uses_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and uses_regex:
        return DIGITS_PATTERN
    split = steps[0]
    pattern = split.get("pattern")
    if (kinds == ["Split", "ByteLevel"] and isinstance(pattern, dict)
            and isinstance(pattern.get("Regex"), str) and not uses_regex
            and split.get("behavior") == "Isolated" and not split.get("invert")):
        return pattern["Regex"]
    return None


def _token_text(token) -> str | None:
    """tokenizer_config.json writes a token as its text or as {"content": text, ...}."""
    text = token.get("content") if isinstance(token, dict) else token
    return text if isinstance(text, str) else None


def _template_starts_with(post_processor: dict | None, token: str | None) -> bool:
    """Whether a TemplateProcessing post-processor (alone or in a Sequence) puts `token` first."""
    if not post_processor or token is None:
        return False
    for step in post_processor.get("processors", [post_processor]):
        if step["type"] == "TemplateProcessing":
            single = step.get("single")
            first = single[0] if isinstance(single, list) and single else {}
            special = first.get("SpecialToken") if isinstance(first, dict) else None
            return isinstance(special, dict) and special.get("id") == token
    return False


# -- llama.cpp GGUF -------------------------------------------------------------------------------

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (1 is a normal token)


def gguf_tokenizer_parts(path: Path, required: bool = True) -> dict | None:
    """The byte-level BPE tokenizer ("gpt2") embedded in a GGUF file. Another kind ("llama" is
    SentencePiece) is a UserError, or None when not `required`."""
    from formats.gguf_file import read_gguf_header  # only GGUF files need it
    path = Path(path)
    meta = read_gguf_header(path).metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        if not required:
            return None
        raise UserError(f"{path} embeds a {kind!r} tokenizer, which this project reads only from "
                        "the model's own file: pass --tokenizer with its tokenizer.model")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_PATTERNS:
        raise UserError(f"{path}: unknown pre-tokenizer tokenizer.ggml.pre = {pre!r} "
                        f"(known: {', '.join(GGUF_PRE_PATTERNS)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise UserError(f"{path}: tokenizer.ggml.tokens is not an array of strings")
    types = meta.get("tokenizer.ggml.token_type", np.ones(len(tokens), np.int32))
    if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or \
            len(types) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.token_type must be an array of integers, one "
                        f"for each of the {len(tokens)} tokens")
    special = {token: i for i, token in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)}
    vocab = {gpt2_token_bytes(token, path): i for i, token in enumerate(tokens)
             if types[i] not in (CONTROL, USER_DEFINED)}
    merges = merge_pairs(meta.get("tokenizer.ggml.merges", []), path)
    # llama.cpp starts Llama-3 prompts with BOS unless the file says otherwise, others not.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", pre == "llama-bpe")
    return dict(path=path, vocab=vocab, merges=merges, special=special,
                pattern=GGUF_PRE_PATTERNS[pre], bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_id=meta.get("tokenizer.ggml.eos_token_id"), add_bos=add_bos,
                chat_template=meta.get("tokenizer.chat_template"))


# -- Writing tokenizer.json -----------------------------------------------------------------------

def tokenizer_json(tokenizer) -> dict:
    """Hugging Face's tokenizer.json for a byte-level BPE tokenizer: the same vocabulary, merges
    and pre-tokenizer, the special tokens as added tokens (not split from text: `split_special`)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    if tokenizer.pattern == GPT2_PATTERN:
        pre_tokenizer = byte_level
    elif tokenizer.pattern == DIGITS_PATTERN:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        split = {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated",
                 "invert": False}
        without_regex = {**byte_level, "use_regex": False}  # the Split has cut the text already
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, without_regex]}
    if tokenizer.add_bos:
        bos = tokenizer.bytes_of_id[tokenizer.bos_id].decode()
        post_processor = {"type": "TemplateProcessing",
                          "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                     {"Sequence": {"id": "A", "type_id": 0}}],
                          "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                   {"Sequence": {"id": "A", "type_id": 0}},
                                   {"Sequence": {"id": "B", "type_id": 1}}],
                          "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id],
                                                   "tokens": [bos]}}}
    else:
        post_processor = {**byte_level, "trim_offsets": False}
    vocab = {gpt2_token_text(token): i for token, i in tokenizer.vocab.items()}
    vocab.update(tokenizer.special)
    added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for text, i in sorted(tokenizer.special.items(),
                                                                          key=lambda item: item[1])]
    merges = [[gpt2_token_text(left), gpt2_token_text(right)] for left, right in tokenizer.merges]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": dict(sorted(vocab.items(), key=lambda item: item[1])),
                      "merges": merges}}


def tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json: the class to load it with, BOS/EOS, and the chat template."""
    def text(i):
        return None if i is None else tokenizer.bytes_of_id[i].decode("utf-8", errors="replace")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(tokenizer.bos_id),
              "eos_token": text(tokenizer.eos_id), "add_bos_token": tokenizer.add_bos,
              "clean_up_tokenization_spaces": False}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    return config


# -- Hugging Face's tokenizer_config.json beside any tokenizer ----------------------------------

def hf_tokenizer_config(path: Path) -> dict:
    """The tokenizer_config.json of Hugging Face's files beside a tokenizer file (one folder up
    from original/tokenizer.model, where Llama-3's repos keep Meta's file), or {}."""
    for directory in (path.parent, path.parent.parent):
        config = directory / "tokenizer_config.json"
        if config.is_file():
            return read_json(config)
        if path.parent.name != "original":
            break
    return {}


def read_chat_template(path: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template (a string, or a list of named templates), else the
    chat_template.jinja file that newer transformers save beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template
                 if isinstance(entry, dict)}
        template = named.get("default")
    jinja = path.with_name("chat_template.jinja")
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template
