"""The ``radacx`` command: a thin layer that parses arguments and calls the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .arms import IMAGE_VARIANTS
from .stages.cohort import build_cohort
from .config import ConfigError, load_config
from .stages.embed import embed_all
from .stages.finetune import run_finetune
from .stages.inspect import inspect_path
from .phantom.generator import generate
from .stages.probe import run_probes
from .stages.report import build_report
from .stages.saliency import run_saliency
from .stages.shards import build_shards
from .stages.verify import verify_workdir
from .stages.zeroshot import run_zeroshot

log = logging.getLogger("radacx_cache")
STAGES = ("demo-data", "cohort", "shards", "embed", "probe", "zeroshot", "finetune", "saliency", "report")


def _stage(name: str, cfg, args) -> dict | None:
    if name == "demo-data":
        p = cfg.phantom
        return generate(p.out, n_patients=p.n_patients, long_side=3000 if args.full_resolution else p.long_side,
                        seed=cfg.seed, faults=p.faults or args.faults, layout=args.layout or p.layout)
    if name == "finetune":
        return run_finetune(cfg, variants=args.variant or IMAGE_VARIANTS, resume=args.resume)
    if name == "shards":
        return build_shards(cfg, rebuild=args.rebuild)
    stages = {"cohort": build_cohort, "embed": embed_all, "probe": run_probes,
              "zeroshot": run_zeroshot, "saliency": run_saliency, "report": build_report}
    return stages[name](cfg)


def _summary(name: str, result) -> str:
    if name == "cohort":
        lines = [f"cohort: {result['rows']} images kept, {result['rejects']} rejected"]
        for split, c in result["counts"].items():
            per_class = ", ".join(f"{k} {v}/{c['positives'][k]}" for k, v in c["targets"].items())
            lines.append(f"  {split:5s} {c['images']:6d} images {c['patients']:5d} patients | targets/positives: "
                         f"{per_class}")
        lines += [f"  reject: {n:6d}  {r}" for r, n in result["reject_reasons"].items()]
        return "\n".join(lines)
    if name == "shards":
        return (f"shards: {result['rows']} images in {len(result['shards'])} shards, "
                f"{result['rejects']} rejected (see shards/rejects.csv)")
    if name in ("report", "saliency") and isinstance(result, dict) and "table" in result:
        return result["table"]
    return json.dumps(result, indent=2, default=str)[:4000] if result is not None else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="radacx", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in STAGES:
        p = sub.add_parser(name)
        p.add_argument("--config", "-c", default=None, help="pipeline YAML (default: built-in defaults)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set shards.n_jobs=4")
        if name == "demo-data":
            p.add_argument("--faults", action="store_true", help="plant bad inputs (see docs)")
            p.add_argument("--layout", choices=("mimic", "nih", "chexpert"), default=None,
                           help="the archive whose file and table layout the phantom takes (default: phantom.layout)")
            p.add_argument("--full-resolution", action="store_true",
                           help="real MIMIC image sizes (~3000 px; slow, large) instead of phantom.long_side")
        if name == "shards":
            p.add_argument("--rebuild", action="store_true",
                           help="replace finished shards that no longer match the plan (never done otherwise)")
        if name == "finetune":
            p.add_argument("--variant", action="append", choices=("original", "masked"))
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p = sub.add_parser("verify", help="re-hash every stage record of a workdir and check each chain")
    p.add_argument("workdir")
    p = sub.add_parser("inspect", help="summary of a shard or feature file, optional PNG montage")
    p.add_argument("path")
    p.add_argument("--png", default=None)
    p.add_argument("--n", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.stage == "inspect":
            print(inspect_path(args.path, png=args.png, n=args.n))
            return 0
        if args.stage == "verify":
            lines, ok = verify_workdir(args.workdir)
            print("\n".join(lines))
            return 0 if ok else 2
        cfg = load_config(args.config, args.set)
        result = _stage(args.stage, cfg, args)
        text = _summary(args.stage, result)
        if text:
            print(text)
        return 0
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # permissions, a read-only or full disk: one line naming the file
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        log.error("%s%s", exc.strerror or exc, where)
        return 2


if __name__ == "__main__":
    sys.exit(main())
