"""Reading the JSON files of a Hugging Face checkpoint (config.json, generation_config.json,
tokenizer_config.json, ...): one reader with one error style, and the eos-id convention."""
import json
from pathlib import Path


def read_json_object(path, missing_ok: bool = True) -> dict:
    """The JSON object in `path`; {} when the file is absent and missing_ok. ValueError naming the file
    when it is not valid JSON or not an object; FileNotFoundError when absent and not missing_ok."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def eos_id_list(value) -> list:
    """An eos_token_id entry (None, an id, or a list of ids as Llama 3 writes it) as a list of ids."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def eos_id_entry(ids):
    """The inverse of eos_id_list: None, one id, or a list (how HF config files spell it)."""
    ids = list(ids or [])
    return ids[0] if len(ids) == 1 else (ids or None)
