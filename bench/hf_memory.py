"""Resident memory of a Transformers MoE model whose experts run on moe_sft (python bench/hf_memory.py).

Writes a bf16 Qwen3-MoE checkpoint of a few hundred MB into a temporary directory (or --dir), then measures,
each in a fresh process (the RSS of /proc/self/status; "growth" = above the process after importing torch,
transformers and moe_sft.hf):
  pack    AutoModelForCausalLM.from_pretrained(..., experts_implementation="moe_sft"), then add_lora: the experts
          are loaded into torch by Transformers, packed into moe_sft layers and released from torch. Resident
          after that against the non-expert bytes + the packed expert bytes (the bf16 expert bytes: packing
          keeps their size).
  stream  moe_sft.hf.from_pretrained + add_lora: the experts go from the safetensors files straight into the
          layers. Peak resident (VmHWM) against the final resident.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

SHAPE = dict(vocab_size=16384, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_experts=32,
             num_experts_per_tok=4, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             tie_word_embeddings=False)


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def write_checkpoint(directory):
    import torch
    import transformers
    config = transformers.Qwen3MoeConfig(**SHAPE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)


def child(mode, directory):
    import torch
    import transformers
    import moe_sft.hf as mh
    gc.collect()
    base = status("VmRSS")
    if mode == "pack":
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                                  experts_implementation="moe_sft")
        loaded = status("VmRSS")
    else:
        model = mh.from_pretrained(directory, dtype=torch.bfloat16)
        loaded = status("VmRSS")
    mh.add_lora(model, 16, 32)
    gc.collect()
    final, peak = status("VmRSS"), status("VmHWM")
    c = model.config
    E, H, I, L = c.num_experts, c.hidden_size, c.moe_intermediate_size, len(mh.experts_modules(model))
    expert_bytes = 3 * E * H * I * 2 * L
    lora_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".moe_sft." in n)
    non_expert = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".moe_sft." not in n)
    non_expert += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".moe_sft." not in n)
    with torch.no_grad():  # it runs
        model(torch.randint(0, c.vocab_size, (1, 8)))
    print(json.dumps(dict(base=base, loaded=loaded, final=final, peak=peak, expert_bytes=expert_bytes,
                          lora_bytes=lora_bytes, non_expert_bytes=non_expert)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="checkpoint directory to write and read (default: a temporary one)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or os.path.join(tmp, "checkpoint")
        if not os.path.isdir(directory) or not os.listdir(directory):
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                            f"import hf_memory; hf_memory.write_checkpoint({directory!r})"], check=True)
        size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        print(f"checkpoint: {size / 2**20:.0f} MiB in {directory} (Qwen3-MoE, {SHAPE['num_hidden_layers']} layers, "
              f"{SHAPE['num_experts']} experts, H={SHAPE['hidden_size']}, I={SHAPE['moe_intermediate_size']}, bf16)")
        MiB = 2 ** 20
        for mode in ("pack", "stream"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, directory], check=True,
                                 capture_output=True, text=True).stdout
            m = json.loads(out.strip().splitlines()[-1])
            growth, peak_growth = m["final"] - m["base"], m["peak"] - m["base"]
            want = m["non_expert_bytes"] + m["expert_bytes"] + m["lora_bytes"]
            print(f"{mode:6s} imports {m['base'] / MiB:.0f} MiB; after load {(m['loaded'] - m['base']) / MiB:.0f} MiB; "
                  f"final {growth / MiB:.0f} MiB = {growth / want:.3f}x (non-expert {m['non_expert_bytes'] / MiB:.0f} + "
                  f"packed experts {m['expert_bytes'] / MiB:.0f} + LoRA {m['lora_bytes'] / MiB:.0f} MiB); "
                  f"peak {peak_growth / MiB:.0f} MiB = {peak_growth / growth:.3f}x final "
                  f"(whole process: {m['peak'] / m['final']:.3f}x)")


if __name__ == "__main__":
    main()
