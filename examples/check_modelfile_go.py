"""By hand, not a test: the Modelfile's TEMPLATE run by Go's text/template, the engine Ollama runs
it with, against the tokens this project trains on. docs/formats.md has the command and the result.

    apt-get install golang-go                      # Go's standard library is all it needs
    python examples/check_modelfile_go.py SMOLLM2.gguf LLAMA2_TOKENIZER LLAMA3_TOKENIZER

Ollama renders TEMPLATE with the conversation as `.Messages` (each with `.Role`, `.Content`;
system messages stay in the list) and `.System` (the system messages joined; the Modelfile's
SYSTEM when the conversation has none), then tokenizes the text as llama.cpp does: special-token
text becomes its id, BOS goes first when the vocabulary says so. For each format of
formats/modelfile.py and a few conversations, this renders the generation prompt through Go and
compares its ids with data.tokenize_conversation(..., prompt_only=True), what a run trains on.
"""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import encode_rendered  # noqa: E402
from data import tokenize_conversation  # noqa: E402
from formats.modelfile import modelfile_text  # noqa: E402
from templates import TEMPLATES  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

GO_PROGRAM = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

// api.Message's fields that a template reads
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string     `json:"template"`
	Messages []*Message `json:"messages"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	var system []string // as Ollama's collate: every system message, joined
	for _, m := range in.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
	}
	t := template.Must(template.New("").Parse(in.Template))
	values := map[string]any{"System": strings.Join(system, "\\n\\n"), "Messages": in.Messages,
		"Prompt": "", "Response": ""}
	if err := t.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
"""

CONVERSATIONS = [  # (system or None, [(user, assistant), ...], last user message)
    (None, [], "What is the capital of France?"),
    ("You are a pirate.", [], "Name a colour."),
    ("Answer briefly.", [("Hi!", "Hello."), ("What is 2 + 2?", "4.")], "And 3 + 3?"),
    (None, [("Tell me a joke.", "Why did the chicken cross the road?")], "Why?"),
]


def modelfile_part(text: str, key: str) -> str | None:
    match = re.search(key + ' """(.*?)"""', text, re.S)
    return match.group(1) if match else None


def go_render(program: Path, template: str, messages: list) -> str:
    out = subprocess.run(["go", "run", str(program)], input=json.dumps(
        {"template": template, "messages": messages}), capture_output=True, text=True, check=True)
    return out.stdout


def check(name: str, tokenizer, program: Path) -> int:
    modelfile = modelfile_text("model.gguf", tokenizer, name)
    template, default_system = modelfile_part(modelfile, "TEMPLATE"), modelfile_part(modelfile,
                                                                                      "SYSTEM")
    failures = 0
    for system, turns, last in CONVERSATIONS:
        messages = [{"role": "system", "content": system or default_system}]
        if not messages[0]["content"]:  # Ollama adds SYSTEM only when there is one
            messages = []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": last})
        text = go_render(program, template, messages)
        ids = encode_rendered(text, tokenizer)[0]
        if tokenizer.add_bos and TEMPLATES[name].bos:
            ids.insert(0, tokenizer.bos_id)
        record = {"system": system, "turns": [
            {"instruction": u, "input": "", "output": a} for u, a in [*turns, (last, "")]]}
        expected, _ = tokenize_conversation(record, tokenizer, TEMPLATES[name], prompt_only=True)
        same = ids == expected
        failures += not same
        print(f"{name:12} {len(turns) + 1} turn(s), system {'yes' if system else 'no ':3}: "
              f"{'same ids' if same else 'DIFFERENT'} ({len(ids)} vs {len(expected)} tokens)")
        if not same:
            print("  go:  ", repr(text))
            print("  ours:", repr(tokenizer.decode(expected)))
    return failures


def main(smollm2: str, llama2: str, llama3: str):
    tokenizers = {"chatml": Tokenizer.from_file(smollm2),
                  "llama2-chat": Tokenizer.from_file(llama2),
                  "alpaca": Tokenizer.from_file(llama2),
                  "llama3-chat": Tokenizer.from_file(llama3)}
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "render.go"
        program.write_text(GO_PROGRAM)
        failures = sum(check(name, tokenizer, program) for name, tokenizer in tokenizers.items())
    print("all the same" if not failures else f"{failures} differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
