"""One request's state inside the engine: tokens, progress, blocks and its multimodal inputs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0             # tokens whose K/V are in the cache
    num_cached_prompt: int = 0        # prompt tokens served from the prefix cache on admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # multimodal: opaque to the scheduler; the model runner reads it
    mm: object = None
    # identity of each prompt token for the prefix cache (media tokens carry their content hash)
    cache_keys: list | None = None
    arrival: float = 0.0
    # its last token is queued and ends it (max_tokens or the context): the scheduler skips it
    finishing: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
