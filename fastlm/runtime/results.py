"""What LLM.generate / generate_tokens return with return_details=True, and how results are shaped.

    c = llm.generate("Once upon a time", logprobs=3, return_details=True)
    c.text, c.token_ids, c.finish_reason          # "stop" (eos, stop token/string), "length" or "abort"
    c.logprobs[i].logprob, c.logprobs[i].top      # per new token: its log-probability, the 3 likeliest

Shapes: one prompt gives one result (a str, ids or a Completion) when n == 1 and a list of n results
when n > 1; a list of prompts gives a list of those, one per prompt.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from fastlm.runtime.engine.sampler import TokenLogprobs


@dataclass
class Completion:
    """One generated sample of one prompt."""
    text: str  # '' when generated through generate_tokens on a checkpoint without a tokenizer
    token_ids: List[int]
    finish_reason: Optional[str] = None
    logprobs: Optional[List[TokenLogprobs]] = None  # one per token id, when logprobs was asked for
    _pieces: List[str] = field(default_factory=list, repr=False)

    def add(self, out) -> None:
        """Append one SequenceOutput of this sample."""
        self.token_ids.extend(out.token_ids)
        self._pieces.append(out.text)
        if self.logprobs is not None:
            self.logprobs.extend(out.logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason
            self.text = "".join(self._pieces)


def shape(per_prompt: List[list], single_prompt: bool, n: int):
    """per_prompt[i] = the n results of prompt i -> the documented result shape."""
    results = [samples[0] if n == 1 else samples for samples in per_prompt]
    return results[0] if single_prompt else results
