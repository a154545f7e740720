"""The one prompt builder: training and evaluation see the same messages, template and tokens,
with the tiny model's plain ChatML and with the published Qwen2.5-Coder chat template."""

from __future__ import annotations

import pytest

from trackb_core.prompts import (
    SYSTEM_PROMPT,
    chat_example,
    completion_messages,
    prompt_messages,
    render_prompt,
)
from trackb_core.train import TrainConfig, build_trainer

# Instructions and responses that stress the boundary between prompt and completion:
# code fences, unicode, trailing whitespace, a response opening with a newline or spaces.
CASES = [
    ("Write a docstring for `f`.\n\n```python\ndef f(x):\n    return x\n```",
     '"""Return x unchanged."""'),
    ("Explain `größe` — what does it compute? ", "It computes the size (Größe) in µm."),
    ("Fix the bug:\n\n```python\nif a == b:\n    pass\n```\n", "\n```python\nif a != b:\n    pass\n```"),
    ("Complete `g`.", "    return 1"),
    ("Write tests.\t", "```python\nimport pytest\n\ndef test_g():\n    assert g() == 1\n```\n"),
]


def test_training_example_and_eval_prompt_share_the_messages():
    for instruction, response in CASES:
        example = chat_example(instruction, response)
        assert example["prompt"] == prompt_messages(instruction)
        assert example["completion"] == completion_messages(response)
        assert [m["role"] for m in example["prompt"]] == ["system", "user"]
        assert example["prompt"][0]["content"] == SYSTEM_PROMPT
        assert example["completion"] == [{"role": "assistant", "content": response.lstrip()}]


def test_render_prompt_is_the_chat_template_with_the_assistant_opener(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    text = render_prompt(tokenizer, "Explain `f`.")
    assert SYSTEM_PROMPT in text and "Explain `f`." in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1  # no template default system prompt added


def test_render_prompt_keeps_qwens_default_system_prompt_out(qwen_template_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_template_model_dir, local_files_only=True)
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    # The template injects its default system turn when a conversation has none (what
    # the seed's eval prompts got and its training never saw) ...
    bare = tokenizer.apply_chat_template([{"role": "user", "content": "Explain `f`."}],
                                         tokenize=False, add_generation_prompt=True)
    assert bare.startswith(f"<|im_start|>system\n{default}<|im_end|>\n")
    # ... and render_prompt always sends trackb's own.
    text = render_prompt(tokenizer, "Explain `f`.")
    assert default not in text
    assert text == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nExplain `f`.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module", params=["tiny_model_dir", "qwen_template_model_dir"],
                ids=["tiny-chatml", "qwen2.5-coder-template"])
def trained_and_eval_ids(request, tmp_path_factory):
    """(trl's tokenised training examples, eval's prompt ids) for every case, with each
    chat template."""
    model_dir = request.getfixturevalue(request.param)
    config = TrainConfig(dataset="unused", model=str(model_dir), save_steps=0)
    examples = [chat_example(i, r) for i, r in CASES]
    trainer = build_trainer(config, examples, str(model_dir),
                            str(tmp_path_factory.mktemp("prompts")))
    tokenizer = trainer.processing_class
    if request.param == "qwen_template_model_dir":  # the trainer loaded the real template
        assert "You are Qwen, created by Alibaba Cloud" in tokenizer.chat_template
    # Exactly as trackb_core/evaluate.py tokenises a prompt for generate().
    eval_ids = [tokenizer(render_prompt(tokenizer, i), add_special_tokens=False)["input_ids"]
                for i, _ in CASES]
    return trainer, eval_ids


def test_training_prompt_tokens_equal_eval_prompt_tokens(trained_and_eval_ids):
    trainer, eval_ids = trained_and_eval_ids
    assert len(trainer.train_dataset) == len(CASES)
    for example, prompt_ids in zip(trainer.train_dataset, eval_ids, strict=True):
        labels = example["labels"]
        start = next(i for i, t in enumerate(labels) if t != -100)
        # Token for token: the context the model trains on is the context eval gives it,
        # and the trained part starts exactly where the eval prompt ends.
        assert example["input_ids"][:start] == prompt_ids
        assert start == len(prompt_ids)


def test_trained_part_is_the_response_and_the_end_of_turn(trained_and_eval_ids):
    trainer, eval_ids = trained_and_eval_ids
    tokenizer = trainer.processing_class
    for example, prompt_ids, (_, response) in zip(trainer.train_dataset, eval_ids, CASES,
                                                  strict=True):
        trained = tokenizer.decode(example["input_ids"][len(prompt_ids):])
        target = response.lstrip()  # see completion_messages
        assert trained.startswith(target)
        assert trained[len(target):].rstrip("\n") == "<|im_end|>"
