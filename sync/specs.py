"""Names, dtypes and shapes of a list of tensors: what a trainer announces before it broadcasts them.

Dtypes travel as strings without the "torch." prefix ("bfloat16"), the form SGLang resolves with
`getattr(torch, dtype)`; `parse_dtype` also accepts the prefixed form that `str(torch.bfloat16)` gives.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import msgspec
import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}.")
    return dtype


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    return _numel(shape) * dtype.itemsize


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class TensorSpecs(msgspec.Struct):
    """Parallel lists, in broadcast order; the fields of `/update_weights_from_distributed`."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise ValueError(f"names, dtypes and shapes differ in length: {len(self.names)}, "
                             f"{len(self.dtypes)}, {len(self.shapes)}.")

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]]) -> "TensorSpecs":
        names, dtypes, shapes = [], [], []
        for name, tensor in named:
            names.append(name)
            dtypes.append(dtype_name(tensor.dtype))
            shapes.append(list(tensor.shape))
        return cls(names, dtypes, shapes)

    def torch_dtypes(self) -> list[torch.dtype]:
        return [parse_dtype(d) for d in self.dtypes]

    def nbytes(self) -> int:
        return sum(nbytes_of(s, d) for s, d in zip(self.shapes, self.torch_dtypes()))

    def __len__(self) -> int:
        return len(self.names)
