"""Chat templates: how /v1/chat/completions turns messages into a prompt for a base (non-chat) model.

GPT-Neo and GPT-J have no chat format, so the default is a plain transcript:

    {system message}                       (only when there is one, then a blank line)
    User: {message}
    Assistant: {message}
    User: {message}
    Assistant:

generation stops at the next "\\nUser:", and the reply's leading whitespace is removed. "dolly" is the
instruction format Databricks' Dolly (GPT-J fine-tuned) was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

DOLLY_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.")


@dataclass(frozen=True)
class ChatTemplate:
    """Renders (role, text) messages into a prompt; `stop` ends the assistant's turn."""

    name: str
    system_format: str  # how a system message opens the prompt
    default_system: str  # used when the messages have no system message
    user_format: str
    assistant_format: str
    generation_prompt: str  # appended to open the assistant's reply
    stop: tuple[str, ...]

    def render(self, messages: list[tuple[str, str]]) -> str:
        """Returns the prompt for messages, each (role, text) with role system, user or assistant."""
        system = [text for role, text in messages if role in ("system", "developer")]
        out = [self.system_format.format(content="\n\n".join(system) if system else self.default_system)] \
            if system or self.default_system else []
        for role, text in messages:
            if role == "user":
                out.append(self.user_format.format(content=text))
            elif role == "assistant":
                out.append(self.assistant_format.format(content=text))
        return "".join(out) + self.generation_prompt


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate(
        name="plain", system_format="{content}\n\n", default_system="",
        user_format="User: {content}\n", assistant_format="Assistant: {content}\n",
        generation_prompt="Assistant:", stop=("\nUser:",)),
    "dolly": ChatTemplate(
        name="dolly", system_format="{content}\n\n", default_system=DOLLY_INTRO,
        user_format="### Instruction:\n{content}\n\n", assistant_format="### Response:\n{content}\n\n### End\n\n",
        generation_prompt="### Response:\n", stop=("### End", "### Instruction:")),
}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    """Returns a ChatTemplate by name (plain, dolly) or as given; raises ConfigError for an unknown name."""
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ConfigError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]
