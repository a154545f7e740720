"""trackb eval (tiny model, real generation; vLLM wiring against a fake vllm) and
trackb score (hand-written predictions), both through the one scorer."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import subprocess
import sys
import types

import pytest

from trackb_core.errors import ConfigError, InputError, MissingInputError
from trackb_core.evaluate import (
    EvalConfig,
    ScoreConfig,
    choose_backend,
    corpus_dir_for,
    find_adapter,
    run,
    score,
)
from trackb_core.generation import item_seed
from trackb_core.metrics import METRIC_VERSION
from trackb_core.store import LocalStore

SEED_KEYS = {"tag", "total_samples", "k", "pass_at_1", "pass_at_k", "avg_style_score",
             "hallucination_rate", "execution_rate", "per_category", "failures"}
EVAL_KEYS = {"tag", "metric_version", "n_items", "settings", "headline", "seed_compatible",
             "functional", "families", "budget", "per_category", "items", "trackb"}
SETTINGS_KEYS = {"dataset", "sampling", "backend", "dtype", "device", "model", "adapter",
                 "corpus", "scorer", "tag"}

CATEGORIES = ("docstring", "complete", "bugfix", "explain", "unit_test", "complete")


def dataset_rows():
    rows = []
    for i, category in enumerate(CATEGORIES):
        instruction = f"Task {i} ({category}): write a function that returns {i} plus x."
        response = f"```python\ndef f{i}(x):\n    return x + {i}\n```"
        source = f"def f{i}(x):\n    return x + {i}\n"
        rows.append({
            "id": f"item-{i}", "category": category, "instruction": instruction,
            "response": response, "source_function": source,
            "source_file": "m.py", "function_id": f"m.py::f{i}", "function_name": f"f{i}",
            "qualname": f"f{i}", "signature": f"def f{i}(x):", "params": ["x"],
            "returns_value": True, "line": 1, "end_line": 2, "decorators": [],
            "messages": [{"role": "user", "content": instruction},
                         {"role": "assistant", "content": response}],
        })
    return rows


@pytest.fixture
def dataset_dir(tmp_path):
    folder = tmp_path / "build-dataset"
    folder.mkdir()
    # written in reverse id order: outputs must not depend on file order
    rows = list(reversed(dataset_rows()))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def read_jsonl(store, key):
    return [json.loads(line) for line in store.get_text(key).splitlines()]


def assert_every_headline_has_its_ci(result):
    assert result["headline"], "no headline metrics"
    for name, entry in result["headline"].items():
        if entry["value"] is None:
            assert entry["ci"] is None and entry["reason"], name  # unavailable, and why
        else:
            low, high = entry["ci"]
            assert low <= entry["value"] <= high, name
            assert entry["n"] >= 1, name


# -- trackb eval (Hugging Face backend) ----------------------------------------------------

def eval_config(dataset_dir, tiny_model_dir, **overrides):
    values = {"dataset": str(dataset_dir), "model": str(tiny_model_dir), "tag": "baseline",
              "max_new_tokens": 12, "batch_size": 4, "backend": "hf"}
    values.update(overrides)
    return EvalConfig(**values)


def test_eval_defaults_match_the_seed_and_allow_unbiased_pass_at_3():
    config = EvalConfig()
    assert config.n_samples == 3 and config.temperature == 0.6 and config.top_p == 0.95
    # a whole 60-line function fits; the seed block still scores the first 384 tokens
    assert config.backend == "auto" and config.max_new_tokens >= 1024


def test_eval_with_tiny_model_is_complete_and_deterministic(tmp_path, dataset_dir,
                                                            tiny_model_dir):
    outs = [LocalStore(tmp_path / f"eval{i}") for i in range(2)]
    for out in outs:
        manifest = run(eval_config(dataset_dir, tiny_model_dir), out)
        assert set(manifest["outputs"]) == {"predictions.jsonl", "generation.json",
                                            "eval.json"}
        assert out.exists("manifest.json")

    predictions = read_jsonl(outs[0], "predictions.jsonl")
    ids = [p["id"] for p in predictions]
    assert ids == sorted(f"item-{i}" for i in range(len(CATEGORIES)))  # every id, sorted
    for p in predictions:
        assert set(p) == {"id", "greedy", "samples", "truncated", "seed_view"}
        assert isinstance(p["greedy"], str) and len(p["samples"]) == 3  # default n = 3
        assert all(isinstance(s, str) for s in p["samples"])
        assert len(p["truncated"]["samples"]) == 3 and len(p["seed_view"]["samples"]) == 3
        # 12 tokens is under the seed's 384: the seed view is the whole answer
        assert p["seed_view"] == {"greedy": p["greedy"], "samples": p["samples"]}
    # the barely pretrained fixture model may only emit whitespace, but it emits
    # something: all-empty answers would mean the prompt tokens were cut, not the new ones
    assert all(p["greedy"] for p in predictions)
    assert any(s.strip() for p in predictions for s in p["samples"])

    # same seed: byte-identical predictions (greedy and the seeded samples), same metrics
    assert outs[0].get_bytes("predictions.jsonl") == outs[1].get_bytes("predictions.jsonl")
    results = [json.loads(out.get_text("eval.json")) for out in outs]
    for result in results:
        del result["trackb"]  # generation facts: timings differ
    assert results[0] == results[1]

    result = json.loads(outs[0].get_text("eval.json"))
    assert EVAL_KEYS <= set(result)
    assert result["metric_version"] == METRIC_VERSION and result["tag"] == "baseline"
    assert result["n_items"] == len(CATEGORIES)
    assert_every_headline_has_its_ci(result)
    # 3 samples: the seed's pass@3 (greedy + 2 samples) and the unbiased pass@3 both exist
    assert result["headline"]["seed_pass_at_3"]["value"] is not None
    assert result["functional"]["n_samples"] == 3
    assert result["functional"]["temperature"] == 0.6
    seed = result["seed_compatible"]
    assert SEED_KEYS <= set(seed) and seed["k"] == 3 and seed["total_samples"] == 6
    assert seed["per_category"]["complete"]["count"] == 2
    assert {i["id"] for i in result["items"]} == set(ids)
    settings = result["settings"]
    assert set(settings) == SETTINGS_KEYS
    assert settings["model"] == str(tiny_model_dir) and settings["adapter"] is None
    assert settings["backend"] == "hf" and settings["device"] == "cpu"
    assert settings["dtype"] == "float32"  # the runtime plan on a CPU
    assert settings["dataset"]["items"] == len(CATEGORIES)
    assert settings["dataset"]["sha256"] == hashlib.sha256(
        (dataset_dir / "test.jsonl").read_bytes()).hexdigest()
    assert settings["sampling"] == {
        "max_new_tokens": 12, "n_samples": 3, "temperature": 0.6, "top_p": 0.95, "seed": 42,
        "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
        "stop_tokens": ["<|im_end|>", "<|im_start|>"], "seed_view_tokens": 12}
    assert settings["corpus"] == {"needed": True, "available": False, "sha256": None,
                                  "execution_env": None}
    assert settings["scorer"]["metric_version"] == METRIC_VERSION
    # the barely trained model rambles: 12 tokens cut most answers, and eval says so
    truncated = [p["truncated"]["greedy"] for p in predictions]
    assert result["headline"]["truncated_rate"]["value"] == pytest.approx(
        sum(truncated) / len(truncated))
    assert result["budget"]["known"] is True
    facts = result["trackb"]
    # at most max_new_tokens per answer, 4 answers per item
    assert 0 < facts["tokens_generated"] <= 4 * 12 * len(CATEGORIES)
    assert facts["generation_seconds"] > 0
    generation = json.loads(outs[0].get_text("generation.json"))
    assert generation["settings"] == {k: v for k, v in settings.items()
                                      if k not in ("corpus", "scorer", "tag")}
    manifest = json.loads(outs[0].get_text("manifest.json"))
    assert manifest["metrics"]["seed_pass_at_1"]["ci"] is not None


def settings_for(**overrides):
    from trackb_core.generation import SamplingSettings

    values = {"max_new_tokens": 10, "n_samples": 3, "temperature": 1.0, "top_p": 1.0,
              "seed": 7, **overrides}
    return SamplingSettings(**values)


def texts(answers):
    return [[a.text for a in row] for row in answers]


def hf_generator(tiny_model_dir, count):
    """``(generate(prompts, ids, settings, batch_size), prompts, ids)`` for the first
    ``count`` test rows on the tiny model."""
    from trackb_core.evaluate import generate_hf, load_model
    from trackb_core.prompts import render_prompt

    model, tokenizer, device, _ = load_model(str(tiny_model_dir), None, str(tiny_model_dir))
    rows = dataset_rows()[:count]

    def run_hf(prompts, ids, settings, batch_size):
        return generate_hf(model, tokenizer, device, prompts, ids, settings=settings,
                           batch_size=batch_size)

    return (run_hf, [render_prompt(tokenizer, r["instruction"]) for r in rows],
            [r["id"] for r in rows])


def test_sampling_is_seeded_same_seed_same_samples_other_seed_other_samples(tiny_model_dir):
    generate_hf, prompts, ids = hf_generator(tiny_model_dir, 3)
    first = generate_hf(prompts, ids, settings_for(), 3)
    again = generate_hf(prompts, ids, settings_for(), 3)
    other = generate_hf(prompts, ids, settings_for(seed=8), 3)
    assert texts(first.samples) == texts(again.samples)
    assert [a.text for a in first.greedy] == [a.text for a in again.greedy]
    assert all(len(s) == 3 for s in first.samples)
    assert texts(other.samples) != texts(first.samples)
    # greedy does not depend on the seed
    assert [a.text for a in other.greedy] == [a.text for a in first.greedy]


def test_an_items_samples_do_not_depend_on_its_batch_or_neighbours(tiny_model_dir):
    generate_hf, prompts, ids = hf_generator(tiny_model_dir, 4)
    together = generate_hf(prompts, ids, settings_for(), 12)
    # item 2 alone, one row per batch, and in reverse order among the others
    alone = generate_hf(prompts[2:3], ids[2:3], settings_for(), 1)
    reordered = generate_hf(prompts[::-1], ids[::-1], settings_for(), 5)
    assert texts(alone.samples)[0] == texts(together.samples)[2]
    assert texts(reordered.samples)[::-1] == texts(together.samples)


def test_hf_generation_inherits_nothing_from_the_models_generation_config(tiny_model_dir):
    # A model whose generation_config.json asks for a repetition penalty, top-k 5 and a
    # minimum length: greedy answers must be the plain argmax continuation anyway.
    import torch

    from trackb_core.evaluate import generate, load_model, stop_token_ids
    from trackb_core.prompts import render_prompt

    model, tokenizer, device, _ = load_model(str(tiny_model_dir), None, str(tiny_model_dir))
    prompt = render_prompt(tokenizer, dataset_rows()[0]["instruction"])
    settings = settings_for(max_new_tokens=8, n_samples=0)
    stops = stop_token_ids(model, tokenizer)
    clean = generate(model, tokenizer, device, [prompt], settings=settings, stop_ids=stops,
                     batch_size=1)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 5
    model.generation_config.min_new_tokens = 8
    model.generation_config.no_repeat_ngram_size = 1
    polluted = generate(model, tokenizer, device, [prompt], settings=settings, stop_ids=stops,
                        batch_size=1)
    assert texts(polluted) == texts(clean)
    assert model.generation_config.repetition_penalty == 5.0  # the model's own is restored
    # and the clean answer is the argmax continuation, step by step
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    generated = []
    with torch.inference_mode():
        for _ in range(8):
            token = int(model(ids).logits[0, -1].argmax())
            generated.append(token)
            if token in stops:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert clean[0][0].text == tokenizer.decode(
        [t for t in generated if t not in stops], skip_special_tokens=True)


def test_seeded_sampler_keeps_the_nucleus_and_draws_per_row(tiny_model_dir):
    import torch

    from trackb_core.evaluate import SeededSampler

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    nucleus = SeededSampler([1, 1], "cpu", temperature=1.0, top_p=0.7, top_k=0, min_p=0.0)
    drawn = set()
    for _ in range(200):
        out = nucleus(None, scores)
        chosen = out.argmax(dim=-1).tolist()
        assert chosen[0] == chosen[1]  # same seed, same draw, whatever the row
        assert torch.isinf(out).sum() == 2 * 3  # exactly one token left per row
        drawn.add(chosen[0])
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are cut
    top1 = SeededSampler([3], "cpu", temperature=1.0, top_p=1.0, top_k=1, min_p=0.0)
    assert {int(top1(None, scores[:1]).argmax()) for _ in range(50)} == {0}


def test_eval_max_items_is_a_seeded_sample(tmp_path, dataset_dir, tiny_model_dir):
    picked = []
    for seed in (42, 42):
        out = LocalStore(tmp_path / f"eval-{len(picked)}")
        run(eval_config(dataset_dir, tiny_model_dir, max_items=3, n_samples=0,
                        max_new_tokens=2, seed=seed), out)
        rows = read_jsonl(out, "predictions.jsonl")
        assert all(r["samples"] == [] for r in rows)
        picked.append([r["id"] for r in rows])
        result = json.loads(out.get_text("eval.json"))
        assert result["seed_compatible"]["k"] == 1
        # no samples: the sample-based metrics say why they are missing
        assert "samples" in result["headline"]["functional_pass_at_1"]["reason"]
        assert result["functional"]["temperature"] is None
    assert len(picked[0]) == 3 and picked[0] == sorted(picked[0]) and picked[0] == picked[1]


def make_adapter(tiny_model_dir, folder, **lora_options):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # non-zero LoRA weights (the default init is a no-op) so the adapter visibly matters
    options = {"r": 4, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj", "o_proj"],
               "init_lora_weights": False, **lora_options}
    get_peft_model(base, LoraConfig(**options)).save_pretrained(folder / "adapter")
    return folder


def test_eval_with_adapter_changes_answers(tmp_path, dataset_dir, tiny_model_dir):
    train_dir = make_adapter(tiny_model_dir, tmp_path / "train")
    assert find_adapter(train_dir, "x") == train_dir / "adapter"
    assert find_adapter(train_dir / "adapter", "x") == train_dir / "adapter"

    plain, tuned = LocalStore(tmp_path / "plain"), LocalStore(tmp_path / "tuned")
    run(eval_config(dataset_dir, tiny_model_dir, n_samples=0), plain)
    manifest = run(eval_config(dataset_dir, tiny_model_dir, n_samples=0,
                               adapter=str(train_dir), tag="post_sft"), tuned)
    assert "adapter" in manifest["inputs"]
    result = json.loads(tuned.get_text("eval.json"))
    assert result["tag"] == "post_sft" and result["settings"]["adapter"] == str(train_dir)
    assert plain.get_bytes("predictions.jsonl") != tuned.get_bytes("predictions.jsonl")


def test_batched_greedy_is_left_padded_and_matches_one_at_a_time(tiny_model_dir):
    from trackb_core.evaluate import generate, load_model, stop_token_ids
    from trackb_core.prompts import render_prompt

    model, tokenizer, device, _ = load_model(str(tiny_model_dir), None, str(tiny_model_dir))
    assert tokenizer.padding_side == "left"
    # prompts of different lengths, so the batch really is padded
    prompts = [render_prompt(tokenizer, r["instruction"] + " more" * (3 * i))
               for i, r in enumerate(dataset_rows())]
    enc = tokenizer([prompts[0], prompts[-1]], padding=True, add_special_tokens=False)
    assert enc["attention_mask"][0][0] == 0 and enc["attention_mask"][0][-1] == 1
    stops = stop_token_ids(model, tokenizer)
    assert tokenizer.eos_token_id in stops
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in stops
    settings = settings_for(max_new_tokens=8, n_samples=0)
    single = generate(model, tokenizer, device, prompts, batch_size=1, settings=settings,
                      stop_ids=stops)
    batched = generate(model, tokenizer, device, prompts, batch_size=6, settings=settings,
                       stop_ids=stops)
    assert single == batched
    assert all(len(answers) == 1 for answers in single)


def test_decode_answer_cuts_at_the_first_stop_and_counts_it(tiny_model_dir):
    from transformers import AutoTokenizer

    from trackb_core.generation import decode_answer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("return x", add_special_tokens=False)["input_ids"]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert decode_answer(tokenizer, ids + [stop] + ids, [stop]) == ("return x", len(ids) + 1)
    assert decode_answer(tokenizer, ids, [stop]) == ("return x", len(ids))


def test_an_answer_knows_whether_the_budget_cut_it_and_keeps_its_seed_view(tiny_model_dir):
    from transformers import AutoTokenizer

    from trackb_core.generation import finish_answer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = tokenizer(" word" * 20, add_special_tokens=False)["input_ids"]
    settings = settings_for(max_new_tokens=len(words), seed_view_tokens=5)
    cut = finish_answer(tokenizer, words, [stop], settings)
    assert cut.truncated and cut.tokens == len(words)
    assert cut.text == tokenizer.decode(words)
    assert cut.seed_view == tokenizer.decode(words[:5])  # what a 5-token run returns
    ended = finish_answer(tokenizer, words[:3] + [stop], [stop], settings)
    assert not ended.truncated and ended.text == ended.seed_view
    # the stop token as the very last one the budget allows: not cut
    last = finish_answer(tokenizer, words[:-1] + [stop], [stop], settings)
    assert not last.truncated


def test_eval_input_errors(tmp_path, dataset_dir, tiny_model_dir):
    out = LocalStore(tmp_path / "eval")
    with pytest.raises(MissingInputError, match="--dataset"):
        run(eval_config(tmp_path / "nowhere", tiny_model_dir), out)
    with pytest.raises(ConfigError, match="--dataset is required"):
        run(EvalConfig(model=str(tiny_model_dir)), out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no PEFT adapter"):
        run(eval_config(dataset_dir, tiny_model_dir, adapter=str(tmp_path / "build-dataset")),
            out)
    (empty / "test.jsonl").write_text("")
    with pytest.raises(InputError, match="no test items"):
        run(eval_config(empty, tiny_model_dir), out)
    assert not out.exists("manifest.json")


# -- corpus for executing unit tests ------------------------------------------------------

def test_corpus_dir_explicit_upstream_or_none(tmp_path, dataset_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "m.py").write_text("def f0(x):\n    return x\n")
    assert corpus_dir_for(str(corpus), str(dataset_dir)) == corpus
    # no manifest upstream: unknown, not an error
    assert corpus_dir_for(None, str(dataset_dir)) is None
    # the dataset's manifest chain names the corpus
    (dataset_dir / "manifest.json").write_text(json.dumps(
        {"inputs": {"corpus": {"uri": str(corpus), "sha256": "x"}}}))
    assert corpus_dir_for(None, str(dataset_dir / "test.jsonl")) == corpus
    # recorded but gone: best effort gives None; an explicit corpus that is gone is an error
    (dataset_dir / "manifest.json").write_text(json.dumps(
        {"inputs": {"corpus": {"uri": str(tmp_path / "gone"), "sha256": "x"}}}))
    assert corpus_dir_for(None, str(dataset_dir)) is None
    with pytest.raises(MissingInputError):
        corpus_dir_for(str(tmp_path / "gone"), str(dataset_dir))


# -- backends -----------------------------------------------------------------------------

def test_vllm_backend_module_imports_without_vllm():
    # a fresh interpreter: importing the module must not import vllm (or torch)
    code = ("import sys, trackb_core.vllm_backend, trackb_core.evaluate; "
            "print('vllm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


def test_backend_vllm_without_vllm_is_a_clear_config_error(tmp_path, dataset_dir,
                                                            tiny_model_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert choose_backend("hf") == "hf"
    assert choose_backend("auto") == "hf"
    with pytest.raises(ConfigError, match="--backend vllm: vllm is not installed"):
        choose_backend("vllm")
    out = LocalStore(tmp_path / "eval")
    with pytest.raises(ConfigError, match="vllm is not installed"):
        run(eval_config(dataset_dir, tiny_model_dir, backend="vllm"), out)
    assert not out.exists("manifest.json")


class FakeVLLM:
    """Stands in for the vllm package: records how trackb drives it, answers with fixed
    token ids (an answer, a stop token, then tokens that must be cut off)."""

    def __init__(self, answer_ids, stop_id):
        self.answer_ids, self.stop_id = answer_ids, stop_id
        self.engine_options = None
        self.calls = []
        fake = self

        class SamplingParams:
            def __init__(self, **options):
                self.options = options

        class LoRARequest:
            def __init__(self, name, lora_id, path):
                self.args = (name, lora_id, path)

        class LLM:
            def __init__(self, **options):
                fake.engine_options = options

            def generate(self, requests, params, lora_request=None, use_tqdm=True):
                # one SamplingParams for all requests, or one per request
                per_request = params if isinstance(params, list) else [params] * len(requests)
                assert len(per_request) == len(requests)
                fake.calls.append({"requests": requests,
                                   "params": [p.options for p in per_request],
                                   "lora": lora_request.args if lora_request else None})
                outputs = []
                for index, options in enumerate(per_request):
                    completions = [
                        types.SimpleNamespace(token_ids=fake.answer_for(requests[index],
                                                                        index, n))
                        for n in range(options.options["n"])]
                    outputs.append(types.SimpleNamespace(outputs=completions))
                return outputs

        self.module = types.ModuleType("vllm")
        self.module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        self.lora = types.ModuleType("vllm.lora")
        self.request = types.ModuleType("vllm.lora.request")
        self.request.LoRARequest = LoRARequest

    def answer(self, index, n):
        return self.answer_ids[: 1 + (index + n) % len(self.answer_ids)] + [self.stop_id, 5, 6]

    def answer_for(self, request, index, n):
        """The token ids of answer ``n`` to ``request``, the ``index``-th of its call."""
        return self.answer(index, n)

    def install(self, monkeypatch):
        import torch

        from trackb_core import vllm_backend

        monkeypatch.setitem(sys.modules, "vllm", self.module)
        monkeypatch.setitem(sys.modules, "vllm.lora", self.lora)
        monkeypatch.setitem(sys.modules, "vllm.lora.request", self.request)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(vllm_backend, "device_facts", lambda: T4_FACTS)


T4_FACTS = {"cuda": True, "gpu_count": 1, "gpu_name": "Tesla T4", "compute_capability": [7, 5],
            "bf16_native": False, "flash_attn_varlen": False}


@pytest.fixture
def fake_vllm(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]
    fake = FakeVLLM(answer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    fake.install(monkeypatch)
    fake.tokenizer = tokenizer
    return fake


def test_vllm_backend_drives_llm_sampling_params_and_lora_request(
        tmp_path, dataset_dir, tiny_model_dir, fake_vllm):
    from trackb_core.prompts import render_prompt

    train_dir = make_adapter(tiny_model_dir, tmp_path / "train")
    assert choose_backend("auto", train_dir / "adapter") == "vllm"
    out = LocalStore(tmp_path / "eval")
    run(eval_config(dataset_dir, tiny_model_dir, backend="auto", adapter=str(train_dir),
                    max_new_tokens=20, seed=5), out)

    engine = fake_vllm.engine_options
    assert engine["model"] == str(tiny_model_dir) and engine["dtype"] == "float16"  # T4
    assert engine["enable_lora"] is True and engine["max_lora_rank"] == 8  # r=4 rounded up
    assert engine["seed"] == 5
    assert engine["generation_config"] == "vllm"  # never the model's sampling defaults
    greedy_call, sample_call = fake_vllm.calls
    stop = fake_vllm.stop_id
    stops = greedy_call["params"][0]["stop_token_ids"]
    assert stop in stops
    assert fake_vllm.tokenizer.convert_tokens_to_ids("<|im_start|>") in stops
    assert all(p == greedy_call["params"][0] for p in greedy_call["params"])
    assert greedy_call["params"][0]["n"] == 1 and greedy_call["params"][0]["temperature"] == 0.0
    items = sorted(dataset_rows(), key=lambda r: r["id"])
    for row, params in zip(items, sample_call["params"], strict=True):
        assert params == {"n": 3, "temperature": 0.6, "top_p": 0.95, "top_k": -1,
                          "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                          "frequency_penalty": 0.0, "seed": item_seed(5, row["id"]),
                          "max_tokens": 20, "stop_token_ids": stops, "ignore_eos": False,
                          "skip_special_tokens": True}
    for call in (greedy_call, sample_call):
        assert call["lora"] == ("adapter", 1, str(train_dir / "adapter"))
    # prompts go in as token ids of the same chat prompt, without added special tokens
    expected = [fake_vllm.tokenizer(render_prompt(fake_vllm.tokenizer, r["instruction"]),
                                    add_special_tokens=False)["input_ids"] for r in items]
    assert [r["prompt_token_ids"] for r in greedy_call["requests"]] == expected

    predictions = read_jsonl(out, "predictions.jsonl")
    decode = fake_vllm.tokenizer.decode
    assert predictions[0]["greedy"] == decode(fake_vllm.answer(0, 0)[:-3])  # cut at the stop
    assert [len(p["samples"]) for p in predictions] == [3] * len(items)
    assert predictions[1]["samples"][2] == decode(fake_vllm.answer(1, 2)[:-3])
    result = json.loads(out.get_text("eval.json"))
    assert result["settings"]["backend"] == "vllm" and result["settings"]["device"] == "cuda"
    assert result["settings"]["dtype"] == "float16"
    assert_every_headline_has_its_ci(result)


def record_hf_path(monkeypatch):
    """Records what the HF backend's generate() is given: each row's prompt token ids
    (padding dropped) and every SamplingSettings.hf spec, per phase (greedy, samples)."""
    from trackb_core import evaluate
    from trackb_core.generation import SamplingSettings

    seen = {"prompts": [], "specs": []}
    real_hf, real_load = SamplingSettings.hf, evaluate.load_model

    def hf(self, **options):
        spec = real_hf(self, **options)
        seen["specs"].append(spec)
        seen["prompts"].append([])
        return spec

    def load_model(*args, **kwargs):
        model, tokenizer, device, dtype = real_load(*args, **kwargs)
        real_generate = model.generate

        def generate(**options):
            for row, mask in zip(options["input_ids"].tolist(),
                                 options["attention_mask"].tolist(), strict=True):
                seen["prompts"][-1].append([t for t, keep in zip(row, mask, strict=True)
                                            if keep])
            return real_generate(**options)

        model.generate = generate
        return model, tokenizer, device, dtype

    monkeypatch.setattr(SamplingSettings, "hf", hf)
    monkeypatch.setattr(evaluate, "load_model", load_model)
    return seen


@pytest.mark.parametrize("with_adapter", [False, True])
def test_vllm_path_gets_the_prompt_ids_and_sampling_the_hf_path_uses(
        tmp_path, dataset_dir, tiny_model_dir, monkeypatch, with_adapter):
    from transformers import AutoTokenizer

    from trackb_core.generation import effective_sampling

    adapter = str(make_adapter(tiny_model_dir, tmp_path / "train")) if with_adapter else None
    options = {"adapter": adapter, "n_samples": 2, "max_new_tokens": 6, "seed": 3,
               "temperature": 0.7, "top_p": 0.9}
    hf_seen = record_hf_path(monkeypatch)
    run(eval_config(dataset_dir, tiny_model_dir, backend="hf", **options),
        LocalStore(tmp_path / "hf"))
    monkeypatch.undo()  # the HF path ran on the CPU; now a "GPU" with the fake engine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]
    fake = FakeVLLM(answer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    fake.install(monkeypatch)
    run(eval_config(dataset_dir, tiny_model_dir, backend="vllm", **options),
        LocalStore(tmp_path / "vllm"))

    greedy_call, sample_call = fake.calls
    vllm_prompts = [r["prompt_token_ids"] for r in greedy_call["requests"]]
    assert [r["prompt_token_ids"] for r in sample_call["requests"]] == vllm_prompts
    hf_greedy, hf_samples = hf_seen["prompts"]
    # HF batches by length (and repeats a prompt per sample): the same prompts, reordered
    assert sorted(hf_greedy) == sorted(vllm_prompts)
    assert sorted(hf_samples) == sorted(p for p in vllm_prompts for _ in range(2))
    hf_greedy_spec, hf_sample_spec = hf_seen["specs"]
    assert hf_greedy_spec["sampler"] is None and hf_sample_spec["sampler"]["n"] == 2
    assert all(effective_sampling(p, "vllm") == effective_sampling(hf_greedy_spec, "hf")
               for p in greedy_call["params"])
    assert all(effective_sampling(p, "vllm") == effective_sampling(hf_sample_spec, "hf")
               for p in sample_call["params"])
    items = sorted(dataset_rows(), key=lambda r: r["id"])
    assert [p["seed"] for p in sample_call["params"]] == [item_seed(3, r["id"]) for r in items]
    expected_lora = ("adapter", 1, str(tmp_path / "train" / "adapter")) if adapter else None
    assert greedy_call["lora"] == sample_call["lora"] == expected_lora
    sampling = [json.loads((tmp_path / side / "generation.json").read_text())["settings"][
        "sampling"] for side in ("hf", "vllm")]
    assert sampling[0] == sampling[1]


def test_vllm_backend_refuses_adapters_it_cannot_serve(tmp_path, tiny_model_dir, fake_vllm):
    from trackb_core.vllm_backend import max_lora_rank

    plain = make_adapter(tiny_model_dir, tmp_path / "plain", r=20)
    assert max_lora_rank(plain / "adapter") == 32
    with_head = make_adapter(tiny_model_dir, tmp_path / "head", modules_to_save=["lm_head"])
    assert choose_backend("auto", with_head / "adapter") == "hf"  # falls back
    with pytest.raises(ConfigError, match="lm_head"):
        choose_backend("vllm", with_head / "adapter")


def test_vllm_installed_but_no_gpu_is_a_config_error(fake_vllm, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto") == "hf"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        choose_backend("vllm")


# -- trackb score -------------------------------------------------------------------------

GOOD_CODE = "```python\ndef f(x):\n    return x + 1\n```"
GOOD_DOCSTRING = '"""Add one.\n\nArgs:\n    x: a number.\n\nReturns:\n    x plus one.\n"""'


def hand_predictions():
    # item-0 docstring: greedy passes; item-1 complete: only sample 2 passes;
    # item-2 bugfix: nothing passes; item-3 explain: greedy fails with a TODO;
    # item-4 unit_test: no code; item-5 complete: greedy passes (seed rules).
    # Every item has 2 samples, so the seed's pass@3 (greedy + 2 samples) exists.
    return [
        {"id": "item-0", "greedy": GOOD_DOCSTRING, "samples": ["", ""]},
        {"id": "item-1", "greedy": "no idea", "samples": ["still no", GOOD_CODE]},
        {"id": "item-2", "greedy": "wrong", "samples": ["wrong", "wrong"]},
        {"id": "item-3", "greedy": "TODO", "samples": ["", ""]},
        {"id": "item-4", "greedy": "nothing", "samples": ["", ""]},
        {"id": "item-5", "greedy": GOOD_CODE, "samples": ["", ""]},
        {"id": "elsewhere", "greedy": "not in the test split", "samples": []},
    ]


def write_predictions(folder, rows):
    folder.mkdir(exist_ok=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_score_hand_written_predictions(tmp_path, dataset_dir):
    preds = write_predictions(tmp_path / "preds", hand_predictions())
    out = LocalStore(tmp_path / "score")
    manifest = score(ScoreConfig(dataset=str(dataset_dir / "test.jsonl"),
                                 predictions=str(preds), tag="external", temperature=0.6),
                     out)
    assert manifest["stage"] == "score" and set(manifest["outputs"]) == {"eval.json"}
    result = json.loads(out.get_text("eval.json"))
    assert EVAL_KEYS <= set(result) and result["tag"] == "external"
    assert result["metric_version"] == METRIC_VERSION and result["n_items"] == 6
    assert_every_headline_has_its_ci(result)

    # the seed-compatible block is the seed's scorer, unchanged
    seed = result["seed_compatible"]
    assert SEED_KEYS <= set(seed) and seed["k"] == 3 and seed["total_samples"] == 6
    assert seed["pass_at_1"] == pytest.approx(2 / 6)  # item-0, item-5
    assert seed["pass_at_k"] == pytest.approx(3 / 6)  # + item-1 via its second sample
    assert seed["hallucination_rate"] == pytest.approx(1 / 6)  # item-3
    assert seed["execution_rate"] == pytest.approx(1 / 4)  # items 1, 2, 4, 5: only 5
    # style: docstring 1, complete (1 + 1)/2, bugfix "wrong": mentions_fix only -> 1/4,
    # explain "TODO": not_only_code only -> 1/4, unit_test 0
    assert seed["avg_style_score"] == pytest.approx((1 + 1 + 0.25 + 0.25 + 0 + 1) / 6)
    assert seed["per_category"]["complete"] == {
        "count": 2, "pass_at_1": 0.5, "pass_at_k": 1.0, "avg_style": 1.0,
        "hallucination_rate": 0.0}
    assert [f["id"] for f in seed["failures"]] == ["item-1", "item-2", "item-3", "item-4"]
    assert result["headline"]["seed_pass_at_1"]["value"] == pytest.approx(2 / 6)

    # functional pass: only unit_test (no tests in the answer: a fail, corpus or not) has
    # one (these bugfix and complete items have no hidden tests); format: only item-0's
    # Google docstring; item-5's code compiles but renames f5 to f, so it does not keep
    # the signature
    functional = {i["id"]: i["functional"] for i in result["items"]}
    assert functional == {"item-0": None, "item-1": None, "item-2": None, "item-3": None,
                          "item-4": False, "item-5": None}
    assert result["headline"]["functional_pass_greedy"]["value"] == 0.0
    assert result["headline"]["functional_pass_greedy"]["n"] == 1
    formed = {i["id"]: i["format_ok"] for i in result["items"]}
    assert formed == {"item-0": True, "item-1": False, "item-2": False, "item-3": False,
                      "item-4": False, "item-5": False}
    assert result["functional"]["temperature"] == 0.6
    assert result["trackb"]["unused_predictions"] == 1


def test_score_missing_prediction_is_input_error(tmp_path, dataset_dir):
    rows = [r for r in hand_predictions() if r["id"] != "item-4"]
    preds = write_predictions(tmp_path / "preds", rows)
    out = LocalStore(tmp_path / "score")
    with pytest.raises(InputError, match="no prediction for test item 'item-4'"):
        score(ScoreConfig(dataset=str(dataset_dir), predictions=str(preds)), out)
    assert not out.exists("manifest.json") and not out.exists("eval.json")


def test_score_rejects_duplicate_ids_and_missing_files(tmp_path, dataset_dir):
    rows = hand_predictions() + [hand_predictions()[0]]
    preds = write_predictions(tmp_path / "preds", rows)
    out = LocalStore(tmp_path / "score")
    with pytest.raises(InputError, match="appears twice"):
        score(ScoreConfig(dataset=str(dataset_dir), predictions=str(preds)), out)
    with pytest.raises(MissingInputError, match="--predictions"):
        score(ScoreConfig(dataset=str(dataset_dir), predictions=str(tmp_path / "none")), out)


def test_eval_and_score_give_identical_results_and_intervals_for_the_same_answers(
        tmp_path, dataset_dir, tiny_model_dir):
    generated = LocalStore(tmp_path / "eval")
    run(eval_config(dataset_dir, tiny_model_dir), generated)
    scored = LocalStore(tmp_path / "score")
    score(ScoreConfig(dataset=str(dataset_dir), predictions=str(tmp_path / "eval"),
                      tag="baseline"), scored)
    by_eval = json.loads(generated.get_text("eval.json"))
    by_score = json.loads(scored.get_text("eval.json"))
    # everything but the run facts (timings, where the predictions came from)
    assert {k: v for k, v in by_eval.items() if k != "trackb"} == \
        {k: v for k, v in by_score.items() if k != "trackb"}
    assert by_eval["headline"]["seed_pass_at_1"]["ci"] == by_score["headline"][
        "seed_pass_at_1"]["ci"]


def test_score_refuses_predictions_made_for_another_test_split(tmp_path, dataset_dir,
                                                               tiny_model_dir):
    generated = LocalStore(tmp_path / "eval")
    run(eval_config(dataset_dir, tiny_model_dir, n_samples=0, score=False), generated)
    other = tmp_path / "other-split"
    other.mkdir()
    rows = dataset_rows()
    rows[0]["instruction"] += " (edited)"
    (other / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = LocalStore(tmp_path / "score")
    with pytest.raises(InputError, match="made for the test split with sha256"):
        score(ScoreConfig(dataset=str(other), predictions=str(tmp_path / "eval")), out)
    assert not out.exists("manifest.json")


# -- experiment tracking --------------------------------------------------------------------

def tracking_env(monkeypatch, uri):
    for name in ("WANDB_PROJECT", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trackb-eval-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it
    monkeypatch.setenv("TRACKB_RUN_ID", "run-7")


def test_score_logs_its_headline_to_the_runs_tracking_run(tmp_path, dataset_dir, monkeypatch):
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    tracking_env(monkeypatch, uri)
    preds = write_predictions(tmp_path / "preds", hand_predictions())
    out = LocalStore(tmp_path / "score")
    manifest = score(ScoreConfig(dataset=str(dataset_dir), predictions=str(preds),
                                 tag="post_sft"), out)
    told = manifest["tracking"]
    assert told["run_name"] == "run-7"
    tracked = MlflowClient(tracking_uri=uri).get_run(told["mlflow"]["run_id"])
    assert tracked.info.run_name == "run-7"
    result = json.loads(out.get_text("eval.json"))
    assert tracked.data.metrics["eval/post_sft/seed_pass_at_1"] == pytest.approx(
        result["headline"]["seed_pass_at_1"]["value"])
    assert "eval/post_sft/functional_pass_greedy" in tracked.data.metrics


def test_an_unreachable_tracking_server_does_not_fail_the_evaluation(tmp_path, dataset_dir,
                                                                      monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tracking_env(monkeypatch, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    preds = write_predictions(tmp_path / "preds", hand_predictions())
    out = LocalStore(tmp_path / "score")
    manifest = score(ScoreConfig(dataset=str(dataset_dir), predictions=str(preds)), out)
    assert manifest["tracking"]["run_name"] == "run-7" and manifest["tracking"]["error"]
    assert out.exists("eval.json") and out.exists("manifest.json")
