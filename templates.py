"""The named chat formats: how a conversation is written out as text, turn by turn.

    alpaca        Stanford Alpaca's prompt (its train.py, verbatim); the default for a model with
                  no chat template of its own
    llama2-chat   Meta's Llama-2 chat format        llama3-chat   Meta's Llama-3 chat format
    chatml        <|im_start|>role ... <|im_end|> (SmolLM2, Qwen)
    none          the prompt, then the answer

A model's own jinja chat template (chat_template.py) is the other way to write a conversation
out; `--template auto` takes it when the model has one. data.tokenize_conversation turns either
into ids and the loss mask.
"""
from dataclasses import dataclass

from chat_template import ChatTemplate
from errors import UserError


@dataclass(frozen=True)
class Template:
    """One turn is `prompt` (masked) then `response` and the end token (trained on), then
    `turn_end` (masked); turns follow each other. Placeholders: {instruction} {input} {output},
    and {system}: the first prompt's {system} slot receives `system` (itself holding the text as
    {system}) when the record has a system message, else nothing. `<|...|>` markers are special
    tokens, never encoded as text."""
    name: str
    prompt: str                   # one turn's prompt, up to the answer (the generation prompt)
    response: str = "{output}"
    system: str = "{system}\n\n"
    # Alpaca: the prompt when "input" is not empty; without one, the input joins the instruction
    prompt_with_input: str = ""
    end_token: str = ""           # "" = the tokenizer's EOS; else a special token: "<|eot_id|>"
    turn_end: str = ""            # text after the end token, not trained on (ChatML's "\n")
    bos: bool = True              # start with BOS (if the tokenizer uses one); ChatML has none
    bos_every_turn: bool = False  # Llama-2 chat opens every [INST] with BOS
    strip: bool = False           # Meta's chat formats strip the whitespace around every message
    # an explicit "" system message still gets its block, as the official template writes it
    # (alpaca and none have no official template)
    empty_system_block: bool = True
    default_system: bool = False  # no system message: write the model's default_system_prompt


PROMPT_DICT = {  # Stanford Alpaca's train.py, verbatim
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}
TEMPLATES = {template.name: template for template in [
    # Multi-turn records (Alpaca "history", chat) with alpaca or none: each turn is written the same
    # way, one after another (as LLaMA-Factory does), so later answers see the earlier turns.
    Template("alpaca", prompt="{system}" + PROMPT_DICT["prompt_no_input"],
             prompt_with_input="{system}" + PROMPT_DICT["prompt_input"], empty_system_block=False),
    # Meta's llama/generation.py: per turn BOS + encode(f"[INST] {user} [/INST] {answer} ") + EOS.
    Template("llama2-chat", prompt="[INST] {system}{instruction} [/INST]", response=" {output} ",
             system="<<SYS>>\n{system}\n<</SYS>>\n\n", bos_every_turn=True, strip=True),
    # Meta's llama3/tokenizer.py ChatFormat; BOS is <|begin_of_text|>.
    Template("llama3-chat",
             prompt="{system}<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n",
             system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
             end_token="<|eot_id|>", strip=True),
    # ChatML (SmolLM2, Qwen, ...): the model's own chat_template, with its default system prompt.
    Template("chatml",
             prompt="{system}<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
             system="<|im_start|>system\n{system}<|im_end|>\n", end_token="<|im_end|>",
             turn_end="\n", bos=False, default_system=True),
    # raw text: the prompt, then the answer
    Template("none", prompt="{system}{instruction}", empty_system_block=False),
]}


def get_template(name: str) -> "Template | ChatTemplate":
    """A named template, or a jinja template's source (what a run's config.json records)."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if "{{" in name or "{%" in name:
        return ChatTemplate(name, "the run's chat template")
    raise UserError(f"unknown template {name!r}; known: auto, {', '.join(TEMPLATES)}")
