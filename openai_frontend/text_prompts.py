"""Text-only chats tokenised in the adapter and sent to `llm` directly.

The ids are the ones `preprocess` would make (the same chat template and tokenizer; positions
are plain for text), so the answer is the same; but the request never queues behind media being
decoded in `preprocess` or encoded in `vit`, and skips two hops. Needs the checkpoint directory
(`--model-path`, which the launcher passes); without it everything goes through the ensemble.
"""

from __future__ import annotations

from pathlib import Path

from qwen3vl_backend.processing.chat import load_chat_template, render_chat
from qwen3vl_backend.processing.tokenizer import Tokenizer


class TextPrompts:
    def __init__(self, model_dir: str | Path):
        self.template = load_chat_template(model_dir)
        self.tokenizer = Tokenizer(model_dir)

    def ids(self, messages, tools=None, template_kwargs=None, add_generation_prompt=True,
            continue_final_message=False) -> tuple[list[int] | None, bool]:
        """-> (the prompt's token ids, or None when the chat has media (the ensemble's work);
        whether the prompt ends inside an opened <think>, as a Thinking checkpoint's template
        leaves it)."""
        text, media = render_chat(self.template, messages, tools, template_kwargs, add_generation_prompt,
                                  continue_final_message)
        thinking = text.rstrip().endswith("<think>")
        return (None if media else self.tokenizer.encode(text)), thinking

