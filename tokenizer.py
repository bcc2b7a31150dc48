"""Text ⇄ token ids, over the three kinds of tokenizer the LLaMA family ships.

- Llama-1/2, TinyLlama and llama2.c models: a SentencePiece model (`tokenizer.model`, protobuf).
- Llama-3: a tiktoken BPE rank file (`tokenizer.model`, lines of `base64(token) rank`), plus 256
  special tokens (`<|begin_of_text|>`, `<|eot_id|>`, ...) that are not in the file and get ids
  after it.
- Byte-level BPE in GPT-2's format (SmolLM2, StarCoder, Qwen2, ...): a vocabulary and a list of
  merges, embedded in a llama.cpp `.gguf` file or in a Hugging Face `tokenizer.json` (bpe.py).

The backend is chosen by looking at the file, not by a flag.

Special-token text typed inside user text ("<|im_start|>" in an instruction) is always encoded as
plain text, never as a control token: templates insert control tokens by id, via `special_id`.
"""
import base64
import shutil
from pathlib import Path

from errors import UserError, utf8_problem

LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                   "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_4|>", "<|eot_id|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])


class Tokenizer:
    """encode/decode plus the ids a trainer and a sampler need. Use `Tokenizer.from_file`.

    encode(text, bos=True) always prepends bos_id; whether a prompt should start with it is the
    caller's choice, made with `add_bos`."""
    path: Path
    bos_id: int
    eos_id: int
    stop_ids: set    # generation ends at any of these
    vocab_size: int
    add_bos = True   # whether a plain-text prompt starts with BOS (SmolLM2's does not)
    chat_template = None  # the model's own jinja chat template, when its files carry one
    special: dict = {}    # control tokens, text → id: templates insert them; `encode` never does
    # SentencePiece only: whether text after a control token gets the "▁" prefix of a new string
    # (Hugging Face's `legacy`, true unless tokenizer_config.json says otherwise)
    legacy = True

    @staticmethod
    def from_file(path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = find_tokenizer(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        with open(path, "rb") as f:
            head = f.readline(4096)
        if head.startswith(b"GGUF"):  # byte-level BPE read from other formats: formats/bpe.py
            from formats.bpe import gguf_tokenizer_parts
            return BPETokenizer(**gguf_tokenizer_parts(path))
        if head.lstrip().startswith(b"{"):  # a JSON object: Hugging Face's tokenizer.json
            from formats.bpe import tokenizer_json_parts
            return BPETokenizer(**tokenizer_json_parts(path))
        if _is_tiktoken_line(head):
            return TiktokenTokenizer(path)
        return SentencePieceTokenizer(path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if bos and self.bos_id is None:
            raise UserError(f"tokenizer {self.path.name} has no BOS token")
        if eos and self.eos_id is None:
            raise UserError(f"tokenizer {self.path.name} has no EOS token")
        problem = utf8_problem(text)
        if problem:
            shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
            raise UserError(f"the text {shown} cannot be tokenized: {problem}")
        ids = self._encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def special_id(self, token: str) -> int:
        """Id of a special token such as '<|eot_id|>' (never produced by `encode` from text)."""
        if token not in self.special:
            raise UserError(f"tokenizer {self.path.name} has no special token {token!r}")
        return self.special[token]

    def save(self, directory):
        """Put the tokenizer beside a saved model, as `tokenizer.model`: the name every loader
        looks for, with a tokenizer_config.json for its chat template. Files already there are
        kept (an export may have copied the originals)."""
        from formats.files import atomic_write, write_json
        target = Path(directory) / "tokenizer.model"
        if not target.exists():
            atomic_write(target, lambda tmp: shutil.copyfile(self.path, tmp))
        # what Hugging Face's tokenizer_config.json said beside the original, and is not in it
        settings = {} if self.legacy else {"legacy": False}
        if self.chat_template:
            settings["chat_template"] = self.chat_template
        config = Path(directory) / "tokenizer_config.json"
        if settings and not config.exists():
            write_json(config, settings)


class ByteTokenizer(Tokenizer):
    """Bytes as tokens (ids 0-255) plus BOS and EOS: needs no file, so the built-in demo of
    train_sft.py runs on a machine that has downloaded nothing."""
    path = Path("<bytes>")
    bos_id, eos_id, vocab_size = 256, 257, 258
    stop_ids = {257}

    def _encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory):
        pass  # nothing to save: the demo builds it from nothing


# Generation also stops at these when the vocabulary has them: the end of a document, of a
# ChatML turn, of a Llama-3 turn.
STOP_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|eot_id|>"]


# -- Byte-level BPE (GPT-2's format; formats/bpe.py reads it from tokenizer.json or GGUF) ------

class BPETokenizer(Tokenizer):
    """Byte-level BPE: the pattern cuts the text into pieces; each piece starts as its UTF-8
    bytes, and adjacent parts are merged, best-ranked merge first, until no merge applies.

    tiktoken runs it. It merges the adjacent pair whose concatenation has the lowest rank, while
    Hugging Face's BPE merges the pair that comes first in the merge list. Ranking every token by
    the merge that makes it (single bytes first) makes the two choose alike on a vocabulary that
    BPE training built, where each token is the merge of two earlier ones; the tests check it on
    SmolLM2 and Llama-3. The vocabulary's ids are in another order (SmolLM2 puts its 17 special
    tokens first, then the bytes by character), so `id_of_rank` maps tiktoken's ranks to ids.

    vocab: the normal tokens, bytes → id; merges: (left, right) byte strings, best merge first;
    special: control tokens, text → id. Special tokens never come out of `encode`.
    """

    def __init__(self, path: Path, vocab: dict, merges: list, special: dict, pattern: str, *,
                 bos_id, eos_id, add_bos: bool, chat_template):
        import tiktoken
        self.path = path
        self.special = special
        self.vocab, self.merges, self.pattern = vocab, merges, pattern  # for save()
        ranks = merge_ranks(merges)
        for token in ranks:
            if len(token) > 1 and token not in vocab:
                raise UserError(f"{path}: a merge makes {token!r}, which is not in the vocabulary")
        # A byte the vocabulary lacks (SmolLM2 has no "\x04") maps to None and is dropped from
        # the output, as llama.cpp and Hugging Face drop it.
        self.id_of_rank = [vocab.get(token) for token in ranks]  # ranks are 0, 1, 2, ... in order
        # Special tokens never come out of text, so tiktoken gets none (decode is done here).
        self.encoding = tiktoken.Encoding(name=path.name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens={})
        self.bytes_of_id = {i: token for token, i in vocab.items()}
        self.bytes_of_id.update({i: text.encode("utf-8") for text, i in special.items()})
        if not self.bytes_of_id:
            raise UserError(f"{path}: the vocabulary is empty")
        self.vocab_size = max(self.bytes_of_id) + 1
        for name, i in (("BOS", bos_id), ("EOS", eos_id)):
            if i is not None and (type(i) is not int or i not in self.bytes_of_id):
                raise UserError(f"{path}: the {name} token id {i!r} is not a token's id")
        if not isinstance(chat_template, (str, type(None))):
            raise UserError(f"{path}: the chat template is {type(chat_template).__name__}, not "
                            "text")
        self.bos_id = bos_id
        self.eos_id = eos_id
        stops = {eos_id} | {special[token] for token in STOP_TOKENS if token in special}
        self.stop_ids = stops - {None}
        self.add_bos = add_bos
        self.chat_template = chat_template

    def _encode(self, text):
        ids = (self.id_of_rank[rank] for rank in self.encoding.encode_ordinary(text))
        return [i for i in ids if i is not None]

    def decode(self, ids) -> str:
        # A token can hold part of a character's bytes, so join the bytes before decoding them.
        text_bytes = b"".join(self.bytes_of_id[i] for i in ids)
        return text_bytes.decode("utf-8", errors="replace")

    def save(self, directory):
        """tokenizer.json + tokenizer_config.json, as Hugging Face writes them (with the chat
        template), so transformers' AutoTokenizer loads what this tokenizer does. Files already
        there are kept (an export may have copied the originals)."""
        from formats.bpe import tokenizer_config, tokenizer_json
        from formats.files import write_json
        directory = Path(directory)
        if not (directory / "tokenizer.json").exists():
            write_json(directory / "tokenizer.json", tokenizer_json(self))
        if not (directory / "tokenizer_config.json").exists():
            write_json(directory / "tokenizer_config.json", tokenizer_config(self))


def merge_ranks(merges: list) -> dict:
    """tiktoken's mergeable ranks: the 256 single bytes, then the token each merge makes, in merge
    order (a token that two merges make keeps the rank of the first)."""
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        ranks.setdefault(left + right, len(ranks))
    return ranks


def _is_tiktoken_line(line: bytes) -> bool:
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
        return True
    except ValueError:
        return False


def checkpoint_tokenizer(checkpoint, tokenizer=None) -> Tokenizer:
    """`tokenizer` (a --tokenizer path) if given; else the byte-level BPE tokenizer embedded in a
    .gguf checkpoint (or in the .gguf a checkpoint folder holds); else the tokenizer in the
    checkpoint's directory: the checkpoint itself when it is a directory, else the directory of
    the checkpoint file (stories260K.gguf embeds a SentencePiece vocabulary, and its
    tok512.model lies beside it)."""
    from formats.checkpoint import existing_checkpoint, single_file_checkpoint
    if tokenizer:
        return Tokenizer.from_file(tokenizer)
    checkpoint = existing_checkpoint(checkpoint)
    model_file = single_file_checkpoint(checkpoint)  # (a folder may hold a .gguf)
    if model_file is not None and _is_gguf(model_file):
        from formats.bpe import gguf_tokenizer_parts
        embedded = gguf_tokenizer_parts(model_file, required=False)
        if embedded is not None:
            return BPETokenizer(**embedded)
    return Tokenizer.from_file(checkpoint if checkpoint.is_dir() else checkpoint.parent)


def encode_text(text: str, tokenizer: "Tokenizer", continuation: bool = False) -> list[int]:
    """Ids of `text`; with continuation=True, as the text is tokenized when it follows earlier
    text, without SentencePiece's "▁" prefix (see the top of data.py)."""
    if not continuation or not isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.encode(text)
    anchor = tokenizer.encode("\n")
    ids = tokenizer.encode("\n" + text)
    if ids[:len(anchor)] != anchor:
        raise UserError(f"tokenizer {tokenizer.path}: '\\n' merges with the text after it, so an "
                        "answer cannot be tokenized as the prompt's continuation (LLaMA "
                        "vocabularies encode '\\n' as a byte)")
    return ids[len(anchor):]


def check_vocabulary(tokenizer, model_vocab: int):
    """Every id the tokenizer can produce must have a row in the model, and the model must not have
    far more rows than the tokenizer has tokens: then the two belong to different models. (A few
    spare rows are normal: some models pad their embedding to a multiple of 64 or 128.)"""
    name = tokenizer.path.name
    if tokenizer.vocab_size > model_vocab:
        raise UserError(f"tokenizer {name} has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_vocab}: they belong to different models "
                        "(pass the right --tokenizer)")
    if model_vocab - tokenizer.vocab_size > 1024:
        raise UserError(f"the model has {model_vocab} token embeddings but tokenizer {name} only "
                        f"{tokenizer.vocab_size} tokens: they belong to different models "
                        "(pass the right --tokenizer)")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def find_tokenizer(directory: Path) -> Path:
    """The tokenizer file of a checkpoint directory: `tokenizer.model` (also in `original/`, where
    Hugging Face's Llama-3 repos keep it), else the only other `*.model` (stories260K's
    tok512.model), else Hugging Face's `tokenizer.json`."""
    for candidate in (directory / "tokenizer.model", directory / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    others = sorted(directory.glob("*.model"))
    if len(others) == 1:
        return others[0]
    if not others and (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    several = f"; found several: {', '.join(p.name for p in others)}" if others else ""
    raise UserError(f"no tokenizer in {directory}: expected tokenizer.model (SentencePiece or "
                    f"Llama-3 tiktoken) or tokenizer.json (byte-level BPE){several}")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import sentencepiece
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path} is neither a SentencePiece model nor a tiktoken rank file "
                            f"({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()
        # llama2.c's tinystories models separate stories with BOS, so BOS ends a sample too.
        self.stop_ids = {self.eos_id, self.bos_id}
        self.special = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                        if self.sp.is_control(i) or self.sp.is_unknown(i)}  # <unk> <s> </s>
        from formats.bpe import hf_tokenizer_config, read_chat_template  # (HF's files beside it)
        config = hf_tokenizer_config(path)
        self.chat_template = read_chat_template(path, config)
        self.legacy = config.get("legacy", True)

    def _encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        from formats.bpe import LLAMA3_PATTERN, hf_tokenizer_config, read_chat_template
        self.path = path
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a valid tiktoken rank file ({e})") from None
        self.special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
        self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        # base models end with the first, chat turns with the second
        self.stop_ids = {self.eos_id, self.special["<|eot_id|>"]}
        self.vocab_size = self.enc.n_vocab
        self.chat_template = read_chat_template(path, hf_tokenizer_config(path))

    def _encode(self, text):
        # Special-token text inside user data is encoded as plain text, never as control tokens.
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))
