"""A Jinja chat template: rendered like transformers renders it, sandboxed; one BOS when the vocabulary asks for it.
(Which format a model gets: tests/test_chat_formats.py.)"""
from __future__ import annotations

import pytest

from lcrun.chat.template import ChatTemplate, TemplateError, compile_template, merge_same_roles
from tests.fixtures.tokenizer_factory import LLAMA3_CHAT_TEMPLATE

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"}]


def test_llama3_template_renders_the_documented_format() -> None:
    template = ChatTemplate(LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>")
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert template.render(MESSAGES) == expected
    assert template.render(MESSAGES, add_generation_prompt=False) == expected.rsplit("<|start_header_id|>", 1)[0]


def test_sandbox_blocks_python_internals() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError, match="rendering failed"):
        ChatTemplate(evil).render(MESSAGES)
    mutate = "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages | length }}"
    with pytest.raises(TemplateError):
        ChatTemplate(mutate).render(MESSAGES)


def test_raise_exception_in_a_template_merges_consecutive_roles_then_gives_up() -> None:
    strict = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
              "{{ raise_exception('roles must alternate') }}{% endif %}[{{ m['role'] }}:{{ m['content'] }}]"
              "{% endfor %}")
    template = ChatTemplate(strict)
    doc_then_question = [{"role": "user", "content": "DOC"}, {"role": "user", "content": "Q?"}]
    assert template.render(doc_then_question) == "[user:DOC\n\nQ?]"
    never = "{{ raise_exception('no system role') }}"
    with pytest.raises(TemplateError, match="no system role"):
        ChatTemplate(never).render([{"role": "user", "content": "x"}])


def test_merge_same_roles_keeps_alternating_ones() -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert merge_same_roles(msgs) == msgs


def test_syntax_error_is_reported_when_the_model_opens() -> None:
    with pytest.raises(TemplateError, match="not valid Jinja"):
        compile_template("{% for m in messages %}")


def test_bos_is_added_once_when_the_vocabulary_asks_for_it() -> None:
    with_bos = ChatTemplate(LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", add_bos=True)
    assert with_bos.render(MESSAGES).count("<|begin_of_text|>") == 1  # the template writes it: not twice
    no_bos_in_it = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert ChatTemplate(no_bos_in_it, "<s>", add_bos=True).render(MESSAGES) == "<s>[Be brief.][ Hi \n]"
    assert ChatTemplate(no_bos_in_it, "<s>", add_bos=False).render(MESSAGES) == "[Be brief.][ Hi \n]"


def test_tojson_and_strftime_now_are_available() -> None:
    template = ChatTemplate("{{ messages[0] | tojson }} {{ strftime_now('%Y') | length }}")
    assert template.render([{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"} 4'


def test_a_template_without_a_system_role_gets_it_folded_into_the_first_user_message() -> None:
    gemma_like = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
                  "{% endfor %}")
    template = ChatTemplate(gemma_like)
    assert template.render(MESSAGES) == "<user>Be brief.\n\n Hi \n</user>"
    assert template.render(MESSAGES[1:]) == "<user> Hi \n</user>"  # nothing to fold: rendered as it is
