"""Chat messages to prompt token ids with the tokenizer's own chat template (transformers renders it).

The template is rendered to text and tokenized without adding special tokens (the template writes its
own), as SGLang and vLLM do, so the ids are what a trainer gets from
`tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
add_special_tokens=False)`.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from rollout.server.openai_schemas import ChatCompletionRequest, OpenAIBadRequest
from rollout.server.schemas import short


def _text_content(i: int, content: Any) -> Any:
    """OpenAI's content parts as one string (the templates of text models expect a string)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIBadRequest(f"messages[{i}].content must be a string or a list of content parts, got "
                               f"{short(content)}.", "messages")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise OpenAIBadRequest(f"messages[{i}].content[{j}] is of type {kind!r}; this server serves text "
                                   "only (parts of type 'text').", "messages")
        texts.append(part["text"])
    return "".join(texts)


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    if not req.messages:
        raise OpenAIBadRequest("messages cannot be empty.", "messages")
    out = []
    for i, message in enumerate(req.messages):
        if not isinstance(message.get("role"), str):
            raise OpenAIBadRequest(f"messages[{i}].role must be a string, got {short(message.get('role'))}.",
                                   "messages")
        message = dict(message)
        message["content"] = _text_content(i, message.get("content"))
        out.append(message)
    return out


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, req: ChatCompletionRequest) -> list[int]:
    if not tokenizer.chat_template:
        raise OpenAIBadRequest("The tokenizer of this model has no chat template; use /v1/completions.", "messages")
    messages = _messages(req)
    if req.continue_final_message and req.add_generation_prompt:
        add_generation_prompt = False  # continuing the last (assistant) message opens no new one
    else:
        add_generation_prompt = req.add_generation_prompt
    kwargs: dict[str, Any] = dict(req.chat_template_kwargs or {})
    if req.tools:
        kwargs["tools"] = req.tools
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=req.continue_final_message, **kwargs)
    except Exception as e:  # the template's own checks (roles must alternate, ...): the client's input
        raise OpenAIBadRequest(f"The chat template failed on these messages: {type(e).__name__}: {e}",
                               "messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
