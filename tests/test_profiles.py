"""Speculation profiles: the cost tables and priors that decide draft lengths come from one object,
measured per model and device and saved where ``Speculative`` finds them; a saved profile, not a
per-run measurement, decides, so seeded outputs stay reproducible."""

from __future__ import annotations

import json

import pytest

from decodekit import LLM, Speculative
from decodekit.backends.mock import MockBackend
from decodekit.backends.timing import measure_profile
from decodekit.cli import main
from decodekit.profiles import (
    CPU_PROFILE,
    CUDA_PROFILE,
    SpeculationProfile,
    load_profile,
    profile_for,
    profile_path,
)


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEKIT_PROFILES", str(tmp_path))
    return tmp_path


def test_defaults_by_device(profiles):
    backend = MockBackend(vocab_size=16, seed=0)
    assert profile_for(backend) is CPU_PROFILE
    backend.device = "cuda"
    assert profile_for(backend) is CUDA_PROFILE
    assert max(CUDA_PROFILE.verify_cost) < 1.2 < max(CPU_PROFILE.verify_cost)


def test_measured_profile_is_a_valid_table_and_round_trips(profiles):
    backend = MockBackend(vocab_size=16, seed=0, cache_tokens=4096)
    rounds = []
    profile = measure_profile(backend, context=32, reps=2, progress=rounds.append)
    assert len(rounds) == 3 and backend.cache.num_open_handles == 0
    assert profile.verify_cost[0] == 1.0 and len(profile.verify_cost) == 17
    assert all(b >= a for a, b in zip(profile.verify_cost, profile.verify_cost[1:]))
    assert len(profile.width_cost) == 32 and min(profile.width_cost) >= 0
    path = profile.save(profile_path(backend.name, "cpu"))
    loaded = profile_for(backend)
    assert loaded.source == str(path)
    assert (loaded.verify_cost, loaded.width_cost, loaded.ngram_acceptance) == \
           (profile.verify_cost, profile.width_cost, profile.ngram_acceptance)


@pytest.mark.parametrize("bad", [{"verify_cost": [1.0, 0.5]}, {"verify_cost": [2.0, 3.0]},
                                 {"verify_cost": [1.0], "width_cost": [-1]}, {"colour": 1}])
def test_bad_profiles_are_refused(tmp_path, bad):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"verify_cost": [1.0, 1.1], "width_cost": [0.1], **bad}))
    with pytest.raises(ValueError):
        load_profile(path)
    with pytest.raises(ValueError, match="no speculation profile"):
        Speculative(profile=tmp_path / "missing.json")


def _drafted(llm, profile, temperature=0.0) -> tuple[int, tuple]:
    out = llm.generate("abcabcabcabcabcab", strategy=Speculative(draft="ngram", profile=profile),
                       max_new_tokens=40, temperature=temperature, seed=3)
    return out.stats.extra["tokens_drafted"], out.token_ids


def test_the_profile_decides_draft_lengths_and_outputs_stay_exact(profiles):
    llm = LLM(backend=MockBackend(vocab_size=16, seed=3, cache_tokens=8192))
    cheap = SpeculationProfile(verify_cost=(1.0,) * 17, width_cost=(0.0,) * 32, match_caps=(), source="cheap")
    dear = SpeculationProfile(verify_cost=tuple(1.0 + m for m in range(17)), width_cost=(1.0,) * 32, source="dear")
    many, greedy_a = _drafted(llm, cheap)
    few, greedy_b = _drafted(llm, dear)
    assert many > few
    assert greedy_a == greedy_b == llm.generate("abcabcabcabcabcab", max_new_tokens=40, temperature=0).token_ids
    cheap.save(profile_path(llm.backend.name, "cpu"))  # saved: the default from now on
    assert _drafted(llm, None) == (many, greedy_a)
    assert _drafted(llm, None, 0.8) == _drafted(llm, None, 0.8)  # seeded: reproducible under a saved profile


def test_profile_command_saves_where_speculative_reads(profiles, monkeypatch, capsys):
    import decodekit.models

    monkeypatch.setattr(decodekit.models, "load_backend",
                        lambda name, **kw: MockBackend(vocab_size=16, seed=0, cache_tokens=4096, name=name))
    assert main(["profile", "--model", "mock-model", "--context", "16", "--reps", "1"]) == 0
    saved = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["saved"]
    assert saved == str(profile_path("mock-model", "cpu"))
    assert profile_for(MockBackend(vocab_size=16, seed=0, name="mock-model")).source == saved
