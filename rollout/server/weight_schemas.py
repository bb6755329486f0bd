"""Bodies of the weight-update and generation-control routes (API.md "Weight updates"), checked by hand.

Each parser returns the keyword fields of the matching runtime/messages.py control message (without
`id`), or raises BadRequest naming the field and the value. Unknown keys are ignored (API.md: a control
endpoint accepts {} and ignores unknown keys), so SGLang clients that send extra fields work.
"""

from __future__ import annotations

from typing import Any

from rollout.server.schemas import BadRequest, short
from sync.specs import parse_dtype

_MISSING = object()
LOAD_FORMATS_DISTRIBUTED = (None, "auto", "flattened_bucket")
PAUSE_MODES = ("abort", "retract", "in_place")
MEMORY_TAGS = ("kv_cache", "weights")
MAX_GROUP_TIMEOUT_S = 3600.0
# A version is echoed into every later answer: keep it a label, not a payload.
MAX_VERSION_CHARS = 256
# /get_weights_by_name answers JSON built in one piece: bound the rows asked for (the engine also bounds
# the values, runtime/weight_updater.py MAX_WEIGHT_VALUES, since a row can be wide).
MAX_TRUNCATE_SIZE = 65536


def _get(body: dict[str, Any], name: str, kind: type | tuple, default: Any = _MISSING, *,
         nullable: bool = False) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise BadRequest(f"{name} is required.")
        return default
    if value is None and nullable:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise BadRequest(f"{name} must be {_kind_name(kinds)}, got {short(value)}.")
    if not isinstance(value, kinds):
        raise BadRequest(f"{name} must be {_kind_name(kinds)}, got {short(value)}.")
    return value


def _kind_name(kinds: tuple) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", float: "a number", list: "a list",
             dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds if k is not float or int not in kinds)


def _version(body: dict[str, Any], name: str = "weight_version", default: Any = None) -> str | None:
    version = _get(body, name, str, default)
    if version is not None and len(version) > MAX_VERSION_CHARS:
        raise BadRequest(f"{name} must be at most {MAX_VERSION_CHARS} characters, got {len(version)}: "
                         f"{short(version)}.")
    return version


def _digests(body: dict[str, Any]) -> dict[str, int] | None:
    """Optional {HF name: CRC-32 of the tensor's bytes as sent} (sync.checksum.tensor_checksum)."""
    digests = _get(body, "digests", dict, None)
    if digests is None:
        return None
    for name, crc in digests.items():
        if not isinstance(crc, int) or isinstance(crc, bool) or not 0 <= crc < 2**32:
            raise BadRequest(f"digests[{short(name)}] must be a CRC-32 (an integer in [0, 2**32)), got {short(crc)}.")
    return digests


def _common(body: dict[str, Any]) -> dict[str, Any]:
    return {"weight_version": _version(body), "flush_cache": _get(body, "flush_cache", bool, True),
            "digests": _digests(body)}


def parse_update_from_disk(body: dict[str, Any]) -> dict[str, Any]:
    path = _get(body, "model_path", str)
    if not path:
        raise BadRequest("model_path must be a non-empty path, got ''.")
    return {"model_path": path, "load_format": _get(body, "load_format", str, None),
            "abort_all_requests": _get(body, "abort_all_requests", bool, False), **_common(body)}


def parse_init_group(body: dict[str, Any]) -> dict[str, Any]:
    port = _get(body, "master_port", int)
    if not 0 < port < 65536:
        raise BadRequest(f"master_port must be in [1, 65535], got {port}.")
    world_size = _get(body, "world_size", int)
    if world_size < 2:
        raise BadRequest(f"world_size must be at least 2 (the trainer and this server), got {world_size}.")
    rank_offset = _get(body, "rank_offset", int)
    if not 1 <= rank_offset < world_size:
        raise BadRequest(f"rank_offset must be in [1, world_size - 1] = [1, {world_size - 1}] (the trainer is "
                         f"rank 0), got {rank_offset}.")
    backend = _get(body, "backend", str, None)   # absent: by the server's device (WeightUpdater)
    if backend is not None and backend not in ("nccl", "gloo"):
        raise BadRequest(f"backend must be 'nccl' or 'gloo', got {short(backend)}.")
    timeout = _get(body, "timeout", (int, float), 300.0)
    if not 0 < timeout <= MAX_GROUP_TIMEOUT_S:
        raise BadRequest(f"timeout must be a number of seconds in (0, {MAX_GROUP_TIMEOUT_S:g}], got {timeout}.")
    address = _get(body, "master_address", str)
    if not address:
        raise BadRequest("master_address must be a host name or address, got ''.")
    return {"master_address": address, "master_port": port, "rank_offset": rank_offset, "world_size": world_size,
            "group_name": _group_name(body), "backend": backend, "timeout": float(timeout)}


def _group_name(body: dict[str, Any]) -> str:
    name = _get(body, "group_name", str, "weight_update_group")
    if not name:
        raise BadRequest("group_name must be a non-empty string, got ''.")
    return name


def parse_update_from_distributed(body: dict[str, Any]) -> dict[str, Any]:
    names = _get(body, "names", list)
    dtypes = _get(body, "dtypes", list)
    shapes = _get(body, "shapes", list)
    if not names:
        raise BadRequest("names must list at least one tensor, got [].")
    if not len(names) == len(dtypes) == len(shapes):
        raise BadRequest(f"names, dtypes and shapes must have the same length, got {len(names)}, {len(dtypes)}, "
                         f"{len(shapes)}.")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise BadRequest(f"names[{i}] must be a tensor name, got {short(name)}.")
    out_dtypes = []
    for i, d in enumerate(dtypes):
        try:
            if not isinstance(d, str):
                raise ValueError
            out_dtypes.append(str(parse_dtype(d)).removeprefix("torch."))
        except ValueError:
            raise BadRequest(f"dtypes[{i}] must be a torch dtype name such as 'bfloat16', got {short(d)}.") from None
    for i, s in enumerate(shapes):
        if not isinstance(s, list) or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in s):
            raise BadRequest(f"shapes[{i}] must be a list of non-negative integers, got {short(s)}.")
    load_format = _get(body, "load_format", str, None)
    if load_format not in LOAD_FORMATS_DISTRIBUTED:
        raise BadRequest(f"load_format must be null or 'flattened_bucket', got {short(load_format)}.")
    return {"names": names, "dtypes": out_dtypes, "shapes": shapes, "group_name": _group_name(body),
            "load_format": load_format, **_common(body)}


def parse_destroy_group(body: dict[str, Any]) -> dict[str, Any]:
    return {"group_name": _group_name(body)}


def parse_update_from_tensor(body: dict[str, Any]) -> dict[str, Any]:
    payloads = _get(body, "serialized_named_tensors", list)
    if not payloads or any(not isinstance(p, str) for p in payloads):
        raise BadRequest("serialized_named_tensors must be a non-empty list of base64 strings (safetensors bytes, "
                         f"see sync.encode_named_tensors), got {short(payloads)}.")
    return {"serialized_named_tensors": payloads, "load_format": _get(body, "load_format", str, None),
            **_common(body)}


def parse_get_weights(body: dict[str, Any]) -> dict[str, Any]:
    name = _get(body, "name", str)
    size = body.get("truncate_size", 100)
    if isinstance(size, str) and size.isdigit():  # from a query string
        size = int(size)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise BadRequest(f"truncate_size must be a positive integer, got {short(size)}.")
    if size > MAX_TRUNCATE_SIZE:
        raise BadRequest(f"truncate_size must be at most {MAX_TRUNCATE_SIZE} (rows, or elements of a vector), got "
                         f"{size}.")
    return {"name": name, "truncate_size": size}


def parse_update_weight_version(body: dict[str, Any]) -> dict[str, Any]:
    return {"new_version": _version(body, "new_version", _MISSING),
            "abort_all_requests": _get(body, "abort_all_requests", bool, False)}


def parse_pause(body: dict[str, Any]) -> dict[str, Any]:
    mode = _get(body, "mode", str, "abort")
    if mode not in PAUSE_MODES:
        raise BadRequest(f"mode must be one of {list(PAUSE_MODES)}, got {short(mode)}.")
    return {"mode": mode}


def parse_memory_tags(body: dict[str, Any]) -> dict[str, Any]:
    tags = _get(body, "tags", list, None)
    if tags is not None:
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad or not tags:
            raise BadRequest(f"tags must be a non-empty subset of {list(MEMORY_TAGS)}, got {short(tags)}.")
    return {"tags": tags}
