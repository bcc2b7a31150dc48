"""Text ⇄ token ids, over the two kinds of `tokenizer.model` the LLaMA family ships.

- Llama-1/2, TinyLlama and llama2.c models: a SentencePiece model (a protobuf file).
- Llama-3: a tiktoken BPE rank file (lines of `base64(token) rank`), plus 256 special tokens
  (`<|begin_of_text|>`, `<|eot_id|>`, ...) that are not in the file and get ids after it.

The backend is chosen by looking at the file, not by a flag.
"""
import base64
from pathlib import Path

from errors import UserError

# Llama-3's pre-tokenizer split (Meta's llama3/tokenizer.py): contractions, words, 1-3 digit
# numbers, punctuation runs, newlines, spaces.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + \
                 [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]


class Tokenizer:
    """encode/decode plus the ids a trainer and a sampler need. Use `Tokenizer.from_file`."""
    bos_id: int
    eos_id: int
    stop_ids: set    # generation ends at any of these
    vocab_size: int

    @staticmethod
    def from_file(path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = find_tokenizer(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        with open(path, "rb") as f:
            head = f.readline()
        if _is_tiktoken_line(head):
            return TiktokenTokenizer(path)
        return SentencePieceTokenizer(path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def special_id(self, token: str) -> int:
        """Id of a special token such as '<|eot_id|>' (never produced by `encode` from text)."""
        raise UserError(f"tokenizer {self.path.name} has no special token {token!r}")


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
    """`tokenizer` (a --tokenizer path) if given, else the tokenizer in the checkpoint's directory:
    the checkpoint itself when it is a directory, else the directory of the checkpoint file."""
    checkpoint = Path(checkpoint)
    return Tokenizer.from_file(tokenizer or (checkpoint if checkpoint.is_dir() else checkpoint.parent))


def find_tokenizer(directory: Path) -> Path:
    """The tokenizer file of a checkpoint directory: `tokenizer.model` (also in `original/`, where
    Hugging Face's Llama-3 repos keep it), else the only other `*.model` (stories260K's tok512.model)."""
    for candidate in (directory / "tokenizer.model", directory / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    others = sorted(directory.glob("*.model"))
    if len(others) == 1:
        return others[0]
    raise UserError(f"no tokenizer in {directory}: expected tokenizer.model (SentencePiece or Llama-3 tiktoken)"
                    + (f"; found several: {', '.join(p.name for p in others)}" if others else ""))


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import sentencepiece
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path} is neither a SentencePiece model nor a tiktoken rank file ({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()
        # llama2.c's tinystories models separate stories with BOS, so BOS ends a sample too.
        self.stop_ids = {self.eos_id, self.bos_id}

    def _encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
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
        self.stop_ids = {self.eos_id, self.special["<|eot_id|>"]}  # base models end with the first, chat turns with the second
        self.vocab_size = self.enc.n_vocab

    def _encode(self, text):
        # Special-token text inside user data is encoded as plain text, never as control tokens.
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def special_id(self, token: str) -> int:
        if token not in self.special:
            return super().special_id(token)
        return self.special[token]
