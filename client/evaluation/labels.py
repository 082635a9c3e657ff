"""Match a data set's label names to the model's.

A label matches case-insensitively in any form the model uses: `生气/angry`, `angry` or
`生气`. `--map anger=angry,joy=happy` renames other names first. Results use the short
(English) form, as `e2v classify` does. `unuse*` and `<unk>` are never answers, so they
are not targets either.
"""

from __future__ import annotations

from e2v.client.results import answer_forms, short_label

from e2v.contract import is_answer_label


class LabelError(ValueError):
    """A bad `--map` (syntax or an unknown target)."""


def parse_map(text: str | None) -> dict[str, str]:
    """`anger=angry,Joy=happy` -> {"anger": "angry", "joy": "happy"} (sources lower-cased)."""
    mapping: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        source, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not source or not target:
            raise LabelError(f"bad --map item {item.strip()!r}: expected SRC=DST")
        mapping[source.lower()] = target
    return mapping


class LabelMatcher:
    """Dataset label -> the model's short label, or None when the model lacks it."""

    def __init__(self, model_labels: list[str], mapping: dict[str, str] | None = None):
        self.labels = [short_label(label) for label in model_labels if is_answer_label(label)]
        self._forms = answer_forms(model_labels)
        self._map: dict[str, str] = {}
        for source, target in (mapping or {}).items():
            resolved = self._forms.get(target.lower())
            if resolved is None:
                raise LabelError(
                    f"unknown --map target {target!r} (in {source}={target}): the model's "
                    f"labels are {', '.join(self.labels) or 'none'}"
                )
            self._map[source.lower()] = resolved

    def __call__(self, label: str) -> str | None:
        key = label.strip().lower()
        return self._map.get(key) or self._forms.get(key)
