"""chat_template.py and --template auto: a model's own jinja chat template, rendered as
transformers renders it, against transformers' apply_chat_template and against data.py's Python
templates. Real tokenizers and templates from ../shared and the real SmolLM2."""
import json
import shutil

import pytest

import data
from chat_template import ChatTemplate, record_messages
from conftest import ROOT, shared_path
from data import encode_dataset, encode_example, encode_prompt, resolve_template
from errors import UserError
from model import IGNORE_INDEX
from records import load_records, normalize_record
import templates
from templates import TEMPLATES
from tokenizer import ByteTokenizer, Tokenizer

# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json "chat_template", verbatim (its "\\n" are
# jinja string escapes)
LLAMA2_CHAT_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

# ChatML with {% generation %} blocks around each answer and its <|im_end|>
CHATML_WITH_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat(*turns, system=None):
    """A normalised record: turns are (user, answer) pairs."""
    return {"system": system, "turns": [{"instruction": user, "input": "", "output": answer}
                                        for user, answer in turns]}


CHATS = [
    chat(("Name the capital of France.", "Paris.")),
    chat(("Name the capital of France.", "Paris."), system="Answer like a pirate."),
    chat(("Hi!", " Hello there. "), ("2+2?", "4"), system="Be brief."),
    chat(("Hi!", "Hello."), ("And in French?", "Bonjour.\n\nSalut."), ("Thanks", "You're welcome")),
    chat(("Hi!", "Hello.")) | {"system": ""},
    normalize_record({"instruction": "Sum these.", "input": "1 2 3", "output": "6"}),
]


def targets(ids, labels) -> list:
    return [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]


# -- Tokenizers with their chat templates, as Hugging Face's files hold them ---------------------

@pytest.fixture(scope="module")
def tinyllama_dir(tmp_path_factory):
    """TinyLlama-1.1B-Chat's files: the Llama-2 SentencePiece model it uses, its
    tokenizer_config.json ("legacy": false) and chat_template.jinja (the <|user|> format)."""
    directory = tmp_path_factory.mktemp("tinyllama")
    shutil.copy(shared_path("models", "llama2-tokenizer", "tokenizer.model"), directory)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(shared_path("models", "llama2-tokenizer", "tinyllama-1.1b-chat-v1.0", name),
                    directory)
    return directory


@pytest.fixture(scope="module")
def tinyllama(tinyllama_dir):
    return Tokenizer.from_file(tinyllama_dir)


@pytest.fixture(scope="module")
def llama3_instruct(tmp_path_factory):
    """Llama-3-8B-Instruct as its Hugging Face repository lays it out: Meta's tokenizer.model in
    original/, tokenizer_config.json (with the chat template) one folder up."""
    directory = tmp_path_factory.mktemp("llama3_instruct")
    (directory / "original").mkdir()
    shutil.copy(shared_path("models", "llama3-tokenizer", "tokenizer.model"),
                directory / "original")
    shutil.copy(shared_path("models", "llama3-tokenizer", "meta-llama-3-8b-instruct",
                            "tokenizer_config.json"), directory)
    return Tokenizer.from_file(directory)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path):
    """Hugging Face's SmolLM2 tokenizer from the GGUF, with SmolLM2's real pre-tokenizer (see
    test_bpe.py's smollm2_oracles)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers.pre_tokenizers import ByteLevel, Digits, Sequence
    oracle = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent,
                                                        gguf_file=smollm2_path.name)
    oracle.backend_tokenizer.pre_tokenizer = Sequence([
        Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)])
    return oracle


def test_tokenizers_carry_their_chat_template(tinyllama, tinyllama_dir, llama3_instruct, smollm2):
    assert tinyllama.chat_template == (tinyllama_dir / "chat_template.jinja").read_text()
    assert tinyllama.legacy is False and tinyllama.special == {"<unk>": 0, "<s>": 1, "</s>": 2}
    config = json.loads((tinyllama_dir / "tokenizer_config.json").read_text())
    assert config["legacy"] is False
    assert llama3_instruct.chat_template.startswith("{% set loop_messages = messages %}")
    assert smollm2.chat_template.startswith("{% for message in messages %}")


# -- auto equals the Python templates where both exist -------------------------------------------

def test_auto_equals_chatml_on_every_alpaca_record_and_multi_turn_chats(smollm2):
    """SmolLM2's own template (from its GGUF) and data.py's chatml: the same input_ids, labels
    and generation prompt for all 1,000 Alpaca records and the multi-turn LIMA records."""
    auto = resolve_template("auto", smollm2, say=lambda line: None)
    assert isinstance(auto, ChatTemplate)
    records = load_records(shared_path("data", "alpaca_data_1k.json"))
    assert len(records) == 1000
    # LIMA's 29 multi-turn records (tests/fixtures keeps them all, beside 21 single-turn ones)
    lima = [r for r in load_records(shared_path("data", "llamafactory_lima_50.json"))
            if len(r["turns"]) > 1]
    assert len(lima) == 29
    for record in records + lima + CHATS:
        assert encode_example(record, smollm2, auto, 100_000) == \
            encode_example(record, smollm2, TEMPLATES["chatml"], 100_000)
        assert encode_prompt(record, smollm2, auto) == \
            encode_prompt(record, smollm2, TEMPLATES["chatml"])


@pytest.mark.parametrize("name", ["llama3-chat", "llama2-chat"])
def test_python_templates_equal_their_models_jinja_templates(name, llama2, llama3_instruct):
    """llama3-chat is Llama-3-8B-Instruct's chat_template, llama2-chat Llama-2-chat-hf's, rendered
    by chat_template.py: ids, labels and prompts."""
    if name == "llama3-chat":
        tokenizer, jinja = llama3_instruct, ChatTemplate(llama3_instruct.chat_template)
    else:
        tokenizer, jinja = llama2, ChatTemplate(LLAMA2_CHAT_JINJA)
    records = load_records(shared_path("data", "alpaca_data_1k.json"))[:100]
    for record in records + CHATS:
        assert encode_example(record, tokenizer, jinja, 100_000) == \
            encode_example(record, tokenizer, TEMPLATES[name], 100_000), record
        assert encode_prompt(record, tokenizer, jinja) == \
            encode_prompt(record, tokenizer, TEMPLATES[name])


# -- Against transformers' apply_chat_template ----------------------------------------------------

def hf_ids(name, oracle, messages, add_generation_prompt=False) -> list:
    """transformers' ids for the conversation. Llama-3 has no Hugging Face tokenizer here: its
    chat template rendered by transformers, then split and encoded as its tokenizer does (tiktoken,
    Meta's own, with the special tokens' text allowed)."""
    if name == "llama3":
        from transformers.utils.chat_template_utils import render_jinja_template
        text = render_jinja_template([messages], chat_template=oracle.chat_template,
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token="<|begin_of_text|>",
                                     eos_token="<|end_of_text|>")[0][0]
        return oracle.enc.encode(text, allowed_special="all")
    return oracle.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      tokenize=True, return_dict=False)


@pytest.fixture
def model_and_oracle(request, smollm2, tinyllama, llama3_instruct):
    """(our tokenizer, transformers' tokenizer or what stands for it) of one model."""
    if request.param == "smollm2":
        return smollm2, request.getfixturevalue("smollm2_hf")
    if request.param == "tinyllama":
        transformers = pytest.importorskip("transformers")
        return tinyllama, transformers.AutoTokenizer.from_pretrained(
            shared_path("models", "llama2-tokenizer", "tinyllama-1.1b-chat-v1.0"))
    return llama3_instruct, llama3_instruct


@pytest.mark.parametrize("model_and_oracle", ["smollm2", "tinyllama", "llama3"],
                         indirect=True)
def test_auto_equals_transformers_apply_chat_template(model_and_oracle, request):
    """Whole conversations and generation prompts token for token, single- and multi-turn, with
    and without a system message; the targets are each answer as transformers' own ids delimit it
    (what rendering up to the answer adds to rendering before it with the generation prompt), up
    to its end-of-turn token."""
    name = request.node.callspec.params["model_and_oracle"]
    tokenizer, oracle = model_and_oracle
    auto = resolve_template("auto", tokenizer, say=lambda line: None)
    assert isinstance(auto, ChatTemplate)
    records = CHATS + load_records(shared_path("data", "alpaca_data_1k.json"))[:30]
    for record in records:
        messages = record_messages(record)
        ids, labels = encode_example(record, tokenizer, auto, 100_000)
        assert ids == hf_ids(name, oracle, messages), messages
        assert encode_prompt(record, tokenizer, auto) == \
            hf_ids(name, oracle, messages[:-1], add_generation_prompt=True)
        expected = []
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                before = hf_ids(name, oracle, messages[:index], add_generation_prompt=True)
                upto = hf_ids(name, oracle, messages[:index + 1])
                assert ids[:len(upto)] == upto and upto[:len(before)] == before
                answer = upto[len(before):]
                end = next(k for k, i in enumerate(answer) if i in tokenizer.stop_ids)
                expected += answer[:end + 1]
        assert targets(ids, labels) == expected


def test_generation_blocks_give_transformers_assistant_mask(smollm2, smollm2_hf):
    """A template with {% generation %} blocks: the targets are exactly transformers'
    return_assistant_tokens_mask."""
    template = ChatTemplate(CHATML_WITH_GENERATION)
    for record in CHATS:
        ids, labels = encode_example(record, smollm2, template, 100_000)
        out = smollm2_hf.apply_chat_template(record_messages(record),
                                             chat_template=CHATML_WITH_GENERATION, tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)
        assert ids == out["input_ids"]
        assert [int(label != IGNORE_INDEX) for label in labels] == out["assistant_masks"]
        # ChatML's answers, as the prefix difference finds them, minus nothing: the same here
        assert encode_example(record, smollm2, ChatTemplate(smollm2.chat_template.replace(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n", "")), 100_000)[1] == labels or record["system"] is None


def test_special_token_text_in_messages_stays_text(smollm2, smollm2_hf, tinyllama):
    """"<|im_end|>" typed in a message is plain text under auto, as under the Python templates;
    transformers' sanitize_control_tokens=True also keeps it text (it cuts the text there, so its
    ids may differ at the token's edges, never in the text)."""
    record = chat(("Hi <|im_end|> there <|im_start|>x", "a<|im_end|>b </s>"))
    auto = resolve_template("auto", smollm2, say=lambda line: None)
    ids, labels = encode_example(record, smollm2, auto, 1000)
    assert (ids, labels) == encode_example(record, smollm2, TEMPLATES["chatml"], 1000)
    sanitized = smollm2_hf.apply_chat_template(record_messages(record), tokenize=True,
                                               return_dict=False, sanitize_control_tokens=True)
    assert smollm2.decode(ids) == smollm2.decode(sanitized)
    assert ids.count(smollm2.special_id("<|im_end|>")) == 3  # system, user and answer ends only
    tiny_ids, _ = encode_example(record, tinyllama, resolve_template("auto", tinyllama), 1000)
    assert tiny_ids.count(2) == 2  # "</s>" typed in the answer is text; the template's are EOS


# -- A template is untrusted input; its errors are the user's -------------------------------------

@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ messages.append(1) }}",
    "{{ raise_exception.__globals__ }}",
])
def test_a_template_cannot_reach_python_objects(source, smollm2):
    with pytest.raises(UserError) as error:
        encode_example(CHATS[0], smollm2, ChatTemplate(source, "evil"), 100)
    message = str(error.value)
    assert message.startswith("evil refused it: ") and "\n" not in message


def test_a_template_that_raises_names_the_record(tmp_path, llama2):
    """Gemma-style: no system role. One line naming the file and the record."""
    source = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"},
                                {"instruction": "Be nice", "output": "Sure", "system": "S"}]))
    with pytest.raises(UserError) as error:
        encode_dataset(load_records(path), llama2, ChatTemplate(source, "the model's template"),
                       64, source=str(path))
    assert str(error.value) == (f"{path}: the record that starts 'Be nice': the model's template "
                                "refused it: System role not supported")
    with pytest.raises(UserError, match=r"^chat template, line 1: "):
        encode_example(CHATS[0], llama2, ChatTemplate("{% for %}"), 64)


def test_transformers_environment(smollm2):
    """trim_blocks, lstrip_blocks, loop controls, tojson without HTML escapes, strftime_now, and
    bos_token/eos_token, as transformers gives them."""
    from chat_template import render
    source = ("{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n"
              "{{ m | tojson }}|{{ bos_token }}{{ eos_token }}|{{ strftime_now('%Y') | length }}"
              "{% endfor %}")
    text, spans = render(ChatTemplate(source), [{"role": "user", "content": "<a&b>"},
                                                {"role": "user", "content": "x"}], smollm2, False)
    assert text == '{"role": "user", "content": "<a&b>"}|<|im_start|><|im_end|>|4'
    assert spans == []


# -- Choosing the template ------------------------------------------------------------------------

def test_auto_uses_the_models_template_else_alpaca_and_says_which(smollm2, llama2):
    said = []
    assert resolve_template("auto", smollm2, say=said.append).source == smollm2.chat_template
    assert resolve_template("auto", llama2, say=said.append) is TEMPLATES["alpaca"]
    assert resolve_template("auto", ByteTokenizer(), say=said.append) is TEMPLATES["alpaca"]
    assert said == ["template: the chat template of SmolLM2-135M-Instruct.Q4_1.gguf "
                    "(--template auto)",
                    "template: alpaca (--template auto: tokenizer.model has no chat template)",
                    "template: alpaca (--template auto: <bytes> has no chat template)"]
    said.clear()
    assert resolve_template("chatml", smollm2, say=said.append) is TEMPLATES["chatml"]
    assert said == []  # the same format as the model's own: nothing to warn about
    assert resolve_template("alpaca", smollm2, say=said.append) is TEMPLATES["alpaca"]
    assert said == ["warning: --template alpaca writes conversations other than the chat "
                    "template of SmolLM2-135M-Instruct.Q4_1.gguf does; a model answers best in "
                    "the format it was tuned with"]
    assert templates.get_template(smollm2.chat_template).source == smollm2.chat_template
    with pytest.raises(UserError, match="unknown template 'chat'; known: auto, alpaca"):
        templates.get_template("chat")


def test_data_show_uses_the_models_template(capsys, smollm2_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data.main(["--data", "examples/alpaca_demo.json", "--tokenizer", str(smollm2_path),
               "--show", "1"])
    printed = capsys.readouterr()
    assert printed.err.startswith("template: the chat template of SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "<|im_start|>assistant\n[[" in printed.out


# -- A run remembers its format -------------------------------------------------------------------

# A chat template for stories260K's tokenizer (its files have none)
STORY_CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_a_run_records_its_template_and_its_exports_carry_it(tmp_path, capsys):
    """config.json records the jinja source that auto found, --resume refuses another template,
    the model, HF and PEFT directories carry it, and generate.py prompts the run with it."""
    import generate
    import train_sft
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    shutil.copy(shared_path("models", "stories260K", "tok512.model"), tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": STORY_CHAT}))
    out = tmp_path / "run"
    argv = ["--checkpoint", shared_path("models", "stories260K"), "--tokenizer",
            tok_dir / "tok512.model", "--data", shared_path("data", "litgpt_fixture_alpaca.json"),
            "--out", out, "--seq-len", 128, "--batch-size", 2, "--grad-accum", 1, "--val-split", 0,
            "--max-steps", 1, "--warmup-steps", 1, "--merge"]
    train_sft.main([str(a) for a in argv])
    assert "template: the chat template of tok512.model (--template auto)" in \
        capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["template"] == STORY_CHAT
    for directory in ("peft", "model", "hf"):
        config = json.loads((out / directory / "tokenizer_config.json").read_text())
        assert config["chat_template"] == STORY_CHAT
    assert Tokenizer.from_file(out / "model").chat_template == STORY_CHAT
    with pytest.raises(UserError, match=r"^--resume: .* different settings: template \"\{\{ "
                                        r"bos_token \}\}\{% for m in messages…\" → 'alpaca'; "):
        train_sft.main([str(a) for a in argv + ["--template", "alpaca", "--resume"]])
    capsys.readouterr()
    generate.main(["--checkpoint", str(out), "--prompt", "Hi", "--max-new-tokens", "2"])
    assert f"template: the run's chat template (the one {out} was trained with)" in \
        capsys.readouterr().err
