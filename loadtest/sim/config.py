"""The simulator's YAML (configs/sims/*.yaml) and the command-line overrides.

Unknown keys are errors, so a typo never silently falls back to a default. See
loadtest/README.md ("Simulator") for the keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loadtest.sim import dists
from server.config import CacheConfig, SchedulerConfig
from server.spec_decode.policies import available_policies

REPO_ROOT = Path(__file__).resolve().parents[2]
DrafterMode = Literal["free", "model"]
CostKind = Literal["smartspec", "coefficients"]
# Not a registered policy: the engine without any speculative config (the sweeps' "no-spec"):
# no drafter, no speculator, and the scheduler reserves no draft slots.
OFF = "off"


@dataclass(frozen=True)
class PolicySpec:
    label: str  # how results name it: "goodput", "fixed-k4", ...
    name: str  # make_policy's name, or OFF
    max_spec_tokens: int  # num_speculative_tokens of this run (fixed:K sets K)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_len: dists.DistSpec
    output_len: dists.DistSpec
    acceptance: dists.DistSpec


@dataclass(frozen=True)
class EngineSettings:
    """The simulated engine's scheduler and cache: the real engine's own config parts (their
    validation included), plus the context limit the model would set."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(num_blocks=4096))
    max_model_len: int = 4096

    @classmethod
    def from_flat(cls, raw: dict[str, Any]) -> EngineSettings:
        """The YAML's flat `engine:` keys, each a SchedulerConfig or CacheConfig field."""
        scheduler = {f.name for f in dataclasses.fields(SchedulerConfig)}
        cache = {f.name for f in dataclasses.fields(CacheConfig)}
        _check_keys(raw, scheduler | cache | {"max_model_len"}, "engine")
        return cls(
            scheduler=SchedulerConfig(**{k: v for k, v in raw.items() if k in scheduler}),
            cache=CacheConfig(
                **{"num_blocks": 4096, **{k: v for k, v in raw.items() if k in cache}}
            ),
            max_model_len=int(raw.get("max_model_len", 4096)),
        )

    @property
    def num_blocks(self) -> int:
        assert self.cache.num_blocks is not None  # from_flat and the default always set it
        return self.cache.num_blocks


@dataclass(frozen=True)
class CostConfig:
    """The "true" step time (see loadtest/sim/cost.py); the policy never sees it."""

    kind: CostKind = "smartspec"
    # kind coefficients: a JSON / Prometheus file, or inline coefficients (seconds per unit).
    path: str | None = None
    coefficients: dict[str, float] | None = None
    # sigma of a mean-preserving log-normal factor on every step (0 = exact).
    noise: float = 0.0
    # kind smartspec: proposing with a model-free drafter for the whole batch costs this
    # fraction of T_target (for a share of the batch, that share of it), and verifying any
    # drafts (rejection sampling) this fraction.
    propose_fraction: float = 0.04
    verify_fraction: float = 0.05
    # kind smartspec, model drafters: ms per draft forward and per draft row.
    draft_forward_ms: float = 0.0
    draft_row_ms: float = 0.0


@dataclass(frozen=True)
class SimConfig:
    name: str
    rates: tuple[float, ...]
    workloads: tuple[Workload, ...]
    policies: tuple[PolicySpec, ...]
    description: str = ""
    seed: int = 0
    # Requests per rate: one number, or one per rate (high rates need more to reach a
    # steady state; low rates take the most steps to simulate).
    num_requests: tuple[int, ...] = (200,)
    burstiness: float = 1.0
    engine: EngineSettings = field(default_factory=EngineSettings)
    num_speculative_tokens: int = 8
    drafter: DrafterMode = "free"
    # Seed cost-aware policies' cost models with a simulated start-up profile (as the engine).
    profile: bool = True
    cost: CostConfig = field(default_factory=CostConfig)
    # Policy label -> sweep configuration name, for --compare.
    compare: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def __post_init__(self) -> None:
        if len(self.num_requests) not in (1, len(self.rates)):
            raise ValueError(
                f"num_requests: one number or one per rate ({len(self.rates)} rates), got "
                f"{list(self.num_requests)}"
            )

    def requests_at(self, rate_index: int) -> int:
        n = self.num_requests
        return n[0] if len(n) == 1 else n[rate_index]

    def with_overrides(
        self,
        rates: tuple[float, ...] | None = None,
        num_requests: int | None = None,
        policies: list[str] | None = None,
        seed: int | None = None,
        workloads: list[str] | None = None,
        cost_path: str | None = None,
    ) -> SimConfig:
        out = self
        if cost_path is not None:
            if self.cost.kind != "coefficients":
                raise ValueError(f"--cost-path needs cost.kind coefficients, not {self.cost.kind}")
            out = dataclasses.replace(out, cost=dataclasses.replace(self.cost, path=cost_path))
        if rates is not None or num_requests is not None:
            counts = self.num_requests
            if num_requests is not None:
                counts = (_positive(num_requests, "num_requests"),)
            elif len(counts) > 1 and len(rates or ()) != len(counts):
                raise ValueError(
                    "the YAML gives num_requests per rate: with other rates, "
                    "give --num-requests too"
                )
            out = dataclasses.replace(
                out, rates=_rates(list(rates)) if rates else self.rates, num_requests=counts
            )
        if policies is not None:
            out = dataclasses.replace(
                out, policies=parse_policies(policies, self.num_speculative_tokens)
            )
        if seed is not None:
            out = dataclasses.replace(out, seed=seed)
        if workloads is not None:
            known = {w.name: w for w in self.workloads}
            missing = sorted(set(workloads) - set(known))
            if missing:
                raise ValueError(f"unknown workloads {missing}; the config has {sorted(known)}")
            out = dataclasses.replace(out, workloads=tuple(known[w] for w in workloads))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rates"] = [_rate_json(r) for r in self.rates]
        return d


_TOP = {
    "name",
    "description",
    "seed",
    "rates",
    "num_requests",
    "burstiness",
    "workload",
    "workloads",
    "engine",
    "speculation",
    "policies",
    "cost",
    "compare",
}
_WORKLOAD = {"name", "prompt_len", "output_len", "acceptance"}
_SPECULATION = {"num_speculative_tokens", "drafter", "profile"}
# How the spec-policies sweep names its configurations (configs/sweeps/spec-policies.yaml).
_DEFAULT_COMPARE = {
    "none": "no-spec",
    OFF: "no-spec",
    "smartspec_uniform": "smartspec-uniform",
    "goodput": "goodput",
}


def load_config(path: str | Path) -> SimConfig:
    p = Path(path)
    raw = yaml.safe_load(p.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: the top level must be a mapping")
    return parse_config(raw, str(p))


def parse_config(raw: dict[str, Any], path: str = "") -> SimConfig:
    _check_keys(raw, _TOP, "the config")
    spec = raw.get("speculation") or {}
    _check_keys(spec, _SPECULATION, "speculation")
    k = _positive(int(spec.get("num_speculative_tokens", 8)), "num_speculative_tokens")
    drafter = spec.get("drafter", "free")
    if drafter not in ("free", "model"):
        raise ValueError(f"speculation.drafter must be free or model, got {drafter!r}")
    engine = EngineSettings.from_flat(raw.get("engine") or {})
    cost_raw = dict(raw.get("cost") or {})
    _check_keys(cost_raw, {f.name for f in dataclasses.fields(CostConfig)}, "cost")
    cost = CostConfig(**cost_raw)
    if cost.kind not in ("smartspec", "coefficients"):
        raise ValueError(f"cost.kind must be smartspec or coefficients, got {cost.kind!r}")
    if cost.kind == "coefficients" and not (cost.path or cost.coefficients):
        raise ValueError("cost.kind coefficients needs cost.path or cost.coefficients")
    policies = raw.get("policies") or ["none", "goodput"]
    if not isinstance(policies, list):
        raise ValueError("policies must be a list")
    parsed = parse_policies(policies, k)
    compare = {p.label: _DEFAULT_COMPARE.get(p.name, p.label) for p in parsed}
    for p in parsed:
        if p.name == "fixed":
            compare[p.label] = f"ngram-k{p.max_spec_tokens}"
    compare.update((raw.get("compare") or {}).get("configurations") or {})
    return SimConfig(
        name=str(raw.get("name") or Path(path).stem or "sim"),
        description=str(raw.get("description") or "").strip(),
        seed=int(raw.get("seed", 0)),
        rates=_rates(raw.get("rates") or [1.0]),
        num_requests=_counts(raw.get("num_requests", 200)),
        burstiness=float(raw.get("burstiness", 1.0)),
        workloads=_workloads(raw),
        engine=engine,
        num_speculative_tokens=k,
        drafter=drafter,
        profile=bool(spec.get("profile", True)),
        policies=parsed,
        cost=cost,
        compare=compare,
        path=path,
    )


def parse_policies(items: list[Any], default_k: int) -> tuple[PolicySpec, ...]:
    """ "none", "goodput", "smartspec_uniform", "off", "fixed" (k = num_speculative_tokens),
    "fixed:K", or a mapping {fixed: [K, ...]}."""
    known = set(available_policies())
    out: list[PolicySpec] = []
    for item in items:
        if isinstance(item, dict):
            if set(item) != {"fixed"} or not isinstance(item["fixed"], list):
                raise ValueError(f"a policy mapping must be {{fixed: [k, ...]}}, got {item!r}")
            out += [
                PolicySpec(f"fixed-k{k}", "fixed", _positive(int(k), "k")) for k in item["fixed"]
            ]
            continue
        name, _, arg = str(item).partition(":")
        if name == OFF:
            out.append(PolicySpec(OFF, OFF, 0))
        elif name == "fixed":
            k = _positive(int(arg), "fixed:K") if arg else default_k
            out.append(PolicySpec(f"fixed-k{k}", "fixed", k))
        elif name in known and not arg:
            out.append(PolicySpec(name, name, default_k))
        else:
            raise ValueError(f"unknown policy {item!r}; choose from {sorted(known)}, fixed:K, off")
    labels = [p.label for p in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"policies repeat: {labels}")
    return tuple(out)


def resolve_path(path: str) -> Path:
    """A config's file path: as given if it exists, else relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def _workloads(raw: dict[str, Any]) -> tuple[Workload, ...]:
    base = dict(raw.get("workload") or {})
    _check_keys(base, _WORKLOAD, "workload")
    variants = raw.get("workloads") or {base.get("name", "default"): {}}
    if not isinstance(variants, dict):
        raise ValueError("workloads must map a name to the keys it overrides")
    out = []
    for name, over in variants.items():
        over = over or {}
        _check_keys(over, _WORKLOAD - {"name"}, f"workloads.{name}")
        merged = {**base, **over}
        for key in ("prompt_len", "output_len", "acceptance"):
            if key not in merged:
                raise ValueError(f"workload {name!r} has no {key}")
            dists.validate(merged[key], f"workload {name!r} {key}")
        out.append(
            Workload(str(name), merged["prompt_len"], merged["output_len"], merged["acceptance"])
        )
    return tuple(out)


def _rates(items: list[Any]) -> tuple[float, ...]:
    rates = tuple(math.inf if str(r) == "inf" else float(r) for r in items)
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"rates must be positive numbers or inf, got {items!r}")
    return rates


def _counts(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    return tuple(_positive(int(n), "num_requests") for n in items)


def _rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _positive(n: int, what: str) -> int:
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    return n


def _check_keys(d: Any, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {d!r}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
