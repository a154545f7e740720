"""The one place a model prompt is built: training and evaluation both call this.

The seed trained on hand-formatted ChatML with no system turn and evaluated through
the tokenizer's chat template, which for Qwen2.5 injects a default system prompt
training never saw. Here both sides get exactly the same messages and template.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = (
    "You are a careful Python engineer. Answer the task exactly as asked. "
    "Put any code in one ```python fenced block."
)


def prompt_messages(instruction: str) -> list[dict[str, str]]:
    """The chat messages a model sees for ``instruction`` (system + user)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": instruction},
    ]


def completion_messages(response: str) -> list[dict[str, str]]:
    """The assistant turn a model is trained to produce.

    Leading whitespace is dropped: the eval prompt ends with the assistant opener's
    newline, and a response opening with whitespace would merge with it into one token
    when trl tokenises prompt + completion together, so training would see a context
    that eval never gives (and trl would cut the prompt short).
    """
    return [{"role": "assistant", "content": response.lstrip()}]


def chat_example(instruction: str, response: str) -> dict[str, Any]:
    """A conversational prompt-completion example in the form trl's SFTTrainer takes."""
    return {"prompt": prompt_messages(instruction), "completion": completion_messages(response)}


def render_prompt(tokenizer: Any, instruction: str) -> str:
    """The prompt text for generation: chat template + the assistant turn opener."""
    return tokenizer.apply_chat_template(
        prompt_messages(instruction), tokenize=False, add_generation_prompt=True
    )
