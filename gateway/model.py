"""The pydantic base shared by every config section: unknown keys are errors (a typo in
config.yaml must be named by `gateway check`, not silently ignored)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
