"""The runtime's public surface: `from runtime import Engine`, registries that load on demand and say what
they know, and a thread count that only the process's owner sets."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest
import torch

import runtime.engine
from runtime.attention.registry import ATTENTION_BACKENDS, create_attention_backend
from runtime.kv_pool import KVPool
from runtime.model_runner import ModelRunner
from runtime.models.registry import GENERATION_MODELS, SCORING_MODELS, get_model_class
from runtime.server_args import ServerArgs


def test_from_runtime_import_engine():
    from runtime import Engine, ServerArgs as PublicArgs, WeightsUnusableError

    assert Engine is runtime.engine.Engine and PublicArgs is ServerArgs
    assert WeightsUnusableError is runtime.engine.WeightsUnusableError
    with pytest.raises(ImportError):
        from runtime import NoSuchThing  # noqa: F401


def test_importing_runtime_and_registries_loads_no_model_code():
    code = ("import sys, runtime, runtime.models.registry, runtime.attention.registry\n"
            "loaded = [m for m in ('runtime.engine', 'runtime.models.llama', 'runtime.models.bert', "
            "'runtime.attention.torch_backend') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_registry_entry_resolves():
    for table in (GENERATION_MODELS, SCORING_MODELS, ATTENTION_BACKENDS):
        for name, where in table.items():
            assert isinstance(pkgutil.resolve_name(where), type), name
    assert get_model_class(["BertModel"], is_embedding=True).__name__ == "BertEmbeddingModel"
    assert get_model_class(["Nope", "Qwen3ForCausalLM"]).__name__ == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match=r"Unsupported architectures \['Nope'\] for generation; supported: "
                                         r"\['LlamaForCausalLM', 'MistralForCausalLM'"):
        get_model_class(["Nope"])
    with pytest.raises(ValueError, match="is a scoring model"):
        get_model_class(["BertModel"])
    pool = KVPool(1, 8, 1, 4, torch.float32, "cpu")
    assert type(create_attention_backend("torch", pool)).__name__ == "TorchAttentionBackend"
    with pytest.raises(ValueError, match=r"Unknown attention backend 'nope'; available: \['batch_invariant', 'flashinfer', 'torch', 'triton', 'triton_invariant'\]"):
        create_attention_backend("nope", pool)


def test_thread_count_is_set_only_by_who_owns_the_process(tiny_model_dir):
    path = tiny_model_dir("llama")
    before = torch.get_num_threads()
    other = before + 1
    try:
        ModelRunner(ServerArgs(model_path=path, device="cpu", max_total_tokens=256, num_threads=other),
                    progress=False)
        assert torch.get_num_threads() == before  # a runner never changes the embedding process's threads
        with runtime.engine.Engine(path, progress=False, skip_tokenizer_init=True, device="cpu",
                                   max_total_tokens=256) as eng:
            assert torch.get_num_threads() == before
            assert len(eng.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2,
                                                                          "ignore_eos": True})["output_ids"]) == 2
        with runtime.engine.Engine(path, progress=False, skip_tokenizer_init=True, device="cpu",
                                   max_total_tokens=256, num_threads=other):
            assert torch.get_num_threads() == other  # asked for explicitly
    finally:
        torch.set_num_threads(before)
