"""Chat templates render as transformers' apply_chat_template does (ChatML, Llama 3, tojson + loop
controls), from the checkpoint's files or an override; errors are ValueErrors with the template's message."""
import json

import pytest

from fastlm.model import load_tokenizer
from fastlm.runtime.chat_template import ChatTemplate, check_messages, load_chat_template, special_token_strings
from tests.runtime.chat_templates import CHATML, JSON_SKIP_SYSTEM, LLAMA3, STRICT_ALTERNATION

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 日本 ?"},
                {"role": "assistant", "content": "  hi there  "}, {"role": "user", "content": "again"}]


@pytest.mark.parametrize("template", [CHATML, LLAMA3, JSON_SKIP_SYSTEM], ids=["chatml", "llama3", "tojson"])
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_and_encodes_as_transformers(checkpoints, name, template, add_generation_prompt):
    from transformers import AutoTokenizer

    folder = checkpoints[name][0]
    hf = AutoTokenizer.from_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    ours = ChatTemplate(template, special_token_strings(tokenizer))
    expected = hf.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    assert ours.render(CONVERSATION, add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(CONVERSATION, chat_template=template, tokenize=True, return_dict=False,
                                          add_generation_prompt=add_generation_prompt)
    assert ours.encode(tokenizer, CONVERSATION, add_generation_prompt) == list(expected_ids)


def test_llama3_template_writes_exactly_one_bos(checkpoints):
    tokenizer = load_tokenizer(checkpoints["llama_gqa"][0])
    ids = ChatTemplate(LLAMA3, special_token_strings(tokenizer)).encode(tokenizer, CONVERSATION)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_raise_exception_becomes_a_value_error_with_its_message():
    template = ChatTemplate(STRICT_ALTERNATION)
    assert template.render([{"role": "user", "content": "a"}]) == "user: a\nassistant: "
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        template.render([{"role": "assistant", "content": "a"}])


def test_sandbox_refuses_unsafe_attribute_access():
    with pytest.raises(ValueError, match="chat template rejected"):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([{"role": "user", "content": "a"}])


@pytest.mark.parametrize("messages, match", [
    ([], "messages must be a non-empty list"),
    ("hi", "messages must be a non-empty list"),
    ([{"content": "a"}], r"messages\[0\].role"),
    (["a"], r"messages\[0\] must be an object"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"messages\[0\].content\[0\]"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        check_messages(messages)


def test_text_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert check_messages(parts)[0]["content"] == "a\nb"


def test_sources_and_precedence(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config {{ messages[0].content }}"}))
    messages = [{"role": "user", "content": "x"}]
    assert load_chat_template(tmp_path).render(messages) == "config x"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "named"}]}))
    assert load_chat_template(tmp_path).render(messages) == "named"
    (tmp_path / "chat_template.jinja").write_text("file {{ messages[0].content }}")
    assert load_chat_template(tmp_path).render(messages) == "file x"
    override = tmp_path / "override.jinja"
    override.write_text("override")
    assert load_chat_template(tmp_path, override=override).render(messages) == "override"
    with pytest.raises(FileNotFoundError, match="chat template file not found"):
        load_chat_template(tmp_path, override=tmp_path / "missing.jinja")


def test_no_template_and_invalid_ones(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="not a valid jinja2 template"):
        load_chat_template(tmp_path)
    with pytest.raises(ValueError, match="is empty"):
        ChatTemplate("   ")


def test_llm_chat_generates_from_the_rendered_conversation(llms, checkpoints, reference_kernels):
    llm, messages = llms["gpt2"], [{"role": "user", "content": "Once upon a time"}]
    ids = ChatTemplate(CHATML, special_token_strings(llm.tokenizer)).encode(llm.tokenizer, messages)
    expected = llm.tokenizer.decode(llm.generate_tokens([ids], max_new_tokens=10, temperature=0)[0])
    assert llm.chat(messages, max_new_tokens=10, temperature=0, chat_template=CHATML) == expected
    with pytest.raises(ValueError, match="has no chat template"):
        llm.chat(messages)
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        llm.chat([{"role": "assistant", "content": "a"}], chat_template=STRICT_ALTERNATION)
