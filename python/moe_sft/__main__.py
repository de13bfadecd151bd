"""python -m moe_sft {demo, bench, version} | --cflags --libs --cmake-dir --pkgconfig-dir"""
import os
import sys

from . import _paths

BUILD_FLAGS = ("--cflags", "--libs", "--cmake-dir", "--pkgconfig-dir")


def build_info(flags):
    """What a C build needs, for each flag in order, as one line (like pkg-config): compile and link flags,
    or the folder of the CMake package / pkg-config file."""
    words = []
    for flag in flags:
        if flag == "--cflags":
            words.append(f"-I{_paths.get_include()}")
        elif flag == "--libs":
            # the rpath lets the program find the library in the installed package without LD_LIBRARY_PATH
            folder = os.path.dirname(_paths.get_library())
            words += [f"-L{folder}", "-lmoe_sft", f"-Wl,-rpath,{folder}"]
        elif flag == "--cmake-dir":
            words.append(_paths.get_cmake_dir())
        else:
            words.append(_paths.get_pkgconfig_dir())
    return " ".join(words)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m moe_sft {demo,bench,version} [options]\n"
              "       python -m moe_sft [--cflags] [--libs] [--cmake-dir] [--pkgconfig-dir]\n"
              "  demo             train LoRA adapters on a built-in synthetic MoE problem (loss must fall)\n"
              "  bench            moe_sft vs torch vs numpy on DeepSeek-V2-Lite / Qwen3-30B-A3B shapes\n"
              "  version          print package and library versions\n"
              "  --cflags         compiler flags for a C program that includes moe_sft.h\n"
              "  --libs           linker flags for libmoe_sft, with an rpath to the installed library\n"
              "  --cmake-dir      folder of moe_sftConfig.cmake: cmake -Dmoe_sft_DIR=...\n"
              "  --pkgconfig-dir  folder of moe_sft.pc: PKG_CONFIG_PATH=...")
        return 0
    if argv[0].startswith("--"):
        unknown = [a for a in argv if a not in BUILD_FLAGS]
        if unknown:
            print(f"unknown option {unknown[0]!r}; try python -m moe_sft --help", file=sys.stderr)
            return 2
        print(build_info(argv))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if command == "bench":
        from .bench import main as bench_main
        return bench_main(rest)
    if command == "version":
        import moe_sft
        print(f"moe_sft {moe_sft.__version__} (library {'.'.join(map(str, moe_sft.library_version()))}, "
              f"backend {moe_sft.backend()})")
        return 0
    print(f"unknown command {command!r}; try python -m moe_sft --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
