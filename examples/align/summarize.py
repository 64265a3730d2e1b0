"""Collect the figures of a miniature run (examples/align/miniature.sh) into RUN/summary.json and print them.

Usage: python examples/align/summarize.py RUN_DIR
Reads each stage's metrics.jsonl, the safety reports' results.json, GAtt's adherence.json and
times.txt; a stage that has not run yet is left out.
"""

import json
import sys
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def last_with(rows: list[dict], key: str) -> dict:
    return next((row for row in reversed(rows) if key in row), {})


def reward_model_figures(run: Path, name: str) -> dict:
    rows = read_jsonl(run / name / "metrics.jsonl")
    first, last = next(row for row in rows if "val_accuracy" in row), last_with(rows, "val_accuracy")
    figures = {k: v for k, v in last.items() if k.startswith("val_")}
    return {"step": last["step"], "val_accuracy_at_step_0": first["val_accuracy"], **figures}


def greedy_rewards(run: Path) -> dict:
    """Held-out greedy mean R_c of the base model, the rejection-sampled one and the PPO one, and PPO's KL."""
    figures = {}
    base = run / "base-reward" / "metrics.jsonl"
    if base.is_file():
        figures["base"] = next(r["val_reward"] for r in read_jsonl(base) if "val_reward" in r)
    ppo = run / "ppo" / "metrics.jsonl"
    if ppo.is_file():
        rows = read_jsonl(ppo)
        evals = [r for r in rows if "val_reward" in r]
        figures["rejection_sampling"] = evals[0]["val_reward"]
        figures["ppo"] = evals[-1]["val_reward"]
        steps = [r for r in rows if "kl" in r]
        figures["ppo_kl_k1_max"] = max(r["kl"] for r in steps)
        figures["ppo_kl_k3_max"] = max(r["kl_k3"] for r in steps)
        figures["ppo_train_reward"] = [round(r["reward"], 4) for r in steps]
    return figures


def safety_figures(folder: Path) -> dict:
    """{task: {"metric", "value", "stderr"}} of a `llama2 eval safety --output-dir` folder."""
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    tasks = results["models"][0]["tasks"]
    return {t["task"]: {"metric": t["metric"], "value": t["value"], "stderr": t.get("stderr")} for t in tasks}


def summarize(run: Path) -> dict:
    summary: dict = {}
    for name in ("rm-helpful", "rm-safety"):
        if (run / name / "metrics.jsonl").is_file():
            summary[name] = reward_model_figures(run, name)
    summary["greedy_reward"] = greedy_rewards(run)
    for name in ("safety-base", "safety-final"):
        if (run / name / "results.json").is_file():
            summary[name] = safety_figures(run / name)
    if (run / "gatt" / "adherence.json").is_file():
        summary["gatt_adherence"] = json.loads((run / "gatt" / "adherence.json").read_text(encoding="utf-8"))
    if (run / "times.txt").is_file():
        summary["seconds"] = {
            line.split()[0]: int(line.split()[1]) for line in (run / "times.txt").read_text().splitlines() if line
        }
    return summary


if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    result = summarize(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result, indent=1))
