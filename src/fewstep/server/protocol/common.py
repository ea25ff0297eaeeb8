"""What every API shares: the strict base model, LoRA names, the typed error body."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from ...lora import MAX_LORA_WEIGHT
from ...names import NAME_PATTERN

MAX_TIMEOUT_S = 3600.0


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraName(ApiModel):
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN,
                      description="a LoRA name from GET /v1/loras")
    weight: float = Field(1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {code: {"model": ErrorResponse}
          for code in (400, 401, 404, 408, 413, 422, 429, 499, 503, 504)}
