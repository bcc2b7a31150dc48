'''Ollama's Modelfile for an exported GGUF: `ollama create NAME -f FILE`, then `ollama run NAME`.

    FROM ./model.gguf
    TEMPLATE """..."""          the chat format, in Go's text/template (Ollama's language)
    PARAMETER stop "<|im_end|>"  one line per text that ends an answer
    SYSTEM """..."""            the model's default system prompt, when its template has one

Ollama does not run the jinja chat template stored in the GGUF; it needs the format written out
in its own template language. We write it for the formats of templates.TEMPLATES, following their
definitions there: the system block from `.System` (Ollama fills it from the conversation's system
message or from SYSTEM), then each user and assistant message of `.Messages`, then the prompt of
the assistant's turn. Another format gets no TEMPLATE (Ollama then passes the text as it is).
'''
from pathlib import Path

from formats.files import atomic_write

# {instruction}, {system}, {output} of templates.TEMPLATES in Go template syntax
GO_TEMPLATES = {
    "chatml": (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ range .Messages }}{{ if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}"
        "<|im_end|>\n{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n{{ .Content }}"
        "<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"),
    "llama3-chat": (
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
        "{{ end }}{{ range .Messages }}{{ if eq .Role \"user\" }}<|start_header_id|>user"
        "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ else if eq .Role \"assistant\" }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # Meta's format: every [INST] after the first starts with BOS (llama.cpp adds the first);
    # the system block goes in the first [INST]. Not "the message at index 0": Ollama keeps the
    # system messages in .Messages, so the first user message may come second.
    "llama2-chat": (
        "{{ $first := true }}{{ range .Messages }}{{ if eq .Role \"user\" }}"
        "{{ if not $first }}<s>{{ end }}[INST] {{ if and $first $.System }}<<SYS>>\n{{ $.System }}"
        "\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]{{ $first = false }}"
        "{{ else if eq .Role \"assistant\" }} {{ .Content }} </s>{{ end }}{{ end }}"),
    "alpaca": (
        "{{ if .System }}{{ .System }}\n\n{{ end }}{{ range .Messages }}{{ if eq .Role \"user\" }}"
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{{ .Content }}\n\n### Response:\n"
        "{{ else if eq .Role \"assistant\" }}{{ .Content }}{{ $.EOS }}{{ end }}{{ end }}"),
}


def token_text(tokenizer, token_id: int) -> str:
    """The text of one token as the GGUF vocabulary spells it (a control token's own text)."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:  # SentencePiece decodes control tokens to ""
        return sp.id_to_piece(token_id)
    return tokenizer.decode([token_id])


def modelfile_text(gguf_name: str, tokenizer, template_name: str | None) -> str:
    from chat_template import default_system_prompt
    from templates import TEMPLATES
    lines = [f"FROM ./{gguf_name}", ""]
    template = GO_TEMPLATES.get(template_name)
    if template is not None:
        eos = token_text(tokenizer, tokenizer.eos_id) if tokenizer.eos_id is not None else ""
        lines += ['TEMPLATE """' + template.replace("{{ $.EOS }}", eos) + '"""', ""]
    for token_id in end_ids(tokenizer, template_name):
        text = token_text(tokenizer, token_id)
        if text:
            lines.append(f"PARAMETER stop {_quoted(text)}")
    system = None
    if template_name in TEMPLATES and TEMPLATES[template_name].default_system:
        system = default_system_prompt(tokenizer)
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(gguf: Path, tokenizer, template_name: str | None) -> Path:
    """The Modelfile beside the GGUF file (named NAME.Modelfile, so several exports can share a
    folder)."""
    gguf = Path(gguf)
    path = gguf.with_suffix(".Modelfile")
    text = modelfile_text(gguf.name, tokenizer, template_name)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


# ---------------------------------------------------------------- end tokens (also for export.py)

def end_ids(tokenizer, template_name: str | None) -> list:
    """Every id at which generation must stop, as our generate() stops: the tokenizer's stop ids
    (EOS, and <|im_end|>, <|eot_id|>, <|endoftext|> where the vocabulary has them) plus the end
    token of the chat template."""
    from templates import TEMPLATES
    ids = set(tokenizer.stop_ids)
    template = TEMPLATES.get(template_name)
    if template is not None and template.end_token:
        ids.add(tokenizer.special_id(template.end_token))
    return sorted(ids)


def template_end_id(tokenizer, template_name: str | None):
    """The token that ends an answer in this template: its end token, else EOS."""
    from templates import TEMPLATES
    template = TEMPLATES.get(template_name)
    if template is not None and template.end_token:
        return tokenizer.special_id(template.end_token)
    return tokenizer.eos_id
