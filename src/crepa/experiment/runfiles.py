"""The variants of an experiment and their run files.

A variant is a name and ``--set`` overrides applied to the user's run file. Each (variant, seed) run
gets a complete run file of its own, ``runs/<variant>-seed<k>/run.toml`` (``crepa train`` reproduces
it), with every relative path of the user's file made absolute, so it can live anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crepa.cache.atomic import atomic_write_bytes
from crepa.config import ConfigError, RunConfig, load_config

# Built-in variants: the overrides that turn any run file into each of them.
VARIANT_OVERRIDES: dict[str, tuple[str, ...]] = {
    "none": ("crepa.enabled=false", "repvideo.enabled=false"),
    "repa": ("crepa.enabled=true", 'crepa.mode="repa"', "crepa.distance=0", "repvideo.enabled=false"),
    "crepa": ("crepa.enabled=true", 'crepa.mode="crepa"', "repvideo.enabled=false"),
    "crepa+repvideo": ("crepa.enabled=true", 'crepa.mode="crepa"', "repvideo.enabled=true"),
}
VARIANT_LABELS: dict[str, str] = {
    "none": "no alignment",
    "repa": "REPA*",
    "crepa": "CREPA",
    "crepa+repvideo": "CREPA + RepVideo",
}


@dataclass(frozen=True)
class Variant:
    """One arm of the experiment: a name, a label for reports, and its overrides of the run file."""

    name: str
    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One (variant, seed) training run."""

    variant: str
    seed: int
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

    @property
    def run_file(self) -> Path:
        return self.directory / "run.toml"


def parse_variants(text: str, sets: Sequence[str] = ()) -> tuple[tuple[Variant, ...], tuple[str, ...]]:
    """``--variants none,repa,crepa,wide=crepa`` and ``--set`` values -> the variants and the overrides
    for every variant. ``NAME=BASE`` defines a variant as a built-in one plus its own overrides;
    ``--set VARIANT.section.key=value`` applies to that variant only, ``--set section.key=value`` to all."""
    variants: list[Variant] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, base = item.partition("=")
        base = base or name
        if base not in VARIANT_OVERRIDES:
            raise ConfigError(
                f"--variants: unknown variant {base!r}; built-in ones are {', '.join(VARIANT_OVERRIDES)} "
                "(define more as NAME=BUILTIN with --set NAME.section.key=value)"
            )
        if any(v.name == name for v in variants):
            raise ConfigError(f"--variants: {name!r} is given twice")
        label = VARIANT_LABELS.get(name, name)
        variants.append(Variant(name, label, VARIANT_OVERRIDES[base]))
    if len(variants) < 2:
        raise ConfigError(f"--variants: an experiment compares two variants or more, got {text!r}")
    names = {v.name for v in variants}
    shared: list[str] = []
    own: dict[str, list[str]] = {v.name: [] for v in variants}
    for value in sets:
        key = value.partition("=")[0]
        head, _, rest = key.partition(".")
        if head in names and "." in rest:
            own[head].append(value[len(head) + 1 :])
        else:
            shared.append(value)
    variants = [Variant(v.name, v.label, (*v.overrides, *own[v.name])) for v in variants]
    return tuple(variants), tuple(shared)


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, number, string, path, (nested) list or inline table of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"no TOML literal for {type(value).__name__}")


def write_run_file(path: Path, sections: Mapping[str, Mapping[str, Any]], comment: str) -> RunConfig:
    """Write ``sections`` ({section: {key: value}}; None values are left out) as a run file at
    ``path`` and load it back (which validates it)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    for section, values in sections.items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return load_config(path)


def run_sections(config: RunConfig) -> dict[str, dict[str, Any]]:
    """The keys the run file set (with paths already absolute), as {section: {key: value}}, less the
    ``[experiment]`` analysis plan (it is the experiment's, recorded in its report, not a run's)."""
    return config.model_dump(mode="json", exclude_unset=True, exclude={"experiment"})


def variant_config(
    run_file: Path, variant: Variant, shared: Sequence[str], seed: int, output: Path
) -> RunConfig:
    """The user's run file with the shared overrides, the variant's, the seed and the output folder."""
    overrides = [*shared, *variant.overrides, f"train.seed={seed}", f"output.dir={json.dumps(str(output))}"]
    try:
        config = load_config(run_file, overrides)
    except ConfigError as error:
        raise ConfigError(f"variant {variant.name}: {error}") from None
    if config.crepa.enabled and config.crepa.mode == "crepa" and config.crepa.distance == 0:
        raise ConfigError(
            f"variant {variant.name}: crepa.distance is 0, which is REPA*; set crepa.distance = 1 in the run "
            f"file or --set {variant.name}.crepa.distance=1"
        )
    return config


def write_runs(
    run_file: Path, variants: Sequence[Variant], shared: Sequence[str], seeds: Sequence[int], root: Path
) -> list[tuple[Run, RunConfig]]:
    """Write ``root/<variant>-seed<k>/run.toml`` for every variant and seed; returns them in order
    (variant-major). Only the run files are written; earlier outputs stay (see the runner)."""
    runs = []
    for variant in variants:
        for seed in seeds:
            run = Run(variant.name, seed, root / f"{variant.name}-seed{seed}")
            config = variant_config(run_file, variant, shared, seed, run.directory)
            comment = (
                f"crepa experiment: variant {variant.name} ({variant.label}), seed {seed}, from {run_file}.\n"
                "Reproduce with: crepa precompute run.toml && crepa train run.toml"
            )
            runs.append((run, write_run_file(run.run_file, run_sections(config), comment)))
    return runs
