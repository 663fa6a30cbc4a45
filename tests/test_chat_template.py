"""The chat template: rendered like transformers renders it, sandboxed, with fallbacks chosen by the vocabulary."""
from __future__ import annotations

import pytest

from lcrun.chat.template import TemplateError, merge_same_roles, template_for
from tests.fixtures.tokenizer_factory import LLAMA3_CHAT_TEMPLATE

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"}]


def test_llama3_template_renders_the_documented_format() -> None:
    template = template_for(LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", lambda t: False)
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert template.render(MESSAGES) == expected
    assert template.render(MESSAGES, add_generation_prompt=False) == expected.rsplit("<|start_header_id|>", 1)[0]


def test_sandbox_blocks_python_internals() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError, match="rendering failed"):
        template_for(evil, "", "", lambda t: False).render(MESSAGES)
    mutate = "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages | length }}"
    with pytest.raises(TemplateError):
        template_for(mutate, "", "", lambda t: False).render(MESSAGES)


def test_raise_exception_in_a_template_merges_consecutive_roles_then_gives_up() -> None:
    strict = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
              "{{ raise_exception('roles must alternate') }}{% endif %}[{{ m['role'] }}:{{ m['content'] }}]"
              "{% endfor %}")
    template = template_for(strict, "", "", lambda t: False)
    doc_then_question = [{"role": "user", "content": "DOC"}, {"role": "user", "content": "Q?"}]
    assert template.render(doc_then_question) == "[user:DOC\n\nQ?]"
    never = "{{ raise_exception('no system role') }}"
    with pytest.raises(TemplateError, match="no system role"):
        template_for(never, "", "", lambda t: False).render([{"role": "user", "content": "x"}])


def test_merge_same_roles_keeps_alternating_ones() -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert merge_same_roles(msgs) == msgs


def test_syntax_error_is_reported_when_the_model_opens() -> None:
    with pytest.raises(TemplateError, match="not valid Jinja"):
        template_for("{% for m in messages %}", "", "", lambda t: False)


def test_fallbacks_follow_the_vocabulary() -> None:
    llama3 = template_for(None, "<|begin_of_text|>", "", {"<|start_header_id|>", "<|eot_id|>"}.__contains__)
    assert llama3.origin.startswith("llama3")
    assert llama3.render(MESSAGES).startswith("<|begin_of_text|><|start_header_id|>system")
    chatml = template_for(None, "", "", {"<|im_start|>"}.__contains__)
    assert chatml.render(MESSAGES).endswith("<|im_start|>assistant\n")
    with pytest.raises(TemplateError, match="matches no known format"):
        template_for(None, "", "", lambda t: False)


def test_tojson_and_strftime_now_are_available() -> None:
    template = template_for("{{ messages[0] | tojson }} {{ strftime_now('%Y') | length }}", "", "", lambda t: False)
    assert template.render([{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"} 4'


def test_a_template_without_a_system_role_gets_it_folded_into_the_first_user_message() -> None:
    gemma_like = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
                  "{% endfor %}")
    template = template_for(gemma_like, "", "", lambda t: False)
    assert template.render(MESSAGES) == "<user>Be brief.\n\n Hi \n</user>"
    assert template.render(MESSAGES[1:]) == "<user> Hi \n</user>"  # nothing to fold: rendered as it is
