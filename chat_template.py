r"""A model's own chat template: the jinja program in its tokenizer files (tokenizer_config.json,
chat_template.jinja, or a GGUF's tokenizer.chat_template) that writes a conversation out as text.

    messages ─► render (jinja2, sandboxed, as transformers renders it) ─► text
             ─► cut at the template's special tokens and at the answers ─► ids, is_answer

SmolLM2's, for one user turn and its answer, with add_generation_prompt=False:

    <|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n
    <|im_start|>user\nName the capital of France.<|im_end|>\n
    <|im_start|>assistant\nParis.<|im_end|>\n

Which text is the answer. A template that marks it with `{% generation %} ... {% endgeneration %}`
says so itself. Otherwise the answer to turn i is what rendering the conversation up to it adds
to rendering the conversation before it with the generation prompt (add_generation_prompt=True,
the "<|im_start|>assistant\n" a model answers after): here "Paris.<|im_end|>\n". The answer ends
with the first end-of-turn token in it (a stop id: <|im_end|>, </s>, <|eot_id|>); what the template
writes after it ("\n") is not trained on, as the Python templates of data.py do.

Text → ids. The template's special tokens ("<|im_start|>", bos_token) become their ids, as in
transformers' apply_chat_template. Special-token text inside a message ("<|im_end|>" typed by a
user) stays plain text, encoded with the text around it, as data.py's Python templates do (it is
marked before rendering, so it cannot be told apart from the template's own otherwise).
transformers does the same with `sanitize_control_tokens=True`, except that it cuts the text at
such a token. The text is also cut where an answer starts and ends, so that the ids before an
answer are exactly the ids generation starts from (data.encode_prompt); SentencePiece encodes a
piece after a cut as the continuation of the text before it (tokenizer.encode_text). transformers
encodes the text whole; the tests show the same ids for every template they try.

A model file is untrusted input, so the template runs in jinja2's ImmutableSandboxedEnvironment:
it can call no Python method that changes anything and reach no attribute starting with "_".
"""
import re
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

from errors import UserError
from tokenizer import encode_text

# While render() runs: (the blocks rendered so far, the (start, end) of each {% generation %} block)
_GENERATION_SPANS = ContextVar("generation_spans", default=None)

# Private-use characters that wrap special-token text inside messages (transformers' markers).
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template. `name` says where it came from, for messages."""
    source: str
    name: str = "the checkpoint's chat template"


# -- The environment: transformers' (utils/chat_template_utils.py, _compile_jinja_template) -------

@lru_cache(maxsize=8)
def compile_template(source: str):
    """The jinja2 Template of `source`; a syntax error is a UserError."""
    import jinja2
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template, line {e.lineno}: {e.message}") from None


@lru_cache(maxsize=1)
def _environment():
    """trim_blocks and lstrip_blocks (a `{% ... %}` line leaves no newline or indent behind), the
    loop controls `{% break %}` / `{% continue %}`, the `{% generation %}` tag, and the functions
    templates call: raise_exception, strftime_now, a tojson that does not escape HTML."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %}: the text inside is an answer. Its (start, end)
        in the rendered text goes into render()'s list: the text so far is the blocks rendered
        before this one (a block is rendered whole, then handed out)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [],
                                          body).set_lineno(lineno)

        def _generation(self, caller):
            text = caller()
            tracker = _GENERATION_SPANS.get()
            if tracker is not None:
                blocks, spans = tracker
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Sandbox(ImmutableSandboxedEnvironment):
        """An unsafe attribute (`''.__class__`) is an error at once, where jinja2 would give an
        undefined value that renders as nothing."""
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to {type(obj).__name__}.{attribute} is not allowed "
                                "(sandbox)")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


def render(template: ChatTemplate, messages: list[dict], tokenizer,
           add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """(text, the (start, end) of every {% generation %} block in it). The template sees what
    transformers passes: messages, add_generation_prompt, bos_token and eos_token."""
    import jinja2
    compiled = compile_template(template.source)
    names = {i: text for text, i in tokenizer.special.items()}
    blocks, spans = [], []
    token = _GENERATION_SPANS.set((blocks, spans))
    try:
        for block in compiled.generate(messages=messages,
                                       add_generation_prompt=add_generation_prompt,
                                       bos_token=names.get(tokenizer.bos_id, ""),
                                       eos_token=names.get(tokenizer.eos_id, "")):
            blocks.append(block)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{template.name} refused it: {reason}") from None
    finally:
        _GENERATION_SPANS.reset(token)
    return "".join(blocks), spans


# -- Records → messages --------------------------------------------------------------------------

def record_messages(conversation: dict) -> list[dict]:
    """A normalised record (records.py) as chat messages; Alpaca's input joins the instruction
    after a blank line, as data.py's templates without an input slot do."""
    messages = []
    if conversation.get("system") is not None:
        messages.append({"role": "system", "content": conversation["system"]})
    for turn in conversation["turns"]:
        user = turn["instruction"]
        if turn["input"]:
            user = f"{user}\n\n{turn['input']}"
        messages.append({"role": "user", "content": user})
        if turn["output"] is not None:
            messages.append({"role": "assistant", "content": turn["output"]})
    return messages


def _mark(messages: list[dict], tokenizer) -> list[dict]:
    """Special-token text inside the messages, wrapped in the markers (markers already there are
    dropped first, so none can be forged)."""
    pattern = _special_pattern(tuple(tokenizer.special))
    marked = []
    for message in messages:
        content = message["content"].replace(MARK_START, "").replace(MARK_END, "")
        if pattern is not None:
            content = pattern.sub(lambda m: MARK_START + m.group(0) + MARK_END, content)
        marked.append({**message, "content": content})
    return marked


@lru_cache(maxsize=8)
def _special_pattern(specials: tuple) -> re.Pattern | None:
    """Any special token; longest first, so a token wins over a token it contains."""
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


# -- Text → ids ----------------------------------------------------------------------------------

def answer_spans(template: ChatTemplate, messages: list[dict], tokenizer,
                 add_generation_prompt: bool = False) -> tuple[str, list, bool]:
    """(the conversation rendered, the (start, end) of every answer in it, whether the spans are
    the template's own {% generation %} blocks)."""
    text, spans = render(template, messages, tokenizer, add_generation_prompt)
    if spans:
        return text, spans, True
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = render(template, messages[:index], tokenizer, add_generation_prompt=True)
        upto, _ = render(template, messages[:index + 1], tokenizer, add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise UserError(f"{template.name} writes earlier turns differently once a later one "
                            "follows, so the answers cannot be told from the rest: give it "
                            "{% generation %} blocks, or use a named --template")
        spans.append((len(before), len(upto)))
    return text, spans, False


def encode_rendered(text: str, tokenizer, cuts=()) -> list[list[int]]:
    """The ids of the text between consecutive cuts (character positions), one list each:
    special tokens become their ids, the text between them is encoded (marked special-token text
    stays text). SentencePiece encodes text that follows other text as its continuation, without
    the "▁" of a new string; after a special token too, unless the tokenizer is `legacy`."""
    bounds = [0, *cuts, len(text)]
    pieces = []
    follows_special = False
    for start, end in zip(bounds, bounds[1:]):
        ids = []
        for position, part in _parts(text, start, end, tokenizer):
            if isinstance(part, int):
                ids.append(part)
                follows_special = True
                continue
            part = part.replace(MARK_START, "").replace(MARK_END, "")
            if part:
                continuation = position > 0 and not (follows_special and tokenizer.legacy)
                ids += encode_text(part, tokenizer, continuation)
                follows_special = False
        pieces.append(ids)
    return pieces


def _parts(text: str, start: int, end: int, tokenizer):
    """(position, text or a special token's id) for text[start:end], in order."""
    pattern = _special_pattern(tuple(tokenizer.special))
    position = start
    for match in (pattern.finditer(text, start, end) if pattern else ()):
        if text[match.start() - 1:match.start()] == MARK_START:
            continue  # special-token text inside a message: text
        yield position, text[position:match.start()]
        yield match.start(), tokenizer.special[match.group(0)]
        position = match.end()
    yield position, text[position:end]


def tokenize_chat(conversation: dict, tokenizer, template: ChatTemplate,
                  prompt_only: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, is_answer) of a normalised record: data.tokenize_conversation for a jinja template.
    prompt_only: the conversation before its last answer, then the generation prompt."""
    messages = _mark(record_messages(conversation), tokenizer)
    if prompt_only and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text, spans, from_blocks = answer_spans(template, messages, tokenizer,
                                            add_generation_prompt=prompt_only)
    if not text:
        raise UserError(f"{template.name} wrote nothing for it")
    spans = [(start, end) for start, end in spans if start < end]
    cuts = sorted({position for span in spans for position in span} - {0, len(text)})
    starts = {start for start, _ in spans}
    ids, is_answer = [], []
    for piece, start in zip(encode_rendered(text, tokenizer, cuts), [0, *cuts]):
        flags = [start in starts] * len(piece)
        if start in starts and not from_blocks:  # the answer ends with its end-of-turn token
            stop = next((k for k, i in enumerate(piece) if i in tokenizer.stop_ids), None)
            if stop is not None:
                flags[stop + 1:] = [False] * (len(piece) - stop - 1)
        ids += piece
        is_answer += flags
    return ids, is_answer


# The default system prompt inside a ChatML chat_template: the literal text of its system block,
# e.g. SmolLM2's '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>'.
# The newline is a real one or jinja's "\n"; the text holds no quotes or braces (not an expression).
CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the model's own chat template writes when a conversation has none."""
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    match = CHATML_DEFAULT_SYSTEM.search(chat_template)
    if match is None:
        return None
    return match.group(1).replace("\\n", "\n")
