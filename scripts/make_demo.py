"""Build the bundled demo: a tokenizer, a tiny Llama base model and three LoRA adapters.

Runs offline on CPU in a few minutes (`make demo-assets`). The base model
learns a toy English grammar plus a chat format in which the assistant echoes
the user; each adapter then learns one mapping on that same format:

    <|user|>hello<|assistant|>   base: hello   reverse: olleh   upper: HELLO
    <|user|>12 + 30<|assistant|> base: 12 + 30 add: 42

Training on the format but not the mappings keeps the adapters small and makes
the demo obvious: one prompt, different answers per adapter.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_tasks as dt  # noqa: E402


def pad_batch(rows: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch from (token ids, first labelled position) rows: the loss
    covers only positions from that start (the answer), padding is masked out."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, start) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start : len(row)] = torch.tensor(row[start:])
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def greedy_ids(model, rows: list[list[int]], pad: int, eos: int, max_new_tokens: int) -> list[list[int]]:
    """Batched greedy generation with transformers (the prompts left-padded with `pad`): each
    row's new token ids, cut before the first `eos`."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    return [row[: row.index(eos)] if eos in row else row for row in gen[:, width:].tolist()]


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
# Letters and digits stay single tokens (with an optional leading space) so a
# one-million-parameter model can spell, reverse and add; punctuation runs,
# spaces and multi-byte characters still get real BPE merges.
PRETOKENIZE_PATTERN = r" ?[A-Za-z]| ?\d| ?[^\sA-Za-z\d]+|\s+"
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS_RATE = 0.85  # some training rows lack BOS so prompts work with or without add_special_tokens
HELDOUT_PER_TASK = 30
# Addition leans on the base model's prose arithmetic and needs longer to reach 90% held-out.
ADAPTER_STEPS = {"reverse": 300, "upper": 300, "add": 1200}


def build_tokenizer(out: Path, seed: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=dt.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(dt.tokenizer_corpus(random.Random(seed)), trainer)
    bos_id = tok.token_to_id(dt.BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{dt.BOS} $A", pair=f"{dt.BOS} $A {dt.BOS} $B", special_tokens=[(dt.BOS, bos_id)]
    )
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": dt.BOS,
        "eos_token": dt.EOS,
        "unk_token": dt.UNK,
        "pad_token": dt.PAD,
        "additional_special_tokens": [dt.SYSTEM, dt.USER, dt.ASSISTANT],
        "model_max_length": MODEL_SHAPE["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok


class Encoder:
    """Turns (prompt, answer) pairs into padded training batches with the loss on the answer."""

    def __init__(self, tok, rng: random.Random) -> None:
        self.tok = tok
        self.rng = rng
        self.bos = tok.token_to_id(dt.BOS)
        self.eos = tok.token_to_id(dt.EOS)
        self.pad = tok.token_to_id(dt.PAD)

    def ids(self, text: str) -> list[int]:
        prefix = [self.bos] if self.rng.random() < BOS_RATE else []
        return prefix + self.tok.encode(text, add_special_tokens=False).ids

    def pair(self, prompt: str, answer: str, loss_on_prompt: bool) -> tuple[list[int], int]:
        p = self.ids(prompt)
        a = self.tok.encode(answer, add_special_tokens=False).ids + [self.eos]
        return p + a, (0 if loss_on_prompt else len(p))

    def batch(self, rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        return pad_batch(rows, self.pad)


def train(model, params, steps: int, lr: float, next_batch, label: str) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps)
    )
    model.train()
    start = time.time()
    for step in range(steps):
        loss = model(**next_batch(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"[{label}] step {step:4d} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()


def train_base(tok, out: Path, seed: int, steps: int):
    import transformers

    torch.manual_seed(seed)
    enc = Encoder(tok, random.Random(seed + 1))
    vocab = (tok.get_vocab_size() + 63) // 64 * 64
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        bos_token_id=enc.bos,
        eos_token_id=enc.eos,
        pad_token_id=enc.pad,
        **MODEL_SHAPE,
    )
    model = transformers.LlamaForCausalLM(config)
    rng = random.Random(seed + 2)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        if step % 3 == 0:  # plain text: the model should write plausible grammar
            rows = [(enc.ids(dt.lm_document(rng))[:128], 0) for _ in range(8)]
        elif step % 3 == 1:
            rows = [(enc.ids(dt.math_document(rng)), 0) for _ in range(32)]
        else:  # chat turns in which the assistant echoes the user
            rows = [enc.pair(*dt.echo_example(rng), loss_on_prompt=True) for _ in range(48)]
        return enc.batch(rows)

    train(model, list(model.parameters()), steps, 3e-3, next_batch, "base")
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=enc.bos, eos_token_id=enc.eos, pad_token_id=enc.pad
    )
    model.save_pretrained(out, safe_serialization=True)
    return model


def train_adapter(
    base, tok, task: str, out: Path, seed: int, steps: int, rank: int, lr: float = 5e-3
) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(base, cfg)
    enc = Encoder(tok, random.Random(seed + 1))
    rng = random.Random(seed + 2)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        rows = [enc.pair(*dt.task_example(task, rng), loss_on_prompt=False) for _ in range(32)]
        return enc.batch(rows)

    params = [p for p in model.parameters() if p.requires_grad]
    train(model, params, steps, lr, next_batch, task)
    model.peft_config["default"].base_model_name_or_path = "demo/model"  # not the build machine's path
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    model.unload()  # hand the untouched base back for the next adapter


def write_heldout(out: Path, seed: int) -> dict[str, list[tuple[str, str]]]:
    cases = {t: dt.heldout_cases(t, HELDOUT_PER_TASK, seed) for t in dt.TASKS}
    doc = {
        "prompt_format": dt.prompt("{input}"),
        "rule": f"crc32(input) % {dt.HELD_OUT_MODULUS} == 0 is never trained on",
        "cases": {
            t: [{"input": i, "prompt": dt.prompt(i), "expected": a} for i, a in c] for t, c in cases.items()
        },
    }
    (out / "heldout_cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    return cases


def greedy(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Batched greedy answers (left padding), cut at EOS."""
    pad, eos = tok.token_to_id(dt.PAD), tok.token_to_id(dt.EOS)
    rows = greedy_ids(model, [tok.encode(p).ids for p in prompts], pad, eos, max_new_tokens)
    return [tok.decode(row, skip_special_tokens=True) for row in rows]


def accuracy(model, tok, cases: list[tuple[str, str]]) -> float:
    got = greedy(model, tok, [dt.prompt(i) for i, _ in cases], max_new_tokens=40)
    return sum(g == a for g, (_, a) in zip(got, cases, strict=True)) / len(cases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--adapter-steps", type=int, default=None, help="override ADAPTER_STEPS for all tasks")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=list(dt.TASKS), choices=dt.TASKS)
    ap.add_argument("--reuse-base", action="store_true", help="keep OUT/model and only retrain adapters")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model_dir = args.out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    if args.reuse_base:
        import transformers
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        tok = build_tokenizer(model_dir, args.seed)
        base = train_base(tok, model_dir, args.seed, args.base_steps)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; base ready after {time.time() - t0:.0f}s", flush=True)
    cases = write_heldout(args.out, args.seed)
    report: dict = {"base": {t: accuracy(base, tok, c) for t, c in cases.items()}}
    for task in args.tasks:
        from peft import PeftModel

        adir = args.out / "adapters" / task
        seed = args.seed + 10 * (dt.TASKS.index(task) + 1)
        steps = args.adapter_steps or ADAPTER_STEPS[task]
        train_adapter(base, tok, task, adir, seed, steps, args.rank)
        lora = PeftModel.from_pretrained(base, adir)
        report[task] = accuracy(lora, tok, cases[task])
        lora.unload()
    report["seconds"] = round(time.time() - t0)
    print(json.dumps(report, indent=1))
    (args.out / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
