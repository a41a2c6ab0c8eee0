"""Train Medusa heads for the demo model by self-distillation (seeded, CPU, a minute or two).

    python scripts/train_medusa.py                                   # demo/model -> demo/medusa
    python scripts/train_medusa.py --adapter demo/adapters/upper \\
        --tasks upper --out demo/adapters/upper_medusa               # LoRA + Medusa adapter

Why self-distillation: the heads only pay off when their drafts match what the
served model itself would say next, so the training text is what the model
(with the adapter, if any) generates from demo prompts, and each head learns
the model's own distribution at its offset: head k at position t is trained
against softmax(lm_head(h[t+k+1])), the model's prediction of token t+k+2.
The base model is frozen, so its hidden states are computed once and the
heads train on cached tensors in seconds.

Heads are v2 (one residual block each, reusing the model's lm_head), saved in
the Medusa layout: `config.json` + `medusa_lm_head.safetensors`. The report
gives each head's top-1 agreement with the model on held-out generations and
the mean tokens per step a linear-chain greedy speculator would accept.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_tasks as dt  # noqa: E402

CHAT_NEW_TOKENS = 48
TEXT_NEW_TOKENS = 96


# ---- data: prompts -> the model's own continuations -> hidden states ----------------------------


def make_prompts(
    rng: random.Random, tasks: list[str], n_chat: int, n_text: int, split: str
) -> tuple[list[str], list[str]]:
    """Chat turns of the demo tasks, and grammar text cut after a few words (long continuations)."""
    chat = [dt.prompt(dt.sample_input(rng.choice(tasks), rng, split=split)) for _ in range(n_chat)]
    text = []
    for _ in range(n_text):
        words = dt.lm_document(rng).split(" ")
        text.append(" ".join(words[: rng.randint(1, 6)]))
    return chat, text


@torch.no_grad()
def generate(
    model, tok, prompts: list[str], max_new_tokens: int, sample: bool, seed: int, batch: int = 256
) -> list[tuple[list[int], int]]:
    """(token ids incl. EOS, prompt length) per prompt, greedy or sampled at temperature 1."""
    pad, eos = tok.token_to_id(dt.PAD), tok.token_to_id(dt.EOS)
    how = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    out: list[tuple[list[int], int]] = []
    for start in range(0, len(prompts), batch):
        rows = [tok.encode(p).ids for p in prompts[start : start + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        torch.manual_seed(seed + start)
        gen = model.generate(
            input_ids=ids,
            attention_mask=(ids != pad).long(),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            **how,
        )
        for row, new in zip(rows, gen[:, width:].tolist(), strict=True):
            new = new[: new.index(eos) + 1] if eos in new else new
            out.append((row + new, len(row)))
    return out


def self_distillation_text(
    model, tok, prompts: tuple[list[str], list[str]], sample_frac: float, seed: int
) -> list[tuple[list[int], int]]:
    """The model's own continuations: mostly greedy (what greedy requests see), `sample_frac`
    sampled, which puts the heads on paths sampled requests take; the target stays the model's
    distribution either way."""
    seqs: list[tuple[list[int], int]] = []
    for kind, (items, new_tokens) in enumerate(zip(prompts, (CHAT_NEW_TOKENS, TEXT_NEW_TOKENS), strict=True)):
        n_sampled = round(len(items) * sample_frac)
        seqs += generate(model, tok, items[n_sampled:], new_tokens, False, seed + 7 * kind)
        if n_sampled:
            seqs += generate(model, tok, items[:n_sampled], new_tokens, True, seed + 7 * kind + 1)
    return seqs


@torch.no_grad()
def hidden_states(model, seqs: list[tuple[list[int], int]], pad: int, batch: int = 256) -> list[torch.Tensor]:
    """Final (normed) hidden states per sequence; right padding leaves real positions untouched."""
    out: list[torch.Tensor] = []
    for start in range(0, len(seqs), batch):
        chunk = [s for s, _ in seqs[start : start + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
        h = model.model(
            input_ids=ids,
            attention_mask=(
                torch.arange(width)[None] < torch.tensor([len(s) for s in chunk])[:, None]
            ).long(),
        ).last_hidden_state
        out.extend(h[i, : len(s)].clone() for i, s in enumerate(chunk))
    return out


def positions(seqs: list[tuple[list[int], int]], num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of draft positions t (from the last prompt token on) and how many heads have a target.

    Head k at t needs the model's prediction at j = t + k + 1, which exists while j + 1 < len(seq).
    """
    flat, valid, offset = [], [], 0
    for seq, plen in seqs:
        n = len(seq)
        for t in range(plen - 1, n - 2):
            flat.append(offset + t)
            valid.append(min(num_heads, n - 2 - t))
        offset += n
    return torch.tensor(flat), torch.tensor(valid)


# ---- heads ----------------------------------------------------------------------------------------


def head_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """[B, H] -> [K, B, V]: x + SiLU(W_k x + b_k), then the shared lm_head (the v2 head)."""
    x = h.unsqueeze(0) + F.silu(
        torch.baddbmm(b.unsqueeze(1), h.unsqueeze(0).expand(w.shape[0], -1, -1), w.transpose(1, 2))
    )
    return x @ lm_head.T


def train_heads(
    hid: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    lm_head: torch.Tensor,
    num_heads: int,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hsz = hid.shape[1]
    # Zero init (as the Medusa project does): every head starts as "repeat the base prediction".
    w = torch.zeros(num_heads, hsz, hsz, requires_grad=True)
    b = torch.zeros(num_heads, hsz, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.02, 1 - s / steps)
    )
    ks = torch.arange(num_heads)[:, None]
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(pos), (batch,), generator=g)
        t, v = pos[idx], valid[idx]
        mask = ks < v[None]  # [K, B]
        target_rows = (t[None] + ks + 1).clamp(max=hid.shape[0] - 1)
        with torch.no_grad():
            teacher = torch.softmax(hid[target_rows] @ lm_head.T, dim=-1)  # [K, B, V]
        logp = torch.log_softmax(head_logits(hid[t], w, b, lm_head), dim=-1)
        loss = -((teacher * logp).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            print(f"[medusa] step {step:5d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return w.detach(), b.detach()


@torch.no_grad()
def evaluate(
    hid: list[torch.Tensor],
    seqs: list[tuple[list[int], int]],
    w: torch.Tensor,
    b: torch.Tensor,
    lm_head: torch.Tensor,
) -> dict | None:
    """Per-head top-1 agreement with the model, and greedy tokens/step of a linear draft chain.

    On greedy text the model's argmax at j is the sequence's token j+1, so head k at t is
    right when it names seq[t+k+2]; a step accepts the drafts up to the first miss, plus
    the model's own token.
    """
    if not seqs:
        return None
    k = w.shape[0]
    hits, totals = torch.zeros(k), torch.zeros(k)
    steps = tokens = 0
    for h, (seq, plen) in zip(hid, seqs, strict=True):
        drafts = head_logits(h, w, b, lm_head).argmax(-1).T.tolist()  # [T, K]
        n = len(seq)
        for t in range(plen - 1, n - 2):
            for j in range(min(k, n - 2 - t)):
                totals[j] += 1
                hits[j] += drafts[t][j] == seq[t + j + 2]
        t = plen - 1
        while t < n - 1:  # position t has produced seq[t+1]; drafts cover seq[t+2..]
            acc = 0
            while acc < k and t + acc + 2 < n and drafts[t][acc] == seq[t + acc + 2]:
                acc += 1
            steps, tokens, t = steps + 1, tokens + 1 + acc, t + 1 + acc
    return {
        "head_top1": [round(float(x), 4) for x in hits / totals.clamp(min=1)],
        "positions": [int(x) for x in totals],
        "tokens_per_step": round(tokens / max(1, steps), 3),
    }


def save_heads(out: Path, w: torch.Tensor, b: torch.Tensor, base_model: str, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(w.shape[0]):
        tensors[f"{i}.0.linear.weight"] = w[i].contiguous()
        tensors[f"{i}.0.linear.bias"] = b[i].contiguous()
    save_file(tensors, str(out / "medusa_lm_head.safetensors"))
    config = {
        "medusa_num_heads": int(w.shape[0]),
        "medusa_num_layers": 1,
        "version": 2,
        "base_model_name_or_path": base_model,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")


def load_model(model_dir: Path, adapter: Path | None):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("demo/model"))
    ap.add_argument(
        "--adapter", type=Path, default=None, help="LoRA to train heads for (LoRA + Medusa output)"
    )
    ap.add_argument("--out", type=Path, default=Path("demo/medusa"))
    ap.add_argument("--tasks", default=",".join(dt.TASKS), help="chat tasks whose prompts are used")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--chat-prompts", type=int, default=4096)
    ap.add_argument("--text-prompts", type=int, default=512)
    ap.add_argument(
        "--sample-frac", type=float, default=0.25, help="share of sampled (not greedy) continuations"
    )
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from tokenizers import Tokenizer

    t0 = time.time()
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    pad = tok.token_to_id(dt.PAD)
    model = load_model(args.model, args.adapter)
    lm_head = model.get_output_embeddings().weight.detach()
    tasks = [t for t in args.tasks.split(",") if t]
    rng = random.Random(args.seed)
    train_prompts = make_prompts(rng, tasks, args.chat_prompts, args.text_prompts, "train")
    train_seqs = self_distillation_text(model, tok, train_prompts, args.sample_frac, args.seed)
    held_rng = random.Random(args.seed + 10_000)
    held_prompts = make_prompts(held_rng, tasks, args.chat_prompts // 8, args.text_prompts // 8, "heldout")
    held_seqs = self_distillation_text(model, tok, held_prompts, 0.0, args.seed + 1)
    print(
        f"[medusa] generated {len(train_seqs)} + {len(held_seqs)} sequences ({time.time() - t0:.0f}s)",
        flush=True,
    )
    train_hid = hidden_states(model, train_seqs, pad)
    held_hid = hidden_states(model, held_seqs, pad)
    pos, valid = positions(train_seqs, args.heads)
    print(f"[medusa] {len(pos)} training positions ({time.time() - t0:.0f}s)", flush=True)
    w, b = train_heads(
        torch.cat(train_hid), pos, valid, lm_head, args.heads, args.steps, args.lr, args.batch, args.seed
    )
    n_chat = len(held_prompts[0])  # held-out sequences: chat turns first, then text
    report = {
        "heldout_all": evaluate(held_hid, held_seqs, w, b, lm_head),
        "heldout_chat": evaluate(held_hid[:n_chat], held_seqs[:n_chat], w, b, lm_head),
        "heldout_text": evaluate(held_hid[n_chat:], held_seqs[n_chat:], w, b, lm_head),
        "untrained_heads": evaluate(held_hid, held_seqs, torch.zeros_like(w), torch.zeros_like(b), lm_head),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    base_name = str(args.model)
    if args.adapter is not None:  # LoRA + Medusa: the adapter's files beside its heads
        args.out.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(args.adapter / f, args.out / f)
        base_name = (
            json.loads((args.adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
            or base_name
        )
    save_heads(args.out, w, b, base_name, report)
    report["seconds"] = round(time.time() - t0)
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=1))


if __name__ == "__main__":
    main()
