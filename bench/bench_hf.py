"""moe_sft through Transformers' experts interface vs Transformers' own experts with PEFT LoRA (python bench/bench_hf.py).

One DeepSeek-V2-Lite-shaped routed-experts module (DeepseekV2Experts: E=64, H=2048, I=1408, top-6; LoRA r=16 on
gate, up and down), bf16, forward + backward (grads of the input, the routing weights and the LoRA), side by
side in one run, medians of --reps timed runs after one warm-up, a fresh uniform random routing per run:
  moe_sft (HF)   experts_implementation "moe_sft" after moe_sft.hf.add_lora: the module's forward, autograd
  raw layer      the same packed layer called through the numpy API (forward + backward), no torch
  grouped_mm     Transformers' grouped_mm experts with PEFT target_parameters LoRA (gate_up_proj, down_proj)
  eager          Transformers' eager experts (per-expert loop) with the same PEFT LoRA
"overhead" = moe_sft (HF) / raw layer - 1: what the torch and Transformers wrapping adds.
"""
import argparse
import copy
import statistics
import time

import torch
import transformers
import peft

import moe_sft
import moe_sft.hf as mh

E, H, I, K, RANK = 64, 2048, 1408, 6, 16


class Block(torch.nn.Module):
    """A container, so that PEFT and moe_sft.hf find the experts module as they would in a model."""

    def __init__(self, config):
        super().__init__()
        self.experts = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Experts(config)

    def forward(self, x, ids, w):
        return self.experts(x, ids, w)


def make_block(config, seed):
    block = Block(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (block.experts.gate_up_proj, block.experts.down_proj):
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return block.to(torch.bfloat16)


def routing(T, gen):
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=gen), -1)
    return ids, w


def timed(fn, reps, T, seed):
    gen = torch.Generator().manual_seed(seed)
    times = []
    for i in range(reps + 1):
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
        ids, w = routing(T, gen)
        g = torch.randn(T, H, generator=gen).to(torch.bfloat16)
        start = time.perf_counter()
        fn(x, ids, w, g)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def torch_step(block):
    def run(x, ids, w, g):
        x = x.requires_grad_(True)
        w = w.requires_grad_(True)
        block(x, ids, w).backward(g)
    return run


def raw_step(layer):
    def run(x, ids, w, g):
        xb = x.view(torch.int16).numpy().view(moe_sft.bfloat16)
        layer.forward(xb, ids.numpy(), w.numpy(), save_for_backward=True)
        layer.backward(g.view(torch.int16).numpy().view(moe_sft.bfloat16))
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager experts (slowest)")
    ap.add_argument("--no-grouped-mm", action="store_true", help="skip the grouped_mm experts")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = transformers.DeepseekV2Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                                           num_experts_per_tok=K, hidden_act="silu")
    ours = make_block(config, 0)
    mh.add_lora(ours, RANK, 2 * RANK, lora_dtype=torch.bfloat16)
    with torch.no_grad():
        for p in ours.experts.moe_sft.parameters():  # B nonzero: the LoRA path does real work
            p.normal_(0, 0.01)
    layer = ours.experts.moe_sft.layer
    lora_config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_parameters=["experts.gate_up_proj",
                                                                                  "experts.down_proj"])
    reference_config = copy.deepcopy(config)  # the experts module reads its implementation from its config
    reference = peft.get_peft_model(make_block(reference_config, 0), lora_config)
    rows = [("moe_sft (HF)", torch_step(ours), None), ("raw layer", raw_step(layer), None)]
    if not args.no_grouped_mm:
        rows.append(("grouped_mm", torch_step(reference), "grouped_mm"))
    if not args.no_eager:
        rows.append(("eager", torch_step(reference), "eager"))
    print(f"DeepSeek-V2-Lite-shaped experts (E={E}, H={H}, I={I}, k={K}, r={RANK}), bf16, forward+backward, "
          f"median of {args.reps} ms; moe_sft layer isa={layer.isa}, torch threads={torch.get_num_threads()}")
    results = {}
    for T in args.tokens:
        for name, fn, implementation in rows:
            if implementation is not None:
                reference_config._experts_implementation = implementation
            results[(name, T)] = timed(fn, args.reps, T, seed=T)
            print(f"  T={T} {name}: {results[(name, T)]:.1f} ms", flush=True)
    print("| T | moe_sft (HF) ms | raw layer ms | overhead | grouped_mm + PEFT ms | x | eager + PEFT ms | x |")
    print("|---|---|---|---|---|---|---|---|")
    for T in args.tokens:
        ours_ms, raw_ms = results[("moe_sft (HF)", T)], results[("raw layer", T)]

        def cells(name):
            ms = results.get((name, T))
            return f"{ms:.1f} | {ms / ours_ms:.2f}" if ms else "- | -"
        print(f"| {T} | {ours_ms:.1f} | {raw_ms:.1f} | {100 * (ours_ms / raw_ms - 1):+.1f}% | {cells('grouped_mm')} | "
              f"{cells('eager')} |")


if __name__ == "__main__":
    main()
