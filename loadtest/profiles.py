"""Workload profiles: which clip lengths a load test sends, stored as JSON data files.

A profile is a weighted list of length ranges (`loadtest/profiles/<name>.json`); clip
lengths are drawn from it once, with a fixed seed, so every run sends the same audio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e2v.contract import MAX_SEGMENT_S, MIN_SAMPLES, SAMPLE_RATE

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    """A profile that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class LengthRange:
    min_s: float
    max_s: float
    weight: float


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    lengths: tuple[LengthRange, ...]
    clips: int  # distinct clips prepared (users cycle through them)
    seed: int

    @property
    def mean_s(self) -> float:
        """Expected clip length in seconds."""
        total = sum(r.weight for r in self.lengths)
        return sum(r.weight * (r.min_s + r.max_s) / 2 for r in self.lengths) / total


def available_profiles() -> list[str]:
    """Names of the profiles shipped in `loadtest/profiles/`."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name, or any profile JSON file by path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ProfileError(
            f"unknown profile '{name_or_path}'; choose one of {', '.join(available_profiles())} "
            "or pass a JSON file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        profile = Profile(
            name=data["name"],
            description=data.get("description", ""),
            lengths=tuple(LengthRange(**r) for r in data["lengths"]),
            clips=int(data.get("clips", 32)),
            seed=int(data.get("seed", 0)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ProfileError(f"invalid profile {path}: {exc}") from exc
    _validate(profile, path)
    return profile


def _validate(profile: Profile, path: Path) -> None:
    shortest = MIN_SAMPLES / SAMPLE_RATE
    for r in profile.lengths:
        if not shortest <= r.min_s <= r.max_s <= MAX_SEGMENT_S or r.weight < 0:
            raise ProfileError(
                f"invalid profile {path}: range {r.min_s}-{r.max_s} s (weight {r.weight}) must "
                f"lie within {shortest:g}-{MAX_SEGMENT_S:g} s with a weight >= 0"
            )
    if not profile.lengths or sum(r.weight for r in profile.lengths) <= 0 or profile.clips < 1:
        raise ProfileError(f"invalid profile {path}: needs lengths with weights and clips >= 1")


def clip_lengths(profile: Profile, count: int | None = None) -> np.ndarray:
    """`count` clip lengths in samples drawn from the profile (deterministic per seed)."""
    rng = np.random.default_rng(profile.seed)
    weights = np.array([r.weight for r in profile.lengths], dtype=np.float64)
    picks = rng.choice(len(weights), size=count or profile.clips, p=weights / weights.sum())
    seconds = [rng.uniform(profile.lengths[i].min_s, profile.lengths[i].max_s) for i in picks]
    return np.maximum(np.round(np.array(seconds) * SAMPLE_RATE), MIN_SAMPLES).astype(np.int64)
