"""`blockpilot policy eval`: a published policy against fixed block sizes and the per-prompt oracle,
on a sweep of evaluation prompts the policy never saw.

Every method is read off the same sweep, so all of them are compared on identical prompts, output
and cost model:
- autoregressive: block size 1;
- B=k: every swept candidate, fixed for every prompt;
- policy: the size the policy decides from the prompt's recorded feature;
- oracle: the best of the policy's candidates for each prompt under the policy's label rule.

Per dataset and over all prompts: τ (mean over prompts of each prompt's τ) and decode tokens/s
(total tokens / total decode seconds) with the speed-up over autoregressive decoding. Written to
--out: report.md (tables), report.json (everything, per prompt included), tau_by_block_size.png
and chosen_sizes.png.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.policy.labels import label_index
from blockpilot.policy.onnx_policy import OnnxPolicy
from blockpilot.policy.sweep import BASELINE_BLOCK_SIZE, Sweep

AUTOREGRESSIVE = "autoregressive"
POLICY = "policy"
ORACLE = "oracle"


def check_compatible(policy: OnnxPolicy, sweep: Sweep, allow_model_mismatch: bool = False) -> None:
    """Refuse comparisons that would mean nothing: other models, missing sizes, training data."""
    meta = policy.metadata
    if not allow_model_mismatch:
        for what in ("target", "drafter"):
            theirs, ours = getattr(meta, what), sweep.manifest.get(what)
            if theirs and theirs != ours:
                raise FailedPreconditionError(f"the policy was trained for {what} {theirs!r}; the sweep ran {ours!r}")
    missing = [c for c in meta.candidates if c not in sweep.block_sizes]
    if missing:
        raise InvalidArgumentError(f"the policy chooses among {list(meta.candidates)}; the sweep lacks {missing}")
    dims = sweep.manifest["feature_dims"]
    if dims.get(meta.feature_kind) != meta.feature_dim:
        raise InvalidArgumentError(f"the policy takes {meta.feature_dim} '{meta.feature_kind}' values; the sweep has "
                                   f"{dims.get(meta.feature_kind)}")
    if meta.data_digest and meta.data_digest == sweep.digest():
        raise FailedPreconditionError("this is the sweep the policy was trained on; evaluate on prompts it never saw")
    trained_on = set(meta.metrics.get("train_datasets", ()))
    overlap = sorted(trained_on & {p["dataset"] for p in sweep.prompts})
    if overlap:
        raise FailedPreconditionError(f"the policy was trained on prompts of {overlap}; evaluate on other datasets")


def autoregressive_record(record: dict) -> dict:
    """Plain autoregressive decoding of a prompt from its block-size-1 record: the same tokens in
    one-token steps (τ 1) and the record's baseline_decode_s (with prompt lookup on, block size 1
    verifies lookup drafts, so its own figures are not the baseline's)."""
    seconds = record.get("baseline_decode_s", record["decode_s"])
    return {**record, "tau": 1.0 if record["steps"] else 0.0, "decode_s": seconds,
            "decode_tokens_per_s": record["tokens"] / seconds if seconds > 0 else 0.0}


def evaluate_policy(policy: OnnxPolicy, sweep: Sweep, *, allow_model_mismatch: bool = False) -> dict:
    check_compatible(policy, sweep, allow_model_mismatch)
    meta = policy.metadata
    # With prompt lookup, block size 1 (lookup drafts only) is a method of its own, not the baseline.
    lookup = bool(sweep.manifest.get("prompt_lookup"))
    fixed = [b for b in sweep.block_sizes if b != BASELINE_BLOCK_SIZE or lookup]
    features = sweep.features(meta.feature_kind)
    rows = []
    for prompt in sweep.prompts:
        by_size = prompt["by_size"]
        if by_size[BASELINE_BLOCK_SIZE]["steps"] == 0:
            continue  # the first token ended the reply: no decode step at any size
        chosen = policy.decide(np.asarray(features[prompt["feature_row"]]))
        best = meta.candidates[label_index(by_size, meta.candidates, meta.label_rule)]
        rows.append({"id": prompt["id"], "dataset": prompt["dataset"], "policy": chosen, "oracle": best,
                     "sizes": {b: by_size[b] for b in sweep.block_sizes}})
    if not rows:
        raise InvalidArgumentError(f"the sweep at '{sweep.directory}' has no prompt with a decode step")
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["dataset"]].append(row)
    methods = [AUTOREGRESSIVE] + [f"B={b}" for b in fixed] + [POLICY, ORACLE]

    def record(row: dict, method: str) -> dict:
        if method == AUTOREGRESSIVE:
            return autoregressive_record(row["sizes"][BASELINE_BLOCK_SIZE])
        if method in (POLICY, ORACLE):
            return row["sizes"][row[method]]
        return row["sizes"][int(method[2:])]

    def summarize(group: list[dict]) -> dict:
        out = {"prompts": len(group), "methods": {}}
        ar_speed = None
        for method in methods:
            records = [record(r, method) for r in group]
            tokens = sum(r["tokens"] for r in records)
            seconds = sum(r["decode_s"] for r in records)
            speed = tokens / seconds if seconds > 0 else 0.0
            ar_speed = speed if method == AUTOREGRESSIVE else ar_speed
            out["methods"][method] = {"tau": float(np.mean([r["tau"] for r in records])), "decode_tokens_per_s": speed,
                                      "speedup": speed / ar_speed if ar_speed else 0.0}
        chosen = [r["policy"] for r in group]
        best = [r["oracle"] for r in group]
        index = {c: i for i, c in enumerate(meta.candidates)}
        out["policy_accuracy"] = float(np.mean([c == b for c, b in zip(chosen, best)]))
        out["policy_within_one"] = float(np.mean([abs(index[c] - index[b]) <= 1 for c, b in zip(chosen, best)]))
        out["chosen_counts"] = {str(c): Counter(chosen)[c] for c in meta.candidates}
        out["oracle_counts"] = {str(c): Counter(best)[c] for c in meta.candidates}
        return out

    return {
        "policy": meta.policy_version,
        "policy_dir": str(policy.version_dir),
        "feature_kind": meta.feature_kind,
        "label_rule": meta.label_rule,
        "candidates": list(meta.candidates),
        "default_block_size": sweep.manifest.get("drafter_block_size"),
        "sweep": {"directory": str(sweep.directory), "mode": sweep.manifest["mode"], "target": sweep.manifest["target"],
                  "drafter": sweep.manifest["drafter"], "max_new_tokens": sweep.manifest["max_new_tokens"],
                  "digest": sweep.digest()},
        "methods": methods,
        "datasets": {name: summarize(group) for name, group in sorted(groups.items())},
        "overall": summarize(rows),
        "prompts": [{"id": r["id"], "dataset": r["dataset"], "policy": r["policy"], "oracle": r["oracle"],
                     "tau": {str(b): r["sizes"][b]["tau"] for b in sweep.block_sizes}} for r in rows],
    }


def format_markdown(report: dict) -> str:
    methods = report["methods"]
    blocks = list(report["datasets"].items()) + [("ALL", report["overall"])]
    sweep = report["sweep"]
    lines = [f"# Policy evaluation: {report['policy']}", "",
             f"Sweep `{sweep['directory']}` ({sweep['mode']} mode, max_new_tokens {sweep['max_new_tokens']}); "
             f"target `{sweep['target']}`, drafter `{sweep['drafter']}`; feature `{report['feature_kind']}`, "
             f"label rule `{report['label_rule']}`, default block size {report['default_block_size']}.", ""]

    def table(title: str, cell) -> None:
        head = ["dataset", "n"] + methods
        lines.extend([f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        for name, block in blocks:
            lines.append("| " + " | ".join([name, str(block["prompts"])] + [cell(m, block["methods"][m]) for m in methods]) + " |")
        lines.append("")

    table("τ (mean acceptance length per step, bonus included)", lambda method, m: f"{m['tau']:.2f}")
    # The autoregressive speed-up is 1 by definition: its column shows the tokens/s it is relative to.
    table("Decode speed-up over block size 1 (autoregressive column: its decode tokens/s)",
          lambda method, m: f"{m['decode_tokens_per_s']:.1f} tok/s" if method == AUTOREGRESSIVE else f"{m['speedup']:.2f}x")
    head = ["dataset", "n", "accuracy vs oracle", "±1", "chosen sizes", "oracle sizes"]
    lines.extend(["## Policy decisions", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
    for name, block in blocks:
        chosen = " ".join(f"{k}:{v}" for k, v in block["chosen_counts"].items() if v)
        best = " ".join(f"{k}:{v}" for k, v in block["oracle_counts"].items() if v)
        lines.append(f"| {name} | {block['prompts']} | {block['policy_accuracy']:.0%} | {block['policy_within_one']:.0%} | {chosen} | {best} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fixed = [m for m in report["methods"] if m.startswith("B=")]
    labels = ["AR"] + [m[2:] for m in fixed]
    x = np.arange(len(labels))  # categorical: block size 1 sits next to the candidates
    datasets = list(report["datasets"].items()) + [("ALL", report["overall"])]
    columns = min(4, len(datasets))
    rows = -(-len(datasets) // columns)
    paths = []
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False, sharex=True)
    for index, (name, block) in enumerate(datasets):
        ax = axes[index // columns][index % columns]
        methods = block["methods"]
        ax.plot(x, [methods[AUTOREGRESSIVE]["tau"]] + [methods[m]["tau"] for m in fixed], marker="o", color="C0", label="fixed size")
        ax.axhline(methods[POLICY]["tau"], color="C1", linestyle="--", label="policy")
        ax.axhline(methods[ORACLE]["tau"], color="C2", linestyle=":", label="oracle")
        ax.set_title(f"{name} (n={block['prompts']})", fontsize=9)
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(alpha=0.3)
        if index % columns == 0:
            ax.set_ylabel("τ")
    for index in range(len(datasets), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"τ per block size, policy {report['policy']} (AR = block size 1)", fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "tau_by_block_size.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    candidates = report["candidates"]
    overall = report["overall"]
    x = np.arange(len(candidates))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [overall["chosen_counts"][str(c)] for c in candidates], width=0.4, label="policy")
    ax.bar(x + 0.2, [overall["oracle_counts"][str(c)] for c in candidates], width=0.4, label="oracle")
    ax.set_xticks(x, [str(c) for c in candidates])
    ax.set_xlabel("block size")
    ax.set_ylabel("prompts")
    ax.set_title(f"Chosen block sizes over {overall['prompts']} prompts")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "chosen_sizes.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    files["markdown"].write_text(format_markdown(report))
    tau_png, sizes_png = plot(report, out_dir)
    files.update(tau_png=tau_png, sizes_png=sizes_png)
    return files
