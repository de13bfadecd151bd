"""Fine-tune the routed experts of a Transformers MoE model with moe_sft, save the adapter, reload it in PEFT.

    python examples/finetune_hf.py [--steps 300] [--out DIR]

A tiny random Qwen3-MoE (2 layers, 8 experts, top-2) made from a config, no hub access. It is trained on
next-byte prediction over a small text this script generates (sentences from a little grammar), with LoRA on
every routed expert (moe_sft, the experts on the CPU) and torch.optim.AdamW; nothing else is trained. At the end
the adapter is saved in PEFT's format, loaded with peft.PeftModel.from_pretrained onto the plain Transformers
model (eager experts, no moe_sft), and both give the same logits (to the bf16 rounding moe_sft computes in) when
the PEFT model's routers replay the choices made in the moe_sft run (see record_routing for why);
moe_sft.hf.load_adapter into a fresh model gives the trained model's logits bit for bit. Exits 0 when the loss
fell and the logits agree. torch.manual_seed makes a run reproducible (add_lora's init draws from torch's RNG).
"""
import argparse
import contextlib
import copy
import random
import sys
import tempfile
import warnings

import torch
import transformers
import peft

import moe_sft.hf


def make_text(n_sentences, seed=0):
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my sister", "the old man", "every child", "the robot"]
    verbs = ["sees", "likes", "follows", "draws", "finds", "carries"]
    objects = ["a red ball", "the moon", "two apples", "the blue door", "a small boat", "his hat"]
    places = ["in the garden", "at night", "near the river", "on monday", "under the tree"]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(places)}."
                    for _ in range(n_sentences))


def make_model(seed=0):
    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")


def batches(data, batch_size, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - length, (batch_size,), generator=gen)
        yield torch.stack([data[s:s + length] for s in starts.tolist()])


@contextlib.contextmanager
def record_routing(model, routed, replay=False):
    """Records each MoE block's router output (logits, weights, expert indices) in ``routed`` by layer name, or
    with ``replay`` makes each router return the recorded one instead of its own.

    Why: a tiny random model's router gives near-uniform probabilities, so some token's 2nd and 3rd experts are
    often a hair apart, and the f32 eager experts and moe_sft's bf16 arithmetic (the layer before) break that tie
    differently; such a token then goes to another expert and its logits differ by much more than rounding.
    Replaying one model's routing in the other compares the adapters themselves, token for token."""
    def hook(name):
        def on_output(module, args, output):
            if replay:
                return routed[name]
            routed[name] = output
        return on_output
    handles = [m.register_forward_hook(hook(n.removeprefix("base_model.model.")))
               for n, m in model.named_modules() if n.endswith("mlp.gate")]
    if not handles:
        raise RuntimeError("record_routing: the model has no router (no module named *.mlp.gate)")
    try:
        yield routed
    finally:
        for h in handles:
            h.remove()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--out", help="adapter directory (default: a fresh temporary directory)")
    args = ap.parse_args(argv)

    data = torch.tensor(list(make_text(2000).encode()), dtype=torch.long)
    base = make_model()                         # the plain Transformers model (eager experts)
    model = copy.deepcopy(base)
    lora = moe_sft.hf.add_lora(model, r=args.rank, alpha=args.alpha)   # experts now run on moe_sft
    print(f"moe_sft LoRA: {len(lora)} parameters, {sum(p.numel() for p in lora.values()):,} values, e.g. "
          f"{next(iter(lora))} {list(next(iter(lora.values())).shape)}")
    opt = torch.optim.AdamW(lora.values(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    model.train()
    losses = []
    for step, ids in zip(range(args.steps), batches(data, args.batch, args.length)):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.values(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    n = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    print(f"loss {first:.4f} -> {last:.4f} (mean of the first and last {n} steps)")

    # PEFT converts a per-expert adapter to Transformers 5's fused experts (gate_up's rank and alpha doubled by
    # a rank_pattern) and warns that the pattern matched nothing; the converted ranks do apply (the logits agree)
    warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
    out = args.out or tempfile.mkdtemp(prefix="moe_sft_hf_adapter_")
    moe_sft.hf.save_adapter(model, out)
    model.eval()
    probe = next(batches(data, 2, args.length, seed=1))
    with torch.no_grad():
        routed = {}
        with record_routing(model, routed):
            trained = model(probe).logits
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        routed_peft = {}
        with record_routing(in_peft, routed_peft):
            free = in_peft(probe).logits
        with record_routing(in_peft, routed, replay=True):
            replayed = in_peft(probe).logits
        again = copy.deepcopy(base)
        moe_sft.hf.add_lora(again, r=args.rank, alpha=args.alpha)
        moe_sft.hf.load_adapter(again, out)
        reloaded = again.eval()(probe).logits
    rerouted = sum(int((routed[n][2].sort(-1).values != routed_peft[n][2].sort(-1).values).any(-1).sum())
                   for n in routed)
    tokens = probe.numel()
    diff = (replayed - trained).abs().max().item()
    scale = trained.abs().max().item()
    print(f"adapter saved in {out}; PEFT on the plain model, its routers' choices replayed from moe_sft's run: "
          f"max |logit diff| {diff:.2e} (logits up to {scale:.2f}); routed on their own: "
          f"{(free - trained).abs().max().item():.2e}, {rerouted} of {tokens} tokens x {len(routed)} layers sent "
          f"to other experts (near-ties)")
    print(f"moe_sft.hf.load_adapter: {'identical' if torch.equal(reloaded, trained) else 'DIFFERENT'}")
    ok = (last < first and diff <= 2e-2 * scale and rerouted <= tokens * len(routed) // 10
          and torch.equal(reloaded, trained))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
