"""What every config section shares: the pydantic base (unknown keys are errors: a typo in
config.yaml must be named by `gateway check`, not silently ignored), the `ConfigIssue`
every check reports, and the `on_failure` vocabulary of the store-backed policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

# local: decide with this process's own bounded state (the default; docs/redis.md),
# open: act as if there were no edge, closed: answer 503.
FailureMode = Literal["local", "open", "closed"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file; `key` is the dotted path an operator can find in the
    file (`routes[2].cache.ttl`), empty for the file as a whole."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message
