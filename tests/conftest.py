"""Shared fixtures.

`tiny_model_dir(family, **overrides)` saves a small, seeded, random transformers model (config.json,
model.safetensors, generation_config.json; no tokenizer) to a temporary directory and returns its path.
The same arguments give the same directory for the whole session, so building it costs once.

    def test_something(tiny_model_dir):
        path = tiny_model_dir("qwen3", num_hidden_layers=1)

`family` is one of TINY_FAMILIES ("llama", "qwen2", "qwen3", "mistral", and the MoE families "qwen3_moe",
"qwen2_moe", "mixtral"); keyword arguments override the
config (anything the family's config class takes, e.g. tie_word_embeddings=True, rope_parameters=...).
Two keyword-only knobs are not config fields: `seed` (default 0) and `init_std` (default 0.15). Weights
are drawn from N(0, init_std) and norm weights from 1 + N(0, init_std), instead of transformers' tiny
default init (std 0.02, zero biases, unit norms), so logits are far from flat and a wrong bias, norm or
rotary shows up as a large difference.

Servers that several modules only read from are started once per session here (`tiny_llm_server`,
`minilm_server`, `scoring_rm_server` / `scoring_lm_server`): each start costs seconds. A test that changes a server's state
(weights, weight_version, pause, memory) starts its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

# Small enough to build in well under a second, big enough to have GQA, several heads and real rotary.
TINY_BASE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # family: (config class name in transformers, family-specific defaults)
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),                 # q/k/v always carry a bias
    "qwen3": ("Qwen3Config", {"head_dim": 32}),   # q/k norm; head_dim != hidden / heads on purpose
    "mistral": ("MistralConfig", {}),
    # Mixture-of-experts families: 8 small experts, top-2 (Qwen3-MoE renormalizes only if norm_topk_prob).
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32}),
}


def build_tiny_model(family: str, seed: int = 0, init_std: float = 0.15, **overrides: Any):
    """The random transformers model (fp32, eval mode) that tiny_model_dir saves."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; known: {sorted(TINY_FAMILIES)}.")
    config_cls_name, family_defaults = TINY_FAMILIES[family]
    config = getattr(transformers, config_cls_name)(**{**TINY_BASE, **family_defaults, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * init_std
            if name.endswith("norm.weight"):
                param.copy_(1.0 + noise)
            else:
                param.copy_(noise)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    cache: dict[str, str] = {}

    def make(family: str, *, seed: int = 0, init_std: float = 0.15, **overrides: Any) -> str:
        key = json.dumps([family, seed, init_std, overrides], sort_keys=True, default=repr)
        if key not in cache:
            model = build_tiny_model(family, seed=seed, init_std=init_std, **overrides)
            path = Path(tmp_path_factory.mktemp(f"tiny-{family}"))
            model.save_pretrained(str(path), safe_serialization=True)
            cache[key] = str(path)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def checkpoints(tiny_model_dir: Callable[..., str]) -> dict[str, str]:
    """Tiny Llama checkpoints a weight update switches between: "a" (the one served first), "b" (same
    shapes, other values) and "wide" (another MLP width, which an update must refuse)."""
    return {"a": tiny_model_dir("llama"), "b": tiny_model_dir("llama", seed=1),
            "wide": tiny_model_dir("llama", intermediate_size=96)}


# Each shared server is stopped right after the last collected test that uses it (not at the session's end):
# an idle server pair holds ~0.7 GB, which later memory-hungry tests (the trainer examples) need on a small
# CI machine. Its fixture's own teardown then finds it stopped and still checks that it exited 0.
SHARED_SERVER_FIXTURES = ("tiny_llm_server", "minilm_server", "scoring_servers")
_last_user: dict[str, str] = {}                    # fixture name -> node id of the last test that uses it
_stop_early: dict[str, Callable[[], object]] = {}  # fixture name -> how to stop its running server(s)


@pytest.hookimpl(trylast=True)  # after -k / -m deselection and any reordering: the order that runs
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _last_user.clear()
    for item in items:
        for name in SHARED_SERVER_FIXTURES:
            if name in getattr(item, "fixturenames", ()):  # the closure: fixtures that use it count
                _last_user[name] = item.nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    for name, nodeid in _last_user.items():
        if nodeid == item.nodeid and name in _stop_early:
            _stop_early.pop(name)()


@pytest.fixture(scope="session")
def minilm_server():
    """all-MiniLM-L6-v2 served with --is-embedding (tests/scoring_models.py's minilm_path), started once for
    the modules that only read from it (test_openai_routes, test_scoring_real_models): a start is seconds
    of the suite. Tests must not change its state (weights, version, pause); it must exit 0 at the end."""
    from tests.scoring_models import minilm_path
    from tests.server_checks import cpu_server

    with cpu_server(minilm_path(), "--is-embedding") as server:
        _stop_early["minilm_server"] = server.stop
        yield server


# A tiny random Llama with SmolLM2's tokenizer, served once for test_constrained_decoding, test_sampling_mask and
# test_server (they only read from it; test_server's flush_cache tests flush the prefix cache, which changes
# no answer).
@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/helpers.py's make_tiny_model_dir with its defaults (context 4096, seed 0)."""
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llm"), context_length=4096)


@pytest.fixture(scope="session")
def tiny_llm_server(tiny_llm_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """tiny_llm_dir served on CPU in float32 with a KV pool of 120000 tokens; it must exit 0 at the end."""
    from tests.server_checks import cpu_server

    log = str(tmp_path_factory.mktemp("tiny-llm-log") / "server.log")
    with cpu_server(tiny_llm_dir, "--max-total-tokens", "120000", log_path=log) as proc:
        _stop_early["tiny_llm_server"] = proc.stop
        yield proc


# The tiny scoring pair, served once for test_scoring_server and test_client_scoring (which only read from
# them: no weight update, version change or pause; a test that needs to change state starts its own server).
@pytest.fixture(scope="session")
def scoring_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with SmolLM2's tokenizer (tests/helpers.py), context 512."""
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-lm"), context_length=512)


@pytest.fixture(scope="session")
def scoring_rm_dir(scoring_lm_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """scoring_lm_dir as a reward model (LlamaForSequenceClassification with a seeded head)."""
    from tests.scoring_models import make_reward_model_dir

    return make_reward_model_dir(tmp_path_factory.mktemp("tiny-rm"), scoring_lm_dir, head_std=0.3)


@pytest.fixture(scope="session")
def scoring_servers(scoring_rm_dir: str, scoring_lm_dir: str):
    """{"rm": scoring_rm_dir served with --is-embedding (prompts prefilled in chunks of 16 tokens), "lm":
    scoring_lm_dir served as a generation model (/v1/score)}; both load at once. Each must exit 0."""
    from tests.helpers import ServerProcess

    common = ["--device", "cpu", "--dtype", "float32", "--log-level", "warning", "--max-total-tokens", "8192"]
    servers = {"rm": ServerProcess([*common, "--model-path", scoring_rm_dir, "--is-embedding",
                                    "--chunked-prefill-size", "16"]),
               "lm": ServerProcess([*common, "--model-path", scoring_lm_dir])}
    try:
        for server in servers.values():
            server.spawn()
        for server in servers.values():
            server.wait_until_ready(300)
        _stop_early["scoring_servers"] = lambda: [server.stop() for server in servers.values()]
        yield servers
    finally:
        codes = {name: server.stop() for name, server in servers.items()}
    assert codes == {"rm": 0, "lm": 0}, (codes, {name: server.log() for name, server in servers.items()})


@pytest.fixture(scope="session")
def scoring_rm_server(scoring_servers):
    return scoring_servers["rm"]


@pytest.fixture(scope="session")
def scoring_lm_server(scoring_servers):
    return scoring_servers["lm"]


def _triton_process(interpret: bool):
    import importlib.util

    from triton_interpret import TritonProcess

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]' brings it)")
    process = TritonProcess(interpret)
    try:
        yield process
    finally:
        process.close()


@pytest.fixture(scope="session")
def triton_interpreter():
    """A child process where Triton interprets: kernels run on CPU tensors (tests/triton_interpret.py)."""
    yield from _triton_process(interpret=True)


@pytest.fixture(scope="session")
def triton_compiler():
    """A child process where Triton compiles (offline, for a GPU architecture; tests/triton_interpret.py)."""
    yield from _triton_process(interpret=False)
