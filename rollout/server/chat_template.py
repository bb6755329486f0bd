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


_RESERVED_KWARGS = {"tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask"}


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


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise OpenAIBadRequest(f"messages must be a list of chat messages, got {short(messages)}.", "messages")
    if not messages:
        raise OpenAIBadRequest("messages cannot be empty.", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OpenAIBadRequest(f"messages[{i}] must be an object, got {short(message)}.", "messages")
        if not isinstance(message.get("role"), str):
            raise OpenAIBadRequest(f"messages[{i}].role must be a string, got {short(message.get('role'))}.",
                                   "messages")
        message = dict(message)
        message["content"] = _text_content(i, message.get("content"))
        out.append(message)
    return out


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Any, *, add_generation_prompt: bool,
                continue_final_message: bool, tools: list[dict[str, Any]] | None = None,
                chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The chat as the model sees it: the tokenizer's template applied to the checked `messages`; every
    failure is an OpenAIBadRequest naming `messages`."""
    if not tokenizer.chat_template:
        raise OpenAIBadRequest("The tokenizer of this model has no chat template; send a prompt instead of "
                               "messages (/v1/completions, or 'prompt' to /v1/tokenize).", "messages")
    messages = _messages(messages)
    if continue_final_message and add_generation_prompt:
        add_generation_prompt = False  # continuing the last (assistant) message opens no new one
    kwargs: dict[str, Any] = dict(chat_template_kwargs or {})
    # These change what apply_chat_template returns (ids, a dict, tensors) instead of the template's variables.
    reserved = sorted(set(kwargs) & _RESERVED_KWARGS)
    if reserved:
        raise OpenAIBadRequest(f"chat_template_kwargs cannot set {reserved} (the server renders the chat to text "
                               f"itself), got {short(chat_template_kwargs)}.", "chat_template_kwargs")
    if tools:
        kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as e:  # the template's own checks (roles must alternate, ...): the client's input
        raise OpenAIBadRequest(f"The chat template failed on these messages: {type(e).__name__}: {e}",
                               "messages") from None
    if not isinstance(text, str):
        raise OpenAIBadRequest(f"The chat template rendered {type(text).__name__}, not text; check "
                               f"chat_template_kwargs={short(chat_template_kwargs)}.", "chat_template_kwargs")
    return text


def chat_prompt_text(tokenizer: PreTrainedTokenizerBase, req: ChatCompletionRequest) -> str:
    """The prompt of a chat request as text, to be tokenized without special tokens (the template wrote them)."""
    return render_chat(tokenizer, req.messages, add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=req.continue_final_message, tools=req.tools,
                       chat_template_kwargs=req.chat_template_kwargs)
