"""One chat renderer: jinja2 set up as transformers' apply_chat_template, checked against
transformers on the Llama-2-chat and Llama-3.1-Instruct templates, with system prompts,
several turns, the generation prompt and the assistant-only loss mask."""

from __future__ import annotations

import pytest
from tokenizer_utils import (
    CHATS,
    LLAMA2_TEMPLATE,
    LLAMA31_TEMPLATE,
    hf_tokenizer,
    llama2_style,
    llama3_style,
)

from jpeft.models import chat_template
from jpeft.models.tokenizer import Tokenizer
from jpeft.train import data

# The assistant turn of each template, and the same with {% generation %} around the text the
# prefix renderings attribute to it, for transformers' return_assistant_tokens_mask.
LLAMA2_TURN = "{{ ' '  + content.strip() + ' ' + eos_token }}"
LLAMA31_TURN = (
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}"
)
TAGGED = {
    "llama2": (LLAMA2_TURN, "{% generation %}" + LLAMA2_TURN + "{% endgeneration %}"),
    "llama3": (
        LLAMA31_TURN,
        "{%- if message.role == 'assistant' %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
        "{%- else %}" + LLAMA31_TURN + "{%- endif %}",
    ),
}
STYLES = {"llama2": (llama2_style, LLAMA2_TEMPLATE), "llama3": (llama3_style, LLAMA31_TEMPLATE)}


@pytest.fixture(scope="module", params=list(STYLES))
def style(request, tmp_path_factory):
    """(name, jpeft's Tokenizer, transformers' tokenizer) of one template style."""
    build, _ = STYLES[request.param]
    path = build(tmp_path_factory.mktemp(request.param))
    return request.param, Tokenizer.from_dir(path), hf_tokenizer(path)


def _tagged(name: str) -> str:
    template = STYLES[name][1]
    turn, tagged = TAGGED[name]
    assert template.count(turn) == 1
    return template.replace(turn, tagged)


@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("gen", [False, True])
def test_rendering_equals_transformers(style, chat, gen):
    _, tok, hf = style
    ours = tok.apply_chat_template(CHATS[chat], add_generation_prompt=gen)
    assert ours == hf.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=gen)


def test_llama31_system_block_and_header(tmp_path):
    tok = Tokenizer.from_dir(llama3_style(tmp_path))
    text = tok.apply_chat_template(CHATS["ends with a user turn"], add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "Answer with digits.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "two plus two<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("chat", ["system, two turns", "three turns"])
def test_assistant_mask_equals_transformers(style, chat):
    """The loss mask equals transformers' assistant_masks for the template tagged with
    {% generation %}: found by prefix rendering on the plain template, and by the tags on the
    tagged one."""
    name, tok, hf = style
    messages = CHATS[chat]
    tagged = _tagged(name)
    expected = hf.apply_chat_template(
        messages, chat_template=tagged, return_assistant_tokens_mask=True, return_dict=True
    )
    assert sum(expected["assistant_masks"]) > 0
    for template in (STYLES[name][1], tagged):
        ours = Tokenizer(tok.backend, **tok.special_tokens, chat_template=template)
        example = data.encode_record(ours, data.Record(messages=messages))
        assert example.input_ids.tolist() == expected["input_ids"]
        assert example.loss_mask.tolist() == expected["assistant_masks"]


def test_targets_are_content_and_end_of_turn(style):
    name, tok, _ = style
    rendered = data.render_record(tok, data.Record(messages=CHATS["three turns"]))
    targets = [rendered.text[s:e] for s, e in rendered.targets]
    if name == "llama2":
        assert targets == [" hello </s>", " 4 </s>", " 6 </s>"]
    else:
        assert targets == ["hello<|eot_id|>", "4<|eot_id|>", "6<|eot_id|>"]


def test_generation_spans_as_transformers_tracker():
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}"
        "{% endif %}\n{% endfor %}"
    )
    chat = chat_template.render(template, CHATS["three turns"])
    assert [chat.text[s:e] for s, e in chat.generation_spans] == ["hello", "4", "6"]


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
        "{% endfor %}",
        "{{ messages | tojson }}{{ messages[0] | tojson(indent=2) }}",
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }}{{ bos_token is defined }}{{ pad_token is defined }}",
        "{{ strftime_now('%Y') | length }}{{ tools is none }}{{ documents is none }}",
    ],
)
def test_jinja_features_as_transformers(style, template):
    _, tok, hf = style
    messages = [{"role": "user", "content": "ünï <b>&"}, {"role": "assistant", "content": "x"}]
    ours = Tokenizer(tok.backend, **tok.special_tokens, chat_template=template)
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, chat_template=template, tokenize=False
    )


def test_missing_features_and_template_errors_raise_clearly(style):
    name, tok, hf = style
    with pytest.raises(ValueError, match=r"cannot be compiled by jinja2 \(line 1\).*unknown tag"):
        Tokenizer(tok.backend, chat_template="{% do x %}").apply_chat_template([])
    with pytest.raises(ValueError, match="No filter named 'shout'"):
        Tokenizer(tok.backend, chat_template="{{ 'a' | shout }}").apply_chat_template([])
    if name == "llama2":
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(ValueError, match=f"{tok.source}: .*roles must alternate"):
            tok.apply_chat_template(bad)
        with pytest.raises(Exception, match="roles must alternate"):
            hf.apply_chat_template(bad, tokenize=False)


def test_chat_template_jinja_file(tmp_path):
    path = llama2_style(tmp_path, chat_template=None)
    (path / "chat_template.jinja").write_text(LLAMA31_TEMPLATE)
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    messages = CHATS["three turns"]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
