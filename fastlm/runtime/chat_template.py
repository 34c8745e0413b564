"""Chat templates: messages -> prompt text, rendered as transformers' apply_chat_template does.

Source, first found: an explicit template file (`fastlm serve --chat-template FILE`), the checkpoint's
chat_template.jinja, tokenizer_config.json's `chat_template` (a string, or a list of named templates of
which "default" is taken). Rendering uses jinja2's ImmutableSandboxedEnvironment with transformers'
settings (trim_blocks, lstrip_blocks, loopcontrols) and helpers (`raise_exception`, the `tojson`
filter, `strftime_now`); the variables are `messages`, `add_generation_prompt` and the special tokens
(`bos_token`, `eos_token`, `pad_token`). The rendered text is encoded without adding special tokens,
so a template that writes its own BOS gets exactly one.
"""
import json
from datetime import datetime
from pathlib import Path
from typing import List, Optional

TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: Optional[dict] = None, origin: str = "chat template"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{origin} is empty")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin} is not a valid jinja2 template: {e.message} (line {e.lineno})") from None
        self.special_tokens = dict(special_tokens or {})
        self.origin = origin

    def render(self, messages, add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text of a conversation; ValueError when the messages are malformed or the template
        rejects them (its raise_exception message is passed on)."""
        messages = check_messages(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **variables})
        except Exception as e:  # noqa: BLE001 - whatever the template does wrong is reported, not a crash
            raise ValueError(f"the chat template rejected the messages: {e}") from None

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True) -> List[int]:
        """Token ids of the rendered conversation (no special tokens added beyond the template's)."""
        ids = tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False)
        if not ids:
            raise ValueError("the chat template rendered the messages as an empty prompt")
        return list(ids)


def load_chat_template(folder, tokenizer=None, override=None) -> Optional[ChatTemplate]:
    """The checkpoint's chat template (see the module docstring), or None when it has none.
    override: a template file path that takes precedence."""
    special = special_token_strings(tokenizer)
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file not found: {override}")
        return ChatTemplate(path.read_text(encoding="utf-8"), special, origin=f"chat template {path}")
    folder = Path(folder)
    if (folder / TEMPLATE_FILE).is_file():
        path = folder / TEMPLATE_FILE
        return ChatTemplate(path.read_text(encoding="utf-8"), special, origin=f"chat template {path}")
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_path} is not a valid JSON object: {e}") from None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    return ChatTemplate(template, special, origin=f"chat_template of {config_path}")


def special_token_strings(tokenizer) -> dict:
    """bos_token / eos_token / pad_token as strings ('' when the tokenizer has none)."""
    if tokenizer is None:
        return {}
    ids = {"bos_token": tokenizer.bos_token_id, "eos_token": tokenizer.eos_token_id, "pad_token": tokenizer.pad_token_id}
    return {name: tokenizer.token(i) or "" for name, i in ids.items()}


def check_messages(messages) -> List[dict]:
    """A non-empty list of {"role": str, "content": str | list of text parts | None, ...}; text parts
    are joined into one string (what text-only templates expect). ValueError naming the field."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string, got {role!r}")
        checked.append({**message, "content": _content_text(message.get("content"), i)})
    return checked


def _content_text(content, i: int):
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}} "
                             "(this model reads text only)")
        texts.append(part["text"])
    return "\n".join(texts)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)
