"""The torch dtype of each precision a recipe names (train.precision, model.gather_dtype: schema.Precision)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
