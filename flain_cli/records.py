"""What a defense did, as typed data: written into the defended checkpoint's metadata ("defense").

Plain data, no torch. :func:`flain_cli.audit.defend_checkpoint` builds a :class:`DefenseRecord`;
the CLI's report, the demo and `flain experiment` read its fields; ``to_json``/``from_json`` are
the one place that knows the JSON layout (docs/checkpoint-format.md), which stays flat for the
scripts that read it: the settings of :class:`~flain_cli.settings.DefenseConfig` beside the
search's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, ConfigError
from .settings import DefenseConfig, KlStop

RECORD_VERSION = 1  # records written before the version key had the same layout


@dataclass(frozen=True)
class AuxRecord:
    """The aux set a defense ran on."""

    source: str  # a folder or file, as given
    n: int  # images read
    scored_on: int  # images the stopping rule measured (fewer with a holdout)
    resized: int  # images that had to be resized to the model's input


@dataclass(frozen=True)
class DefenseRecord:
    """One run of `flain defend`: every setting (``config``) and what the search and the repair found."""

    config: DefenseConfig
    layer: str  # the defended layer
    lam: float | None  # the kept threshold lambda ("lambda" in JSON); None for a method that does not search
    mu: float | None  # the lowest mean activation, where the thresholds start
    flipped: int  # inputs whose updates were flipped (pruned, for method prune)
    of: int  # inputs of the layer
    neurons: tuple[int, ...]  # their indices
    all_selected: bool  # every input was selected before the stop fired
    aux_acc_before: float
    aux_acc_kept: float  # of the kept model, as the search measured it
    kl_kept: float | None  # the same for the divergence (kl stop only)
    aux_acc_flipped: float | None  # after the search, before the repair (None without the repair)
    aux_acc_after: float  # of the model as written
    steps: int  # thresholds visited
    evaluations: int  # network evaluations
    seed: int  # the holdout split's seed
    warnings: tuple[str, ...]
    aux: AuxRecord
    kl_scale: float | None = None  # the model's shift KL on the aux set (the kl stop in unit "shift" only)

    @property
    def kl_budget(self) -> float | None:
        """The kl stop's budget in nats as the search used it (None for another stop)."""
        stop = self.config.stop
        if not isinstance(stop, KlStop):
            return None
        return stop.kl * (self.kl_scale if self.kl_scale is not None else 1.0)

    def to_json(self) -> dict[str, Any]:
        """The checkpoint-metadata layout (flat; ``repair`` holds its settings and ``aux_acc_flipped``)."""
        config = self.config.record()
        if config["repair"] is not None:
            config["repair"] = config["repair"] | {"aux_acc_flipped": self.aux_acc_flipped}
        return {"version": RECORD_VERSION} | config | {
            "layer": self.layer, "lambda": self.lam, "mu": self.mu, "flipped": self.flipped, "of": self.of,
            "neurons": list(self.neurons), "all_selected": self.all_selected,
            "aux_acc_before": self.aux_acc_before, "aux_acc_kept": self.aux_acc_kept, "kl_kept": self.kl_kept,
            "aux_acc_after": self.aux_acc_after, "steps": self.steps, "evaluations": self.evaluations,
            "seed": self.seed, "warnings": list(self.warnings),
            "aux": {"source": self.aux.source, "n": self.aux.n, "scored_on": self.aux.scored_on,
                    "resized": self.aux.resized},
        } | ({} if self.kl_scale is None else {"kl_scale": self.kl_scale})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DefenseRecord:
        """Read ``to_json``'s layout back (DefenseConfig.from_record: older records too)."""
        version = data.get("version", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise CheckpointError(f"defense record version {version!r}; this flain-cli reads version "
                                  f"{RECORD_VERSION}: upgrade flain-cli")
        try:
            repair = data["repair"]
            config = DefenseConfig.from_record(data | {"repair": None if repair is None else {
                k: v for k, v in repair.items() if k != "aux_acc_flipped"}})
            aux = data["aux"]
            return cls(config, data["layer"], data["lambda"], data["mu"], data["flipped"], data["of"],
                       tuple(data["neurons"]), data["all_selected"], data["aux_acc_before"], data["aux_acc_kept"],
                       data.get("kl_kept"), None if repair is None else repair.get("aux_acc_flipped"),
                       data["aux_acc_after"], data["steps"], data["evaluations"], data["seed"],
                       tuple(data["warnings"]), AuxRecord(aux["source"], aux["n"], aux["scored_on"], aux["resized"]),
                       data.get("kl_scale"))
        except (KeyError, TypeError, AttributeError, ConfigError) as exc:
            raise CheckpointError(f"the defense record is incomplete or malformed ({type(exc).__name__}: {exc})") \
                from None
