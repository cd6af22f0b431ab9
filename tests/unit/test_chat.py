"""Chat templates rendered the way Hugging Face renders them, checked against prompts written out by hand."""

from __future__ import annotations

from datetime import datetime

import pytest

from worker.chat.template import TemplateCompileError, TemplateRenderError, render

# SmolLM2-135M-Instruct's template, as its GGUF (the embedded default model) carries it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 3's template (tokenizer_config.json of the instruction-tuned checkpoints): BOS inside the template, the system
# prompt folded into the first user turn, roles checked with raise_exception.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

TALK = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Name a colour. "},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one."},
]


def smollm2(messages, **kw):
    return render(SMOLLM2_TEMPLATE, messages, bos_token="<|im_start|>", eos_token="<|im_end|>", **kw)


def gemma3(messages, **kw):
    return render(GEMMA3_TEMPLATE, messages, bos_token="<bos>", eos_token="<eos>", **kw)


def test_smollm2_chatml():
    assert smollm2(TALK) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n  Name a colour. <|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n"
        "<|im_start|>user\nAnother one.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_adds_its_default_system_prompt_and_honours_add_generation_prompt():
    assert smollm2([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_gemma3_folds_the_system_prompt_into_the_first_turn():
    assert gemma3(TALK) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nName a colour.<end_of_turn>\n"
        "<start_of_turn>model\nBlue.<end_of_turn>\n"
        "<start_of_turn>user\nAnother one.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_raise_exception_in_the_template_is_a_render_error():
    with pytest.raises(TemplateRenderError, match="must alternate"):
        gemma3([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_trim_blocks_and_lstrip_blocks():
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% endif %}\n"
                "{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert render(template, messages, bos_token=None, eos_token=None) == "U: a\nU: c\n"


def test_what_hugging_face_gives_a_template():
    template = (
        "[{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}]"
        "{% if tools is not none %}TOOLS{% endif %}{% if documents is not none %}DOCS{% endif %}"
        "{{ messages[0]['content'] | tojson }}{{ strftime_now('%Y') }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    )
    out = render(template, [{"role": "user", "content": "héllo"}, {"role": "x", "content": ""}], bos_token=None,
                 eos_token="</s>")
    assert out == f'[|</s>|True]"héllo"{datetime.now().year}user'


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{{ messages.append({'role': 'user'}) }}",  # immutable: a template cannot change the conversation
    "{{ raise_exception('nope') }}",
    "{{ messages[0]['content'] + 1 }}",
])
def test_sandbox_and_template_failures_are_render_errors(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateRenderError):
        render(template, messages, bos_token=None, eos_token=None)
    assert messages == [{"role": "user", "content": "hi"}]


def test_a_broken_template_is_a_compile_error():
    with pytest.raises(TemplateCompileError, match="does not compile"):
        render("{% for m in messages %}", [], bos_token=None, eos_token=None)
