"""python -m moe_sft {demo, version}"""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m moe_sft {demo,version} [options]\n"
              "  demo     train LoRA adapters on a built-in synthetic MoE problem (loss must fall)\n"
              "  version  print package and library versions")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if command == "version":
        import moe_sft
        print(f"moe_sft {moe_sft.__version__} (library {'.'.join(map(str, moe_sft.library_version()))}, "
              f"backend {moe_sft.backend()})")
        return 0
    print(f"unknown command {command!r}; try python -m moe_sft --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
