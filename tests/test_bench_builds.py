"""A fresh machine's benchmark run builds the artefacts it needs (student model, draft head) instead of failing."""

from __future__ import annotations

import argparse
import json

import pytest

from decodekit.training import distill, draft_head


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    return tmp_path


def _fake_student_build(calls):
    def build(teacher, cfg, directory, show_progress=True):
        calls.append((teacher, cfg, directory))
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
        return {}
    return build


@pytest.mark.parametrize("quick", [True, False])
def test_entropy_section_builds_a_missing_student(empty_cache, monkeypatch, quick):
    from bench import entropy_switch

    calls, loaded = [], []
    monkeypatch.setattr(distill, "build_student", _fake_student_build(calls))
    monkeypatch.setattr(entropy_switch, "load_backend", lambda name, **kw: loaded.append(name) or name)
    args = argparse.Namespace(small="smollm2-135m-distill-8l", quick=quick, model="smollm2-135m", device="cpu")
    large, small, info = entropy_switch.load_pair(args)
    assert len(calls) == 1 and calls[0][0] == "smollm2-135m" and calls[0][1].layers == 8
    assert info["built_now"] and info["quick_stand_in"] == quick
    if quick:  # the stand-in has its own name and a small recipe; the real student's place stays free
        assert calls[0][1] == distill.replace(distill.QUICK_CONFIG, layers=8)
        assert small.endswith("smollm2-135m-distill-8l-quick")
        assert not (empty_cache / "distill" / "smollm2-135m-distill-8l").exists()
    else:
        assert calls[0][1] == distill.DistillConfig()
        assert small == str(empty_cache / "distill" / "smollm2-135m-distill-8l")
    entropy_switch.load_pair(args)  # built once, then reused
    assert len(calls) == 1


def test_built_student_is_used_as_is(empty_cache, monkeypatch):
    (empty_cache / "distill" / "smollm2-135m-distill-8l").mkdir(parents=True)
    (empty_cache / "distill" / "smollm2-135m-distill-8l" / "config.json").write_text("{}")
    monkeypatch.setattr(distill, "build_student", lambda *a, **k: pytest.fail("must not rebuild"))
    assert distill.ensure_student("smollm2-135m-distill-8l", quick=True)[0] == "smollm2-135m-distill-8l"
    assert distill.ensure_student("some/hub-model")[0] == "some/hub-model"


def test_speculative_section_builds_a_missing_draft_head(empty_cache, monkeypatch):
    calls = []

    def fake_train(args, prompts=None):
        calls.append((args, prompts))
        out = draft_head.Path(args.out)
        out.mkdir(parents=True)
        (out / "head.safetensors").write_bytes(b"")
        (out / "recipe.json").write_text(json.dumps({"shape": {}}))
        return out

    monkeypatch.setattr(draft_head, "train", fake_train)
    monkeypatch.setattr(draft_head, "default_prompts", lambda num_gsm8k=600: [f"q{i}" for i in range(100)])
    path, info = draft_head.ensure_head("smollm2-135m", device="cpu", log=lambda m: None)
    assert len(calls) == 1 and info["quick_stand_in"] and info["built_now"]
    assert path == empty_cache / "draft_heads" / "smollm2-135m-quick"
    assert calls[0][0].max_seconds == draft_head.QUICK_HEAD["max_seconds"]
    assert len(calls[0][1]) == draft_head.QUICK_HEAD["prompts"]
    assert draft_head.ensure_head("smollm2-135m", log=lambda m: None)[1]["built_now"] is False  # reused
    assert len(calls) == 1


def test_speculative_bench_asks_for_the_head_builder():
    import inspect

    from bench import speculative

    assert "ensure_head(" in inspect.getsource(speculative.main)
