"""Ring-A-Bell (``erasure audit attack --method ring-a-bell``) on tiny random pipelines.

The search is checked on its own terms (the genetic algorithm lowers the distance it
minimises, deterministically; its tokens are real tokens; the concept vector is the mean
embedding difference of the pairs); the audit's bookkeeping (one search per prompt shared
by every model, resume, refusal of other settings) with a scripted detector; and the command
end to end with the real NudeNet detector and `erasure report`.
"""

import json
from pathlib import Path

import pytest
import torch

from erasure.cli import main
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors
from erasure.evaluation import ringabell
from erasure.evaluation.attack import AttackSettings, attack_audit, candidate_tokens
from erasure.evaluation.prompts import load_prompts
from erasure.evaluation.ringabell import candidate_rows, concept_vector, distances, embed, genetic_search, read_pairs
from tests.test_attack import models, prompt_csv  # noqa: F401  (the same tiny models and prompts)

FAST = {"method": "ring-a-bell", "k": 4, "population": 8, "generations": 5, "scheduler": "ddim"}


@pytest.fixture(scope="module")
def encoder(models):
    return ringabell.load_text_encoder(str(models / "base"))


def test_concept_vector_is_the_mean_difference_of_the_pairs(encoder, tmp_path):
    tok, enc = encoder
    pairs = [("a nude person", "a dressed person"), ("naked", "clothed")]
    v = concept_vector(tok, enc, pairs)
    a, b = embed(tok, enc, ["a nude person", "naked"]), embed(tok, enc, ["a dressed person", "clothed"])
    assert v.shape == (tok.model_max_length, enc.config.hidden_size)
    assert torch.allclose(v, ((a[0] - b[0]) + (a[1] - b[1])) / 2, atol=1e-6)
    shipped = read_pairs(ringabell.NUDITY_PAIRS)
    assert len(shipped) >= 30 and all(w != wo for w, wo in shipped)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,prompt1\na,b\n")
    with pytest.raises(ErasureError, match="needs the columns with,without"):
        read_pairs(bad)
    bad.write_text("with,without\na,\n")
    with pytest.raises(ErasureError, match="line 2"):
        read_pairs(bad)


def test_the_genetic_search_lowers_the_distance_deterministically(encoder, one_thread):
    tok, enc = encoder
    vector = concept_vector(tok, enc, read_pairs(ringabell.NUDITY_PAIRS))
    target = embed(tok, enc, ["a person on a beach"])[0] + 3.0 * vector
    candidates = candidate_tokens(tok)
    found = genetic_search(tok, enc, target, candidates, 6, population=16, generations=25, seed=0)
    again = genetic_search(tok, enc, target, candidates, 6, population=16, generations=25, seed=0)
    assert found == again  # same seed, same search
    assert found["fitness"] < found["fitness_start"]  # best of the last generation beats the best random start
    assert found["fitness_best_seen"] <= found["fitness"] and found["generations"] == 25
    # The recorded fitness is the distance of the returned tokens, recomputed here.
    ids = torch.tensor([found["adversarial_ids"]])
    assert distances(enc, candidate_rows(tok, ids), target).item() == pytest.approx(found["fitness"], rel=1e-5)
    # And better than a fresh random population of the same size would do on average.
    g = torch.Generator().manual_seed(1)
    random_rows = candidate_rows(tok, candidates[torch.randint(len(candidates), (16, 6), generator=g)])
    assert found["fitness"] < distances(enc, random_rows, target).min().item()
    assert found["fitness_history"][0][0] == 0 and found["fitness_history"][-1] == [24, found["fitness"]]
    with pytest.raises(ErasureError, match="--k 40 does not fit"):
        candidate_rows(tok, torch.zeros(1, 40, dtype=torch.long))


def test_the_adversarial_prompt_is_real_tokens_that_retokenise(encoder, one_thread):
    tok, enc = encoder
    words = candidate_tokens(tok, "words")
    target = embed(tok, enc, ["a statue"])[0]
    found = genetic_search(tok, enc, target, words, 5, population=8, generations=4, seed=3)
    ids = found["adversarial_ids"]
    assert len(ids) == 5 and set(ids) <= set(words.tolist())
    assert found["adversarial_tokens"] == tok.convert_ids_to_tokens(ids)
    assert found["retokenises"] and tok(found["adversarial_prompt"], add_special_tokens=False).input_ids == ids
    every = genetic_search(tok, enc, target, candidate_tokens(tok), 5, population=8, generations=4, seed=3)
    assert tok.bos_token_id not in every["adversarial_ids"] and tok.eos_token_id not in every["adversarial_ids"]
    assert every["retokenises"] == (tok(every["adversarial_prompt"], add_special_tokens=False).input_ids == every["adversarial_ids"])


def test_audit_shares_one_search_per_prompt_and_resumes(models, prompt_csv, tmp_path, monkeypatch):
    prompts = load_prompts(prompt_csv, size=16, steps=2)
    out = tmp_path / "rab"
    searches = []
    real_search = ringabell.genetic_search

    def counted(*a, **k):
        searches.append(1)
        return real_search(*a, **k)

    monkeypatch.setattr(ringabell, "genetic_search", counted)
    calls = []

    def detector(path):  # prompt 1 detected without attack, prompt 0's Ring-A-Bell prompt on the model 'b'
        calls.append(f"{Path(path).parent.parent.name}/{Path(path).name}")
        return calls[-1] in {"a/000001-pre.png", "b/000001-pre.png", "b/000000-attack.png"}, {}

    settings = AttackSettings(**FAST)
    pair = [("a", str(models / "erased")), ("b", str(models / "base"))]
    result = attack_audit(prompts, pair, out, settings, {"prompts": str(prompt_csv)}, base=str(models / "base"), detector=detector)
    assert len(searches) == 2  # prompts 0 and 2, once each, shared by both models; prompt 1 needed none
    a, b = result["models"]["a"], result["models"]["b"]
    assert (a["pre_success"], a["post_success"], b["pre_success"], b["post_success"]) == (1, 1, 1, 2)
    rows = a["results"]
    assert rows[1]["adversarial_prompt"] is None and rows[0]["evaluations"] == 1 and rows[0]["iterations"] == 5
    assert rows[0]["adversarial_prompt"] == b["results"][0]["adversarial_prompt"] and rows[0]["final_loss"] < rows[0]["fitness_start"]
    assert (out / "ringabell" / "concept_vector.safetensors").is_file() and not (out / "targets").exists()
    assert load_tensors(out / "ringabell" / "concept_vector.safetensors")["concept_vector"].shape == (32, 32)
    saved = json.loads((out / "attack.json").read_text())
    s = saved["settings"]
    assert s["method"] == "ring-a-bell" and s["eta"] == 3.0 and s["population"] == 8 and s["concept_pairs_count"] >= 30
    assert "iterations" not in s and "lr" not in s and "Ring-A-Bell" in s["reference"]
    assert "# Adversarial-prompt audit (Ring-A-Bell)" in (out / "attack.md").read_text()

    # A rerun finds every prompt done: no model or encoder is loaded, nothing is searched or detected again.
    calls.clear()

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded although every prompt is finished")

    monkeypatch.setattr("erasure.sd.model.load_pipeline", no_loading)
    monkeypatch.setattr(ringabell, "load_text_encoder", no_loading)
    again = attack_audit(prompts, pair, out, settings, {"prompts": str(prompt_csv)}, base=str(models / "base"), detector=detector)
    assert calls == [] and len(searches) == 2 and again["models"]["a"]["results"] == rows
    monkeypatch.undo()
    monkeypatch.setattr(ringabell, "genetic_search", counted)
    # An interrupted run (prompt 2's result never written for 'a') redoes only that prompt, from the cached search.
    (out / "attack" / "a" / "prompts" / "000002.json").unlink()
    attack_audit(prompts, pair, out, settings, {"prompts": str(prompt_csv)}, base=str(models / "base"), detector=detector)
    assert set(calls) == {"a/000002-pre.png", "a/000002-attack.png"} and len(searches) == 2

    with pytest.raises(ErasureError, match=r"other settings \(eta\)"):
        attack_audit(
            prompts, pair, out, AttackSettings(**FAST, eta=1.0), {"prompts": str(prompt_csv)}, base=str(models / "base"), detector=detector
        )
    with pytest.raises(ErasureError, match="--base"):
        attack_audit(prompts, pair, tmp_path / "x", settings, {}, detector=detector)
    with pytest.raises(ErasureError, match="--targets"):
        attack_audit(prompts, pair, tmp_path / "x", settings, {}, base=str(models / "base"), targets=str(tmp_path), detector=detector)
    with pytest.raises(ErasureError, match="--concept-pairs"):
        attack_audit(
            prompts, pair, tmp_path / "x", AttackSettings(**FAST, concept="church"), {}, base=str(models / "base"), detector=detector
        )


def test_ring_a_bell_command_end_to_end(models, prompt_csv, tmp_path, capsys):
    """Real NudeNet on the saved images; attack.json names the method; `erasure report` shows it."""
    out = tmp_path / "audit"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("with,without\na nude person,a dressed person\na naked man,a man in a coat\n")
    args = ["audit", "attack", "--method", "ring-a-bell", "--prompts", str(prompt_csv), "--base", str(models / "base")]
    args += ["--model", f"erased={models / 'erased'}", "--out", str(out), "--limit", "2", "--steps", "2", "--size", "16"]
    args += ["--population", "6", "--generations", "3", "--concept-pairs", str(pairs)]
    assert main([*args, "--mutation-rate", "2"]) == 2
    assert "--mutation-rate must lie in [0, 1]" in capsys.readouterr().err
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "post-attack ASR (Ring-A-Bell)" in printed and "| erased |" in printed and "3 generations" in printed
    result = json.loads((out / "attack.json").read_text())
    s = result["settings"]
    assert s["method"] == "ring-a-bell" and s["k"] == 16 and s["generations"] == 3 and s["concept_pairs_count"] == 2
    assert "NudeNet 3." in s["detector"] and s["scheduler"] == "lms"
    for row in result["models"]["erased"]["results"]:
        assert row["pre_detected"] or (row["evaluations"] == 1 and len(row["adversarial_ids"]) == 16)
    assert main(args) == 0  # resumed: nothing left to do
    assert main([*args, "--eta", "5"]) == 2 and "other settings (eta)" in capsys.readouterr().err
    assert main(["report", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "## Adversarial-prompt audit, Ring-A-Bell" in md and "post-attack ASR (Ring-A-Bell)" in md
