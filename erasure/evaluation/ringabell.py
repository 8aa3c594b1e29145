"""Ring-A-Bell (Tsai et al., ICLR 2024): a model-agnostic prompt search for ``erasure audit attack``.

Ring-A-Bell needs only a text encoder and its tokenizer, never the erased UNet:

1. **Concept vector.** The mean, over prompt pairs that differ only by the concept
   ("a nude woman on a beach" / "a clothed woman on a beach"), of the difference of their
   text-encoder embeddings (the full ``[tokens, dim]`` output). Computed once per audit
   folder and saved as ``OUT/ringabell/concept_vector.safetensors``.
2. **Target.** For every prompt: ``embedding(prompt) + eta * concept vector``.
3. **Search.** A genetic algorithm over K real token ids ``[start, K tokens, end, padding]``
   minimises the squared distance between the candidate's embedding and the target. The
   decoded K tokens are the adversarial prompt (they replace the prompt; they are not
   prepended to it).

The search depends on the prompt, the encoder and the settings only, so one search serves
every erased model: it is cached per prompt in ``OUT/ringabell/search/000000.json`` and
reused by the next model (and by a rerun).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, read_json, read_metadata, save_tensors, write_json

REFERENCE = "chiayi-hsu/Ring-A-Bell: Get_Concept_Vector.ipynb, InversePrompt.ipynb"
# Our own nudity prompt pairs (see prompts/README.md); the reference's are not copied.
NUDITY_PAIRS = Path(__file__).resolve().parents[2] / "prompts" / "ringabell_nudity_pairs.csv"


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The ``(with, without)`` prompt pairs of a CSV with columns ``with`` and ``without``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ErasureError(f"--concept-pairs '{path}' does not exist; give a CSV with columns with,without (one prompt pair a row).")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"with", "without"} <= set(reader.fieldnames):
            raise ErasureError(f"'{path}' needs the columns with,without (got {', '.join(reader.fieldnames or []) or 'none'}).")
        pairs = []
        for line, row in enumerate(reader, 2):
            a, b = (row.get("with") or "").strip(), (row.get("without") or "").strip()
            if not a or not b:
                raise ErasureError(f"'{path}' line {line}: both prompts of a pair must be given.")
            pairs.append((a, b))
    if not pairs:
        raise ErasureError(f"'{path}' holds no prompt pairs; the concept vector needs at least one.")
    return pairs


def load_text_encoder(model: str, device: torch.device | str = "cpu") -> tuple[Any, torch.nn.Module]:
    """The tokenizer and (fp32, frozen) text encoder of a Stable Diffusion 1.x/2.x pipeline, without its UNet or VAE."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from erasure.sd.model import pipeline_class_name, pipeline_folder, quiet_loading

    if pipeline_class_name(model) != "StableDiffusionPipeline":
        raise ErasureError(f"Ring-A-Bell searches one text encoder; '{model}' is not a Stable Diffusion 1.x/2.x pipeline.")
    local = pipeline_folder(model)
    source = str(local) if local is not None else model
    quiet_loading()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    except (OSError, ValueError) as e:
        raise ErasureError(f"could not load the text encoder of '{model}': {str(e).splitlines()[0]}") from None
    return tokenizer, encoder.float().to(device).eval().requires_grad_(False)


@torch.no_grad()
def embed(tokenizer: Any, encoder: torch.nn.Module, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Text-encoder output ``[n, model_max_length, dim]`` of prompts padded to the full length (as SD conditions on them)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(
            prompts[start : start + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(encoder(ids.to(encoder.device))[0].float())
    return torch.cat(out)


def concept_vector(tokenizer: Any, encoder: torch.nn.Module, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Mean over the pairs of embedding(with concept) - embedding(without): ``[model_max_length, dim]``."""
    return (embed(tokenizer, encoder, [a for a, _ in pairs]) - embed(tokenizer, encoder, [b for _, b in pairs])).mean(0)


@torch.no_grad()
def distances(encoder: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The fitness of every candidate row of ``ids``: squared L2 distance of its embedding to ``target`` (lower is better)."""
    out = []
    for start in range(0, len(ids), batch_size):
        emb = encoder(ids[start : start + batch_size].to(encoder.device))[0].float()
        out.append(((emb - target) ** 2).sum((1, 2)))
    return torch.cat(out).cpu()


def candidate_rows(tokenizer: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``[start, K tokens, end, padding...]`` rows of ``model_max_length`` ids for a ``[n, K]`` token tensor."""
    n, k = tokens.shape
    rest = tokenizer.model_max_length - 2 - k
    if rest < 0:
        raise ErasureError(
            f"--k {k} does not fit the text encoder's {tokenizer.model_max_length} tokens; "
            f"use --k {tokenizer.model_max_length - 2} or less."
        )
    start = torch.full((n, 1), tokenizer.bos_token_id)
    end = torch.full((n, 1), tokenizer.eos_token_id)
    pad = torch.full((n, rest), tokenizer.pad_token_id)
    return torch.cat([start, tokens, end, pad], 1)


def genetic_search(
    tokenizer: Any,
    encoder: torch.nn.Module,
    target: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    population: int = 200,
    generations: int = 3000,
    mutation_rate: float = 0.25,
    crossover_rate: float = 0.5,
    seed: int = 0,
    history_points: int = 50,
) -> dict[str, Any]:
    """The reference's genetic algorithm: K token ids whose embedding is closest to ``target``.

    Each generation scores every member, keeps the better half as parents; unless it is the
    last generation, each parent stays and with probability ``crossover_rate`` mates with a
    random parent (one cut point, two children), then each member, parents included, has
    with probability ``mutation_rate`` one random position set to a random candidate token.
    The result is the best member of the last generation (the reference has no elitism, so
    the best may be mutated away in between; ``fitness_best_seen`` records the best ever).
    """
    g = torch.Generator().manual_seed(seed)
    candidates = candidates.cpu()
    target = target.to(encoder.device, torch.float32)

    def random_tokens(*shape: int) -> torch.Tensor:
        return candidates[torch.randint(len(candidates), shape, generator=g)]

    members = random_tokens(population, k)
    every = max(1, generations // history_points)
    history: list[list[float]] = []
    start = best_seen = None
    for step in range(generations):
        score = distances(encoder, candidate_rows(tokenizer, members), target)
        order = score.argsort(stable=True)
        best = score[order[0]].item()
        start = best if start is None else start
        best_seen = best if best_seen is None else min(best_seen, best)
        if step % every == 0 or step == generations - 1:
            history.append([step, best])
        parents = members[order[: max(1, population // 2)]]
        if step == generations - 1:
            members = parents
            break
        children = [parents]
        mate = torch.rand(len(parents), generator=g) < crossover_rate
        for i in mate.nonzero().flatten().tolist():
            j = torch.randint(len(parents), (1,), generator=g).item()
            cut = torch.randint(k, (1,), generator=g).item()  # the reference's cut 1..K counts the start token
            a, b = parents[i], parents[j]
            children.append(torch.stack([torch.cat([a[:cut], b[cut:]]), torch.cat([b[:cut], a[cut:]])]))
        members = torch.cat(children)
        hit = (torch.rand(len(members), generator=g) < mutation_rate).nonzero().flatten()
        members[hit, torch.randint(k, (len(hit),), generator=g)] = random_tokens(len(hit))
    ids = members[0].tolist()
    text = tokenizer.decode(ids).strip()
    return {
        "adversarial_prompt": text,
        "adversarial_ids": ids,
        "adversarial_tokens": tokenizer.convert_ids_to_tokens(ids),
        "retokenises": tokenizer(text, add_special_tokens=False).input_ids == ids,
        "generations": generations,
        "fitness_start": start,
        "fitness": best,
        "fitness_best_seen": best_seen,
        "fitness_history": history,
    }


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class RingABell:
    """Concept vector and per-prompt searches of one audit folder, computed on demand and cached on disk.

    The encoder (``model``'s tokenizer and text encoder) is loaded only when something must
    be computed, so a finished audit reruns without loading any model.
    """

    def __init__(self, model: str, pairs_file: str | Path, folder: Path, settings: Any, device: torch.device | str = "cpu") -> None:
        self.model, self.pairs_file, self.folder, self.settings, self.device = model, Path(pairs_file), folder, settings, device
        self.pairs = read_pairs(pairs_file)
        self.pairs_sha256 = hashlib.sha256(self.pairs_file.read_bytes()).hexdigest()[:16]
        self._encoder: tuple[Any, torch.nn.Module] | None = None
        self._vector: torch.Tensor | None = None
        self.vector_sha256 = ""

    def encoder(self) -> tuple[Any, torch.nn.Module]:
        """The tokenizer and text encoder, loaded once."""
        if self._encoder is None:
            self._encoder = load_text_encoder(self.model, self.device)
        return self._encoder

    def vector(self) -> torch.Tensor:
        """The concept vector: read from the folder when it was made from the same pairs and encoder, else computed and saved."""
        if self._vector is not None:
            return self._vector
        from erasure.evaluation.audit import model_fingerprint

        path = self.folder / "concept_vector.safetensors"
        fingerprint = model_fingerprint(self.model)[0]
        meta = {"pairs_sha256": self.pairs_sha256, "encoder": self.model, "encoder_fingerprint": fingerprint}
        if path.is_file() and all(read_metadata(path).get(k) == v for k, v in meta.items()):
            self._vector = load_tensors(path)["concept_vector"]
        else:
            tokenizer, encoder = self.encoder()
            self._vector = concept_vector(tokenizer, encoder, self.pairs).cpu().contiguous()
            save_tensors(
                path, {"concept_vector": self._vector}, {**meta, "pairs": str(len(self.pairs)), "pairs_file": str(self.pairs_file)}
            )
        self.vector_sha256 = hashlib.sha256(self._vector.numpy().tobytes()).hexdigest()[:16]
        return self._vector

    def search(self, index: int, prompt: str) -> dict[str, Any]:
        """Ring-A-Bell's adversarial prompt for ``prompt``: the cached search when its inputs match, else a new one."""
        s = self.settings
        vector = self.vector()
        key = _digest(
            {
                "prompt": prompt,
                "concept_vector": self.vector_sha256,
                "k": s.k,
                "eta": s.eta,
                "population": s.population,
                "generations": s.generations,
                "mutation_rate": s.mutation_rate,
                "crossover_rate": s.crossover_rate,
                "vocabulary": s.vocabulary,
                "seed": s.attack_seed,
            }
        )
        path = self.folder / "search" / f"{index:06d}.json"
        if path.is_file() and (cached := read_json(path)).get("key") == key:
            return cached
        from erasure.evaluation.attack import candidate_tokens

        tokenizer, encoder = self.encoder()
        target = embed(tokenizer, encoder, [prompt])[0] + s.eta * vector.to(encoder.device)
        found = genetic_search(
            tokenizer,
            encoder,
            target,
            candidate_tokens(tokenizer, s.vocabulary),
            s.k,
            s.population,
            s.generations,
            s.mutation_rate,
            s.crossover_rate,
            s.attack_seed,
        )
        found = {"key": key, "prompt": prompt, **found}
        write_json(path, found)
        return found
