"""Prompt validation shared by the LLM API and the engine."""
from typing import List

import torch


def check_prompt_ids(prompts, vocab_size: int, name: str = "prompts") -> List[List[int]]:
    """A list of non-empty lists of ids in [0, vocab_size); ValueError naming the argument otherwise."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name} must be a non-empty list of lists of token ids, got {type(prompts).__name__}")
    checked = []
    for i, ids in enumerate(prompts):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"{name}[{i}] must be a non-empty list of token ids (empty prompt)")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"{name}[{i}] has {t!r}, not a token id in [0, {vocab_size})")
        checked.append(list(ids))
    return checked
