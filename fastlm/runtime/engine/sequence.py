"""One generated sequence of a request: its tokens, where their K/V live, and how far it has got.

The state that decides what a step does is counted in tokens whose K/V are in the pool
(num_computed_tokens), never in generated tokens: after a preemption the sequence starts again from
zero computed tokens and recomputes prompt + generated tokens as one (chunked) prefill. Each step
computes the span token_ids[num_computed_tokens : num_computed_tokens + span]; when the span reaches
the last token, the step's logits for it sample the next token.
"""
import enum
from typing import List, Optional

from fastlm.runtime.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # holds no blocks (new, or preempted)
    RUNNING = "running"  # holds blocks; some of its tokens may still need computing (chunked prefill)
    FINISHED = "finished"


class Sequence:
    """Sample `index` of request `request_id`. `arrival` orders sequences: the newest is preempted first."""

    def __init__(self, request_id: int, index: int, arrival: int, prompt_ids: List[int], params: SamplingParams,
                 max_length: int):
        self.request_id, self.index, self.arrival = request_id, index, arrival
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.max_length = max_length  # prompt + new tokens end here (max_new_tokens clipped to the context)
        self.status = Status.WAITING
        self.block_table: List[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the pool
        self.block_hashes: List[int] = []  # prefix-cache chain hash of each full block (block_manager.py)
        self.generator = None  # torch.Generator of a seeded sequence (set by the engine)
        self.finish_reason: Optional[str] = None  # "stop", "length" or "abort"
        self.text = None  # fastlm.runtime.text.SequenceText when the engine has a tokenizer

    @property
    def sort_key(self):
        return (self.arrival, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> List[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def block_tokens(self, i: int, block_size: int) -> tuple:
        return tuple(self.token_ids[i * block_size:(i + 1) * block_size])

    def __repr__(self):
        return (f"Sequence(request={self.request_id}, index={self.index}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})")
