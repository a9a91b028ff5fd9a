"""Prompt log-probabilities on the server: echo + logprobs, max_tokens 0, prompt_logprobs, /tokenize,
checked against SmolLM2's own no-cache forward, and lm-eval's ``local-completions`` model on a local task."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch
from server_fixtures import MODEL, openai_server

pytestmark = pytest.mark.real

TEXT = "The capital of France is Paris, and the capital of Italy is Rome."


srv, client = openai_server()


def forward_logprobs(backend, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-probabilities of transformers' own forward in float32, no decodekit cache."""
    model = backend.model
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_echo_logprobs_equal_a_no_cache_forward(srv, client):
    ids = srv.backend.tokenizer.encode(TEXT)
    r = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=2, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert r.choices[0].text.startswith(TEXT)
    ref = forward_logprobs(srv.backend, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)
        assert len(lp.top_logprobs[i]) == 2
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-3)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # max_tokens 0 with echo: the same scores, nothing generated
    s = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=2, max_tokens=0)
    assert s.choices[0].text == TEXT and s.usage.completion_tokens == 0
    assert s.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    # streamed: the echo chunk carries the prompt's logprobs
    chunks = list(client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=2, max_tokens=1,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]


def test_vllm_prompt_logprobs_tokenize_and_detokenize(srv):
    ids = srv.backend.tokenizer.encode(TEXT)
    body = {"model": MODEL, "prompt": ids, "max_tokens": 0, "prompt_logprobs": 1}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=600).json()
    plp = r["choices"][0]["prompt_logprobs"]
    ref = forward_logprobs(srv.backend, ids)
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        entry = plp[i][str(ids[i])]
        assert entry["logprob"] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)
        assert entry["rank"] == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
    t = httpx.post(f"{srv.url}/tokenize", json={"model": MODEL, "prompt": TEXT}).json()
    assert t["tokens"] == ids and t["count"] == len(ids) and t["max_model_len"] > 0
    assert httpx.post(f"{srv.url}/detokenize", json={"tokens": ids}).json() == {"prompt": TEXT}
    info = httpx.get(f"{srv.url}/tokenizer_info").json()
    assert info["eos_token"] and info["chat_template"]
    bad = [({"model": MODEL, "prompt": TEXT, "max_tokens": 0}, "max_tokens"),
           ({"model": MODEL, "prompt": TEXT, "prompt_logprobs": 50}, "prompt_logprobs")]
    for body, param in bad:
        r = httpx.post(f"{srv.url}/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert httpx.post(f"{srv.url}/detokenize", json={"tokens": [-1]}).status_code == 400
    assert srv.backend.cache.num_open_handles == 0


QUESTIONS = [("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
             ("Two plus two equals", [" five", " four", " seven"], 1),
             ("The sun rises in the", [" west", " north", " east"], 2),
             ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Fahrenheit"], 0),
             ("The largest planet in the solar system is", [" Mars", " Jupiter", " Venus"], 1)]


def test_lm_eval_local_completions_loglikelihoods(srv, tmp_path):
    """lm-eval 0.4.13's ``local-completions`` (echo + logprobs, the server's remote tokenizer) on a local
    multiple-choice task: every log-likelihood equals transformers' summed token log-probabilities."""
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "dk_mc.yaml").write_text(
        "task: dk_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ndoc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n")
    results = local_completions(srv, tmp_path, "dk_mc")
    hf = srv.backend.tokenizer.hf
    num = 0
    for sample in results["samples"]["dk_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            whole = hf(context + continuation, add_special_tokens=False).input_ids
            ctx = hf(context, add_special_tokens=False).input_ids
            ref = forward_logprobs(srv.backend, whole)
            want = sum(float(ref[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            got = resp[0][0]
            assert math.isfinite(got) and got < 0
            assert abs(got - want) < 1e-3, (context, continuation, got, want)
            num += 1
    assert num == sum(len(c) for _, c, _ in QUESTIONS)
    print("lm-eval acc", results["results"]["dk_mc"]["acc,none"])


OPEN = ["Q: What is the capital of France?\nA:", "Q: What colour is the sky on a clear day?\nA:",
        "Complete the list: apples, pears,", "Q: How many legs does a spider have?\nA:",
        "The first month of the year is"]
UNTIL = ["\n", "."]


def _greedy_reference(backend, context: str, max_new: int) -> tuple[str, str]:
    """(transformers' own float32 greedy continuation of ``context``, no decodekit cache, cut at the first
    stop sequence; the same uncut), as lm-eval's ``hf`` model generates it."""
    hf = backend.tokenizer.hf
    ids = torch.tensor([hf(context, add_special_tokens=False).input_ids], device=backend.model.device)
    with torch.no_grad():
        out = backend.model.generate(ids, max_new_tokens=max_new, do_sample=False, attention_mask=torch.ones_like(ids),
                                     pad_token_id=hf.eos_token_id)
    text = hf.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    cut = min([i for i in (text.find(u) for u in UNTIL) if i >= 0], default=len(text))
    return text[:cut], text


def test_lm_eval_local_completions_generate_until(srv, tmp_path):
    """lm-eval 0.4.13's ``local-completions`` generate-until (greedy, stop sequences, ``max_gen_toks``) on a
    local task: every answer equals transformers' own greedy continuation cut at the first stop sequence,
    and the stop sequences cut some of them (the server applied them, not only the token limit)."""
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")

    max_new = 16
    data = tmp_path / "open.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": ""}) + "\n" for q in OPEN))
    (tmp_path / "dk_gen.yaml").write_text(
        "task: dk_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: " + json.dumps(UNTIL) + f"\n  max_gen_toks: {max_new}\n  do_sample: false\n"
        "  temperature: 0.0\nmetric_list:\n  - metric: exact_match\n")
    results = local_completions(srv, tmp_path, "dk_gen")
    samples = results["samples"]["dk_gen"]
    assert len(samples) == len(OPEN)
    cut_by_stop = 0
    for sample in samples:
        context = sample["arguments"][0][0]
        got = sample["resps"][0][0]
        want, uncut = _greedy_reference(srv.backend, context, max_new)
        assert got == want, (context, got, want)
        assert not any(u in got for u in UNTIL)
        cut_by_stop += want != uncut
        print("generate_until", repr(context), "->", repr(got))
    assert cut_by_stop >= 2, "the task must exercise the stop sequences"
    assert srv.backend.cache.num_open_handles == 0


def test_penalties_and_logit_bias_through_the_client(srv, client):
    """Penalties reach the sampler (same text as the Python API), speculative greedy equals plain greedy
    with them, and a strategy that cannot honour them is a 400 naming the field."""
    kwargs = dict(model=MODEL, prompt="The list of colors: red, blue, red, blue,", max_tokens=12, temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    penalized = client.completions.create(**kwargs, presence_penalty=1.5, frequency_penalty=1.0,
                                          extra_body={"repetition_penalty": 1.3}).choices[0].text
    assert penalized != plain
    fast = client.completions.create(**kwargs, presence_penalty=1.5, frequency_penalty=1.0,
                                     extra_body={"repetition_penalty": 1.3,
                                                 "decodekit": {"strategy": "speculative", "draft": "ngram"}})
    assert fast.choices[0].text == penalized
    token = srv.backend.tokenizer.encode(" banana")[0]
    biased = client.completions.create(**{**kwargs, "max_tokens": 1}, logit_bias={str(token): 100})
    assert biased.choices[0].text == srv.backend.tokenizer.decode([token])
    for extra, param in [({"presence_penalty": 1.0, "extra_body": {"decodekit": {"strategy": "best_of"}}},
                          "presence_penalty"), ({"logit_bias": {"99999999": 1}}, "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**kwargs, **extra})
        assert e.value.body["param"] == param


def local_completions(srv, tmp_path, task: str) -> dict:
    """lm-eval's ``local-completions`` client on the server, running ``task`` from ``tmp_path``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="local-completions", tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"model={MODEL},base_url={srv.url}/v1/completions,num_concurrent=1,max_retries=1,"
                   "tokenizer_backend=remote,tokenized_requests=True",
        log_samples=True, limit=None)
