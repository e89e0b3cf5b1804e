"""Course tooling: ``python -m fac_mini <command>``.

  data build [--out DIR] [--cache DIR] [--seed N]   synthesise the speech corpus and train the text tokenizer
  data check                                        verify shipped files against the manifest
  exercises [--check]                               write notebooks/ from solutions/ (or fail if stale)
  m0 train|eval [...]                               train / evaluate the text LLM M0 (data/m0)
  speech-tokenizer train|eval [...]                 train / evaluate the 25 Hz speech tokenizer (data/speech_tokenizer)
  bench drsr [--json] [...]                         time a training step: 25 Hz baseline vs 5 Hz DRSR
  bench load [--json] [--size-gb G] [--dtype D]     peak memory and time of load_released on a >= 1 GB checkpoint
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _data_build(args) -> int:
    from .corpus import build_corpus
    from .tokenizer import TOKENIZER_DIR, train_tokenizer

    manifest = build_corpus(args.out, args.cache, seed=args.seed)
    tokenizer_dir = Path(args.tokenizer_out) if args.tokenizer_out else TOKENIZER_DIR
    train_tokenizer(seed=args.seed).save_pretrained(str(tokenizer_dir))
    summary = {split: info for split, info in manifest["splits"].items()}
    print(json.dumps({"utterances": manifest["utterances"], "duration_min": round(manifest["duration_s"] / 60, 1),
                      "splits": summary, "build_seconds": manifest["build_seconds"],
                      "corpus": str(args.out), "tokenizer": str(tokenizer_dir)}, indent=1))
    return 0


def _data_check(args) -> int:
    from .corpus import file_sha256, read_manifest

    manifest = read_manifest(args.out)
    bad = [name for name, digest in manifest["shipped_files_sha256"].items()
           if not (Path(args.out) / name).is_file() or file_sha256(Path(args.out) / name) != digest]
    if bad:
        print(f"{len(bad)} shipped files are missing or differ from the manifest, e.g. {bad[0]}", file=sys.stderr)
        return 1
    print(f"ok: {len(manifest['shipped_files_sha256'])} shipped files match the manifest")
    return 0


def _exercises(args) -> int:
    from .exercises import check_notebooks, write_notebooks

    if args.check:
        stale = check_notebooks()
        if stale:
            print("notebooks/ is stale against solutions/ (run `python -m fac_mini exercises`):", file=sys.stderr)
            for name in stale:
                print(f"  {name}", file=sys.stderr)
            return 1
        print("notebooks/ is in sync with solutions/")
        return 0
    for path in write_notebooks():
        print(f"wrote {path}")
    return 0


# Commands whose own module parses the rest of the command line:
# command -> {action: (module, function, whether the function also receives the action word)}.
DELEGATED = {
    "m0": {"train": ("fac_mini.m0", "main_train", False), "eval": ("fac_mini.m0", "main_eval", False)},
    "speech-tokenizer": {"train": ("fac_mini.speech_tokenizer", "main_train", False),
                         "eval": ("fac_mini.speech_tokenizer", "main_eval", False)},
    "srh": {"train": ("fac_mini.srh_study", "main_train", False), "eval": ("fac_mini.srh_study", "main_eval", False)},
    "bench": {"drsr": ("fac_mini.bench", "main_bench", True),
              "load": ("fac_mini.released", "main_bench_load", False)},
}


def _delegate(argv: list[str]) -> int | None:
    if not argv or argv[0] not in DELEGATED:
        return None
    import importlib

    actions = DELEGATED[argv[0]]
    if len(argv) < 2 or argv[1] not in actions:
        print(f"usage: python -m fac_mini {argv[0]} {{{','.join(actions)}}} [options]", file=sys.stderr)
        return 2
    module_name, function_name, keep_action = actions[argv[1]]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv[1:] if keep_action else argv[2:]) or 0)


def main(argv: list[str] | None = None) -> int:
    from .corpus import CACHE_CORPUS_DIR, CORPUS_DIR

    argv = sys.argv[1:] if argv is None else argv
    delegated = _delegate(argv)
    if delegated is not None:
        return delegated

    parser = argparse.ArgumentParser(prog="python -m fac_mini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build or check the course data").add_subparsers(dest="action", required=True)
    build = data.add_parser("build", help="synthesise the speech corpus and train the text tokenizer")
    build.add_argument("--out", default=str(CORPUS_DIR), help="corpus folder (shipped split, metadata, manifest)")
    build.add_argument("--cache", default=str(CACHE_CORPUS_DIR), help="folder for the splits not kept in git")
    build.add_argument("--tokenizer-out", default=None, help="tokenizer folder (default data/tokenizer)")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(handler=_data_build)
    check = data.add_parser("check", help="verify the shipped corpus files against the manifest")
    check.add_argument("--out", default=str(CORPUS_DIR))
    check.set_defaults(handler=_data_check)

    exercises = commands.add_parser("exercises", help="generate notebooks/ from solutions/")
    exercises.add_argument("--check", action="store_true", help="fail if notebooks/ differs from what would be written")
    exercises.set_defaults(handler=_exercises)
    for name, actions in DELEGATED.items():
        commands.add_parser(name, help=f"{'/'.join(actions)} (see python -m fac_mini {name} <action> --help)")

    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
