"""Generate the TrainingRun and EvalRun CRDs from the pydantic models.

    python -m nanochat_operator.crds            # writes crds/*.yaml and the chart's copy
    nanochat crds --out crds                    # the CLI calls write_crds()

Pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3
schema. The conversion (`structural`) inlines `$ref`s, turns `anyOf: [X, null]` into X
with `nullable: true` (kept so a user can null a field a preset set, e.g. `head_dim:
null`), drops `additionalProperties: false` (the API server prunes unknown fields, and
kubectl's default strict field validation reports them), turns `const` into `enum` and
numeric `exclusiveMinimum` into the OpenAPI v3.0 boolean form, and attaches CEL rules.

Defaults: only operator-level fields get `default:`. Nothing under `spec.trainer` does:
the trainer applies its `preset` by deep-merging the preset *under* the user's values,
so a default the API server filled in would look like a user value and override the
preset (a `nano-1B` run would silently train with dim 768).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from nanochat_trainer.config import PRESETS
from nanochat_trainer.contract import EVAL_KIND, EVAL_PLURAL, GROUP, TRAINING_KIND, TRAINING_PLURAL, VERSION

from . import api
from .api import cel

# CEL rules for the trainer's models, by pydantic model name. config.py belongs to the
# trainer, so the rules are attached here. Each rule only involves fields that must be
# written together to be checked (a preset can supply any of them, and CEL sees the
# manifest before the preset is applied); the operator's pydantic validation catches the
# rest and fails the run with a condition naming the field.
TRAINER_RULES: dict[str, list[dict[str, str]]] = {
    "TrainerConfig": [
        cel(
            "!has(self.stage) || self.stage != 'distill' || has(self.distill)",
            "stage distill needs a distill block (teacher and method)",
        ),
        cel(
            "(has(self.stage) && self.stage == 'generate') == has(self.generate)",
            "stage generate and a generate block (teacher, rows) go together",
        ),
    ],
    "ModelConfig": [
        cel(
            "!has(self.n_heads) || !has(self.n_kv_heads) || "
            "(self.n_kv_heads <= self.n_heads && self.n_heads % self.n_kv_heads == 0)",
            "n_kv_heads must divide n_heads (and so be at most n_heads)",
        ),
    ],
    "MoEConfig": [
        cel(
            "!has(self.top_k) || !has(self.n_experts) || self.top_k <= self.n_experts",
            "top_k must be at most n_experts",
        ),
    ],
    "HybridConfig": [
        cel(
            "!has(self.linear_num_key_heads) || !has(self.linear_num_value_heads) || "
            "self.linear_num_value_heads % self.linear_num_key_heads == 0",
            "linear_num_value_heads must be a multiple of linear_num_key_heads",
        ),
    ],
    "DataConfig": [
        cel("!has(self.source) || self.source != 'local' || has(self.path)", "data.source local needs data.path"),
        cel(
            "!has(self.source) || self.source != 'mixture' || (has(self.mixture) && size(self.mixture) > 0)",
            "data.source mixture needs data.mixture (sources with a name and a weight)",
        ),
    ],
    "WeightedSource": [
        cel("!has(self.source) || self.source != 'local' || has(self.path)", "a local source needs path"),
    ],
}

# Per-field schema replacements inside the trainer block.
TRAINER_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    # An unknown preset is refused by the API server with the list of names.
    ("TrainerConfig", "preset"): {"type": "string", "enum": sorted(PRESETS)},
}

_DROP = {"title", "examples", "$defs", "discriminator"}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic model JSON schema as a structural OpenAPI v3 schema (see module doc)."""
    defs = schema.get("$defs", {})
    return _convert(schema, defs, in_trainer=False, name=None)


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Inline a `$ref` (siblings such as `description` win) and a one-element allOf."""
    name = None
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**{k: v for k, v in node.items() if k != "allOf"}, **node["allOf"][0]}
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target, _ = _resolve(defs[name], defs)
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node, name


def _convert(node: dict[str, Any], defs: dict[str, Any], in_trainer: bool, name: str | None) -> dict[str, Any]:
    node, ref_name = _resolve(copy.deepcopy(node), defs)
    name = ref_name or name or node.get("title")
    out: dict[str, Any] = {}
    nullable = False

    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        types = sorted(o.get("type", "") for o in options)
        if node.get("x-kubernetes-int-or-string") or types == ["integer", "string"]:
            # The one anyOf a structural schema allows, with its type-free siblings.
            out["x-kubernetes-int-or-string"] = True
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            options = []
        elif len(options) != 1:
            raise ValueError(f"{name}: a union of {types} has no structural schema; use one type")
        else:
            inner, inner_name = _resolve(options[0], defs)
            name = inner_name or name
            node = {
                **{k: v for k, v in node.items() if k != "anyOf"},
                **inner,
                **{k: node[k] for k in ("description", "default") if k in node},
            }
        if node.get("default") is None:
            node.pop("default", None)

    for key, value in node.items():
        if key in _DROP or key in ("anyOf", "$ref", "allOf"):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {
                prop: _convert(sub, defs, in_trainer or (prop == "trainer" and name == "TrainingRunSpec"), None)
                for prop, sub in value.items()
            }
            for prop in list(out["properties"]):
                override = TRAINER_OVERRIDES.get((name or "", prop))
                if override:
                    keep = {k: v for k, v in out["properties"][prop].items() if k == "description"}
                    out["properties"][prop] = {**override, **keep}
        elif key == "items":
            out["items"] = _convert(value, defs, in_trainer, None)
        elif key == "additionalProperties":
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out["additionalProperties"] = _convert(value, defs, in_trainer, None)
            # False: dropped (mutually exclusive with properties in a structural schema).
        elif key == "default":
            if not in_trainer:
                out["default"] = value
        else:
            out[key] = value

    if "properties" in out or out.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out:
        out.setdefault("type", "object")
    if nullable and "enum" not in out:
        # An enum with nullable would need null among its values; a null there is pruned
        # instead, which reads as "not set" just the same.
        out["nullable"] = True
    if in_trainer and name in TRAINER_RULES and "properties" in out:
        out.setdefault("x-kubernetes-validations", []).extend(TRAINER_RULES[name])
    if not in_trainer and out.get("type") == "object" and "properties" in out:
        # Give optional sub-objects without required fields a `{}` default, so the API
        # server fills in *their* defaults too (nested defaults apply only under an
        # object that exists). Nullable ones stay absent: absent means "none".
        for prop, sub in out["properties"].items():
            if (
                prop not in out.get("required", [])
                and sub.get("type") == "object"
                and "properties" in sub
                and not sub.get("required")
                and "default" not in sub
                and not sub.get("nullable")
            ):
                sub["default"] = {}
    return out


# ---------------------------------------------------------------------------- CRDs

TRAINING_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Total", "type": "integer", "jsonPath": ".status.totalSteps", "priority": 1},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
    {"name": "Val loss", "type": "number", "jsonPath": ".status.valLoss"},
    {"name": "pass@1", "type": "number", "jsonPath": ".status.passAt1"},
    {"name": "Best", "type": "number", "jsonPath": ".status.bestPassAt1", "priority": 1},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.tokensPerSecond"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.eta", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
EVAL_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "pass@1", "type": "number", "jsonPath": ".status.passAt1"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.trainingRun", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# Rules on the whole object: they can see metadata.name.
NAME_RULE = cel(
    f"size(self.metadata.name) <= {api.MAX_NAME_LENGTH}",
    f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters (pod hostnames are "
    "<name>-train-<index> and must fit a DNS label)",
)
SELF_INIT_RULE = cel(
    "!has(self.spec.init) || self.spec.init.fromTrainingRun != self.metadata.name",
    "spec.init.fromTrainingRun cannot name the run itself",
)


# The one spec field a live run follows; every other is fixed once the run exists.
MUTABLE_SPEC_FIELDS = ("suspend",)


def immutability_rules(spec: dict[str, Any]) -> list[dict[str, str]]:
    """Transition rules (CEL `oldSelf`) refusing an edit of any spec field but MUTABLE_SPEC_FIELDS:
    the operator cannot apply one to a Job it made (a Job's pod template is immutable too), so
    `kubectl apply` and a GitOps sync fail loudly instead of going green and doing nothing.
    One rule per field, so the message names it; written on the spec object, so adding or
    removing an optional field counts as a change as well."""
    return [
        cel(
            f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
            f"spec.{f} cannot change once the run exists (only {', '.join('spec.' + m for m in MUTABLE_SPEC_FIELDS)} "
            "can): delete the run and create it again",
        )
        for f in spec["properties"]
        if f not in MUTABLE_SPEC_FIELDS
    ]


def _object_schema(
    spec_model: type[BaseModel], status_model: type[BaseModel], rules: list[dict[str, str]]
) -> dict[str, Any]:
    spec = structural(spec_model.model_json_schema(by_alias=True))
    spec.pop("description", None)
    spec["description"] = (spec_model.__doc__ or "").strip().splitlines()[0]
    spec.setdefault("x-kubernetes-validations", []).extend(immutability_rules(spec))
    status = structural(status_model.model_json_schema(by_alias=True))
    status["description"] = "Observed state, written by the operator."
    status.pop("required", None)
    status["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": rules,
    }


def crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of TrainingRun or EvalRun, as a dict."""
    if kind == TRAINING_KIND:
        plural, short, columns = TRAINING_PLURAL, "tr", TRAINING_COLUMNS
        schema = _object_schema(api.TrainingRunSpec, api.TrainingRunStatus, [NAME_RULE, SELF_INIT_RULE])
    elif kind == EVAL_KIND:
        plural, short, columns = EVAL_PLURAL, "er", EVAL_COLUMNS
        schema = _object_schema(api.EvalRunSpec, api.EvalRunStatus, [NAME_RULE])
    else:
        raise ValueError(f"kind={kind!r} is not one of {list(api.KINDS)}")
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            # Helm never upgrades or deletes CRDs it did not keep: with this, `helm
            # uninstall` leaves the CRDs (and so every run) in place. Ignored by kubectl.
            "annotations": {"helm.sh/resource-policy": "keep"},
            "labels": {"app.kubernetes.io/part-of": "nanochat"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["nanochat"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


HEADER = (
    "# Generated by nanochat_operator.crds from the pydantic models (nanochat crds). Do not edit.\n"
    "# The chart carries a byte-identical copy; tests/test_crds.py fails when either is stale.\n"
)
FILES = {"trainingrun.yaml": TRAINING_KIND, "evalrun.yaml": EVAL_KIND}
CHART_CRD_DIR = Path("helm/nanochat-operator/files/crds")


def render_crd_yaml(kind: str) -> str:
    """The text of a CRD file, exactly as write_crds writes it."""
    return HEADER + yaml.safe_dump(crd(kind), sort_keys=False, width=120, allow_unicode=True)


def write_crds(out_dir: str = "crds", chart_dir: str | None = None) -> list[str]:
    """Write crds/trainingrun.yaml and crds/evalrun.yaml (and the chart's copy when
    `chart_dir` is given, e.g. helm/nanochat-operator/files/crds). Returns the paths."""
    written = []
    for folder in [out_dir] + ([chart_dir] if chart_dir else []):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for filename, kind in FILES.items():
            path = Path(folder) / filename
            path.write_text(render_crd_yaml(kind))
            written.append(str(path))
    return written


if __name__ == "__main__":
    for p in write_crds("crds", str(CHART_CRD_DIR) if len(sys.argv) < 2 else sys.argv[1]):
        print(p)
