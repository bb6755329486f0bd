"""The OpenAI-compatible routes end to end, driven by the official `openai` client against
`python -m rollout.launch_server` on a tiny random Llama with SmolLM2's tokenizer (which has a chat
template): completions and chat, sync and streaming, n > 1, logprobs against transformers, stop, seeds,
the token-id extensions, OpenAI's error shape (the server keeps serving), and /v1/embeddings on
all-MiniLM-L6-v2 against transformers.
"""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import requests
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from tests.helpers import ServerProcess, make_tiny_model_dir
from tests.scoring_models import minilm_path

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-openai"), context_length=1024)


@pytest.fixture(scope="module")
def server(model_dir: str):
    proc = ServerProcess(["--device", "cpu", "--dtype", "float32", "--model-path", model_dir,
                          "--max-total-tokens", "16384", "--log-level", "warning"]).start(timeout=300)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def chat_ids(tokenizer, messages=MESSAGES) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate(server: ServerProcess, **body) -> dict:
    resp = server.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_models(client, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [model_dir]


def test_completion_greedy_equals_generate(client, server):
    got = client.completions.create(model="any", prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    want = generate(server, text=PROMPT, sampling_params={"max_new_tokens": 12, "temperature": 0})
    choice = got.choices[0]
    assert choice.text == want["text"]
    assert choice.token_ids == want["output_ids"]
    assert choice.finish_reason == want["meta_info"]["finish_reason"]["type"] == "length"
    assert got.usage.prompt_tokens == want["meta_info"]["prompt_tokens"] == len(choice.prompt_token_ids)
    assert got.usage.completion_tokens == 12
    assert got.metadata == {"weight_version": "default"}
    assert got.object == "text_completion" and got.model == "any"


def test_chat_greedy_equals_transformers(client, tokenizer, hf_model):
    got = client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=8, temperature=0,
                                         extra_body={"return_token_ids": True, "return_input_ids_in_sglext": True,
                                                     "return_output_ids_in_sglext": True})
    prompt = chat_ids(tokenizer)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    choice = got.choices[0]
    assert got.prompt_token_ids == prompt
    assert choice.token_ids == ref
    assert got.sglext == {"input_ids": prompt, "output_ids": [ref]}
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(ref, skip_special_tokens=True)
    assert got.usage.prompt_tokens == len(prompt) and got.usage.completion_tokens == len(ref)


def test_chat_logprobs_match_transformers(client, tokenizer, hf_model):
    got = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"return_token_ids": True})
    choice = got.choices[0]
    prompt, out = chat_ids(tokenizer), choice.token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + out])).logits[0]
    ref = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    entries = choice.logprobs.content
    assert len(entries) == len(out)
    for i, (entry, token) in enumerate(zip(entries, out)):
        assert entry.token == tokenizer.decode([token])
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        top = torch.topk(ref[i], 3)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen token is the top one


def test_completion_logprobs_equal_generate(client, server):
    got = client.completions.create(model="m", prompt=[PROMPT, "Hello"], max_tokens=5, temperature=0, logprobs=2)
    assert [c.index for c in got.choices] == [0, 1]
    for prompt, choice in zip([PROMPT, "Hello"], got.choices):
        want = generate(server, text=prompt, sampling_params={"max_new_tokens": 5, "temperature": 0},
                        return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True)
        meta = want["meta_info"]
        # a batch of two prompts rounds differently from one prompt alone (CPU GEMMs): not bit-exact
        assert choice.logprobs.token_logprobs == pytest.approx([lp for lp, _, _ in meta["output_token_logprobs"]],
                                                               abs=1e-5)
        assert choice.logprobs.tokens == [t for _, _, t in meta["output_token_logprobs"]]
        for got_top, row in zip(choice.logprobs.top_logprobs, meta["output_top_logprobs"]):
            assert got_top == pytest.approx({t: lp for lp, _, t in row}, abs=1e-5)
        assert "".join(choice.logprobs.tokens) == choice.text
        offsets = [0]
        for t in choice.logprobs.tokens[:-1]:
            offsets.append(offsets[-1] + len(t))
        assert choice.logprobs.text_offset == offsets


def test_n_and_seed(client):
    def sample(seed):
        return client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=seed,
                                         extra_body={"return_token_ids": True})

    a, b, c = sample(7), sample(7), sample(8)
    ids = lambda r: [ch.token_ids for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert ids(a) == ids(b)                       # the same seed, the same samples
    assert ids(a) != ids(c)
    assert len({tuple(x) for x in ids(a)}) == 3   # the n samples differ from each other
    assert a.usage.prompt_tokens == len(a.choices[0].prompt_token_ids)  # the prompt counts once
    assert a.usage.completion_tokens == 24


def test_stop_string(client):
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = full[: full.find(stop)]
    got = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_equals_sync(client):
    kwargs = dict(model="m", messages=MESSAGES, max_tokens=10, temperature=0, n=2)
    sync = client.chat.completions.create(**kwargs, extra_body={"return_token_ids": True})
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True},
                                            logprobs=True, extra_body={"return_token_ids": True})
    text, ids, lps, finish, usage, prompt_ids = {0: ""}, {0: []}, {0: []}, {}, None, None
    text[1], ids[1], lps[1] = "", [], []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if getattr(chunk, "prompt_token_ids", None) is not None:
            prompt_ids = chunk.prompt_token_ids
        if not chunk.choices:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        text[choice.index] += choice.delta.content or ""
        ids[choice.index] += choice.token_ids
        lps[choice.index] += [e.logprob for e in choice.logprobs.content]
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    for i in range(2):
        assert text[i] == sync.choices[i].message.content
        assert ids[i] == sync.choices[i].token_ids and len(lps[i]) == len(ids[i])
        assert finish[i] == sync.choices[i].finish_reason
    assert prompt_ids == sync.prompt_token_ids
    assert usage.completion_tokens == sync.usage.completion_tokens
    assert usage.prompt_tokens == sync.usage.prompt_tokens


def test_completion_stream_chunks(client, server):
    want = generate(server, text=PROMPT, sampling_params={"max_new_tokens": 12, "temperature": 0})
    with requests.post(server.url + "/v1/completions", stream=True, timeout=120,
                       json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    streamed = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want["text"]


@pytest.mark.parametrize("kwargs, param, fragment", [
    (dict(temperature=-1), "temperature", "temperature must be a non-negative"),
    (dict(n=0), "n", "n must be at least 1"),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be at least 1"),
    (dict(top_p=0), "top_p", "top_p must be in (0, 1]"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "Unknown field in the request body: frobnicate=1"),
    (dict(extra_body={"max_tokens": "ten"}), "max_tokens", "max_tokens='ten'"),
    (dict(logprobs=True, top_logprobs=99), "top_logprobs", "top_logprobs must be in [0, 20], got 99"),
    (dict(messages=[]), "messages", "messages cannot be empty"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages", "serves text only"),
    (dict(messages=[{"role": "user", "content": "word " * 1200}]), "messages", "longer than the model's context"),
])
def test_chat_bad_input(client, kwargs, param, fragment):
    body = dict(model="m", messages=MESSAGES, max_tokens=4)
    body.update(kwargs)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    err = info.value.body
    assert info.value.status_code == 400
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert fragment in err["message"], err["message"]
    assert err["param"] == param
    assert client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2).choices[0].message.content


def test_bad_completion_bodies(server):
    for body, fragment in [({"prompt": []}, "prompt must be"), ({"prompt": [[1, 2], []]}, "prompt must be"),
                           ({"prompt": [10**9]}, "outside the vocabulary"),
                           ({"prompt": "x", "best_of": 3}, "best_of must equal n"),
                           ({"prompt": "x", "echo": True, "logprobs": 1}, "echo with logprobs")]:
        resp = server.post("/v1/completions", json=body)
        assert resp.status_code == 400, resp.text
        assert fragment in resp.json()["error"]["message"]
    resp = server.post("/v1/completions", data=b"{not json")
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    assert resp.json()["error"]["param"] is None
    resp = server.post("/v1/embeddings", json={"input": "hi"})
    assert resp.status_code == 400 and "--is-embedding" in resp.json()["error"]["message"]
    assert server.get("/health").status_code == 200


def test_echo_and_token_id_prompt(client, server, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    got = client.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0, echo=True)
    want = generate(server, input_ids=ids, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert got.choices[0].text == tokenizer.decode(ids) + want["text"]


@pytest.mark.slow  # all-MiniLM-L6-v2, a real model, in a server of its own (shared: tests/conftest.py)
def test_embeddings_match_transformers(minilm_server):
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    sentences = ["This is an example sentence.", "Hi"]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    want = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    client = openai.OpenAI(base_url=minilm_server.url + "/v1", api_key="unused", max_retries=0)
    got = client.embeddings.create(model="minilm", input=sentences)
    as_b64 = client.embeddings.create(model="minilm", input="Hi", encoding_format="base64")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=MESSAGES)
    by_ids = client.embeddings.create(model="minilm", input=tok("Hi")["input_ids"])
    vectors = torch.tensor([d.embedding for d in got.data])
    assert [d.index for d in got.data] == [0, 1]
    assert bool((F.cosine_similarity(vectors, want, dim=-1) >= 0.99999).all())
    assert got.usage.prompt_tokens == int(enc["attention_mask"].sum())
    decoded = np.frombuffer(base64.b64decode(as_b64.data[0].embedding), dtype="<f4").tolist()  # OpenAI's encoding
    assert decoded == pytest.approx(got.data[1].embedding, abs=1e-6)
    assert by_ids.data[0].embedding == pytest.approx(got.data[1].embedding, abs=1e-6)
