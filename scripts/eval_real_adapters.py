"""Grade the real model's adapters on their held-out prompts through loraserve's own engine.

Every held-out case of `demo/smollm2/heldout_cases.json` runs twice in one mixed batch: with its
task's adapter and on the base model alone (greedy, the chat template as an OpenAI chat request
gets it). Exact match against the one right answer; prints the README's table and writes
`demo/smollm2/eval_report.json`.

    nice -n 10 .venv/bin/python scripts/eval_real_adapters.py [--limit 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_tasks as rt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=50, help="held-out cases per task")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    # one thread: on a shared 2-core box a second thread mostly waits for the first at every barrier
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loraserve" / "models")
    args = ap.parse_args()

    from loraserve.adapters.peft_format import parse_peft_adapter
    from loraserve.engine.engine import Engine, EngineConfig
    from loraserve.engine.params import SamplingParams
    from loraserve.models.gguf import gguf_model_dir

    model_dir = gguf_model_dir(rt.gguf_path(), args.cache_dir)
    engine = Engine.from_pretrained(
        model_dir,
        EngineConfig(
            max_lora_rank=8, max_active_adapters=4, max_batch_total_tokens=8192, num_threads=args.threads
        ),
    )
    cases = json.loads((rt.REAL_DIR / "heldout_cases.json").read_text())["cases"]
    tasks = [t for t in rt.TASKS if (rt.REAL_DIR / "adapters" / t).is_dir()]
    adapters = {t: parse_peft_adapter(rt.REAL_DIR / "adapters" / t) for t in tasks}
    prompts, rows, owners = [], [], []
    for task in tasks:
        for case in cases[task][: args.limit]:
            chat = [{"role": "user", "content": case["input"]}]
            prompt = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
            for adapter in (adapters[task], None):
                prompts.append(prompt)
                rows.append(adapter)
                owners.append((task, adapter is not None, case["expected"]))
    start = time.time()
    results = engine.generate(prompts, SamplingParams(max_new_tokens=args.max_new_tokens), rows)
    seconds = time.time() - start
    report: dict = {"cases_per_task": args.limit, "seconds": round(seconds, 1), "tasks": {}}
    print("| adapter | held-out prompts | with the adapter | base model alone |")
    print("|---|---|---|---|")
    for task in tasks:
        score = {}
        for tuned in (True, False):
            got = [
                (r.generated_text.strip(), want)
                for r, (t, a, want) in zip(results, owners)
                if t == task and a == tuned
            ]
            score[tuned] = sum(g == w for g, w in got) / len(got)
            misses = [g for g, w in got if g != w][:3]
            report["tasks"].setdefault(task, {})["adapter" if tuned else "base"] = {
                "exact_match": score[tuned],
                "cases": len(got),
                "examples_wrong": misses,
            }
        n = report["tasks"][task]["adapter"]["cases"]
        print(f"| `{task}` | {n} | {score[True]:.0%} | {score[False]:.0%} |")
    (rt.REAL_DIR / "eval_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"({len(prompts)} sequences in one batch, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
