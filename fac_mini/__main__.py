"""Course tooling: ``python -m fac_mini <command>``.

  data build [--out DIR] [--cache DIR] [--seed N]   synthesise the speech corpus and train the text tokenizer
  data check [--data DIR]                           verify every shipped file of data/ against data/SHA256SUMS
  data seal [--data DIR]                            rewrite data/SHA256SUMS after a deliberate change
  exercises [--check]                               write notebooks/ from solutions/ (or fail if stale)
  m0 train|eval [...]                               train / evaluate the text LLM M0 (data/m0)
  speech-tokenizer train|eval [...]                 train / evaluate the 25 Hz speech tokenizer (data/speech_tokenizer)
  srh train|eval [...]                              the SRH vs parallel head study (data/srh_study)
  bench drsr [--json] [...]                         time a training step: 25 Hz baseline vs 5 Hz DRSR
  bench load [--json] [--size-gb G] [--dtype D]     peak memory and time of load_released on a >= 1 GB checkpoint
  vocoder train|eval [...]                          the mel -> waveform vocoder (data/vocoder)
  flow train|eval [...]                             the speech ids -> mel flow-matching detokenizer (data/flow)
  prealign train|eval [...]                         pre-alignment of the mini Fun-Audio-Chat, LLM frozen (data/prealign)
  cocktail train|eval [...]                         Core-Cocktail: stage 1, merge, stage 2 and baselines (data/cocktail)
  dpo train|eval [...]                              multi-task DPO (robustness, style, voice) with LoRA (data/dpo)
  scale dry-run [--json]                            2-process FSDP2 training step over gloo vs a 1-process reference
  chat eval [--path P] [--limit N] [--json]         the voice chat loop on held-out spoken questions (data/dpo)

Recipes share one flag set (see fac_mini.train.cli): train --out --state-dir --restart --steps --threads --force;
eval --path --json --threads --limit. A run writes under data/cache/runs/<recipe> unless it is the full shipped
recipe and --out names the shipped folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _data_build(args) -> int:
    from .corpus import CORPUS_DIR, build_corpus
    from .tokenizer import TOKENIZER_DIR, train_tokenizer
    from .train.seal import refresh_seal

    tokenizer_dir = Path(args.tokenizer_out) if args.tokenizer_out else TOKENIZER_DIR
    shipped = [path for path in (Path(args.out), tokenizer_dir) if path.resolve() in
               (CORPUS_DIR.resolve(), TOKENIZER_DIR.resolve())]
    if args.seed != 0 and shipped and not args.force:
        print(f"python -m fac_mini data build: error: --seed {args.seed} would overwrite the shipped "
              f"{', '.join(map(str, shipped))}; pass --out and --tokenizer-out outside data/ (or --force)",
              file=sys.stderr)
        return 2
    manifest = build_corpus(args.out, args.cache, seed=args.seed)
    train_tokenizer(seed=args.seed).save_pretrained(str(tokenizer_dir))
    for folder in (Path(args.out), tokenizer_dir):
        refresh_seal(folder)
    summary = {split: info for split, info in manifest["splits"].items()}
    print(json.dumps({"utterances": manifest["utterances"], "duration_min": round(manifest["duration_s"] / 60, 1),
                      "splits": summary, "build_seconds": manifest["build_seconds"],
                      "corpus": str(args.out), "tokenizer": str(tokenizer_dir)}, indent=1))
    return 0


def _data_check(args) -> int:
    from .train.seal import check_data

    problems = check_data(args.data)
    if problems:
        print(f"{len(problems)} problems in {args.data} (restore the shipped files with `git checkout -- data/`):",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    from .train.seal import read_seal

    print(f"ok: {len(read_seal(args.data))} shipped files match {Path(args.data) / 'SHA256SUMS'}")
    return 0


def _data_seal(args) -> int:
    from .train.seal import sealed_files, write_seal

    path = write_seal(args.data)
    print(f"sealed {len(sealed_files(args.data))} files in {path}")
    return 0


def _exercises(args) -> int:
    from .course.exercises import check_notebooks, write_notebooks

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
    "m0": {"train": ("fac_mini.train.m0", "main_train", False), "eval": ("fac_mini.train.m0", "main_eval", False)},
    "speech-tokenizer": {"train": ("fac_mini.train.speech_tokenizer", "main_train", False),
                         "eval": ("fac_mini.train.speech_tokenizer", "main_eval", False)},
    "srh": {"train": ("fac_mini.train.srh_study", "main_train", False),
            "eval": ("fac_mini.train.srh_study", "main_eval", False)},
    "bench": {"drsr": ("fac_mini.course.bench", "main_bench", True),
              "load": ("fac_mini.released.load_benchmark", "main_bench_load", False)},
    "vocoder": {"train": ("fac_mini.train.vocoder", "main_train", False),
                "eval": ("fac_mini.train.vocoder", "main_eval", False)},
    "flow": {"train": ("fac_mini.train.flow", "main_train", False), "eval": ("fac_mini.train.flow", "main_eval", False)},
    "prealign": {"train": ("fac_mini.train.prealign", "main_train", False),
                 "eval": ("fac_mini.train.prealign", "main_eval", False)},
    "cocktail": {"train": ("fac_mini.train.cocktail", "main_train", False),
                 "eval": ("fac_mini.train.cocktail", "main_eval", False)},
    "scale": {"dry-run": ("fac_mini.scale.dry_run", "main_dry_run", False)},
    "dpo": {"train": ("fac_mini.train.dpo", "main_train", False), "eval": ("fac_mini.train.dpo", "main_eval", False)},
    "chat": {"eval": ("fac_mini.chat", "main_eval", False)},
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
    from . import DATA_DIR
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
    build.add_argument("--force", action="store_true", help="allow a non-default seed to overwrite data/")
    build.set_defaults(handler=_data_build)
    check = data.add_parser("check", help="verify every shipped file of data/ against data/SHA256SUMS")
    check.add_argument("--data", type=Path, default=DATA_DIR, help="the data folder (default %(default)s)")
    check.set_defaults(handler=_data_check)
    seal = data.add_parser("seal", help="rewrite data/SHA256SUMS from the files as they are now")
    seal.add_argument("--data", type=Path, default=DATA_DIR)
    seal.set_defaults(handler=_data_seal)

    exercises = commands.add_parser("exercises", help="generate notebooks/ from solutions/")
    exercises.add_argument("--check", action="store_true", help="fail if notebooks/ differs from what would be written")
    exercises.set_defaults(handler=_exercises)
    for name, actions in DELEGATED.items():
        commands.add_parser(name, help=f"{'/'.join(actions)} (see python -m fac_mini {name} <action> --help)")

    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
