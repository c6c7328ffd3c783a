"""The radacx command: a thin layer that parses arguments and calls one stage of the library.

Each stage is imported only when it runs (torch and open_clip load in seconds; --help does not wait
for them). See README.md for the two commands that do it all (make demo, make test).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

log = logging.getLogger("radacx_cache")
# stage -> (module under radacx_cache, function, one-line description)
STAGES = {
    "demo-data": ("phantom.generator", "generate", "write the synthetic phantom archive in a real archive's layout"),
    "cohort": ("stages.cohort", "build_cohort", "filter the archive, apply the label policy, split by patient"),
    "shards": ("stages.shards", "build_shards", "render original + overlay images, masks and labels into HDF5"),
    "embed": ("stages.embed", "embed_all", "frozen-encoder feature caches, one per image variant"),
    "probe": ("stages.probe", "run_probes", "linear probes V1 / V2 on the cached features"),
    "zeroshot": ("stages.zeroshot", "run_zeroshot", "the zero-shot baseline from the cached features"),
    "finetune": ("stages.finetune", "run_finetune", "fine-tune encoder + head (V3 / V4), streaming from shards"),
    "saliency": ("stages.saliency", "run_saliency", "where each arm looks, against anatomy, controls and boxes"),
    "report": ("stages.report", "build_report", "Table 1 with CIs, paired tests, readings, figures"),
}


# the record a stage reads first, checked before the stage (and torch) is imported: a stage run too
# early says what to run and creates nothing (no lock file, no folder)
UPSTREAM = {"shards": "cohort", **{s: "shards" for s in ("embed", "probe", "zeroshot", "finetune", "saliency",
                                                          "report")}}


def _require_upstream(name: str, workdir) -> None:
    from .workdir import Workdir
    if name not in UPSTREAM:
        return
    work = Workdir(workdir)
    record = {"cohort": work.cohort_manifest, "shards": work.shards_manifest}[UPSTREAM[name]]
    if not record.is_file():
        raise FileNotFoundError(f"{work.root}: no finished {UPSTREAM[name]} stage ({record} is missing); run "
                                f"`radacx {UPSTREAM[name]}` with the same config first")


def _call(name: str, *args, **kwargs):
    module, function, _ = STAGES[name]
    return getattr(importlib.import_module(f"radacx_cache.{module}"), function)(*args, **kwargs)


def _stage(name: str, cfg, args) -> dict | None:
    if name == "demo-data":
        p = cfg.phantom
        faults = (p.faults or args.faults) and not args.no_faults
        return _call(name, p.out, n_patients=p.n_patients, long_side=3000 if args.full_resolution else p.long_side,
                     seed=cfg.seed, faults=faults, layout=p.layout)
    if name == "finetune":
        return _call(name, cfg, variants=args.variant or None, resume=args.resume)
    if name == "shards":
        return _call(name, cfg, rebuild=args.rebuild)
    return _call(name, cfg)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# report sections printed on the terminal beside Table 1 (the rest are in the files)
SHOWN_SECTIONS = ("Overlay ablation: accuracy", "Interventions at a glance", "Do overlay-trained arms")


def _summary(name: str, result, cfg) -> str:
    """What a person reads after a stage: a few lines and where the outputs are."""
    work = cfg.workdir
    if name == "demo-data":
        return (f"demo-data: {result['images']} images of {result.get('patients', '?')} patients in the "
                f"{result['kind']} layout under {result['root']} ({len(result['planted'])} planted faults)")
    if name == "cohort":
        lines = [f"cohort: {result['rows']} images kept, {result['rejects']} rejected -> {work}/cohort/"]
        for split, c in result["counts"].items():
            per_class = ", ".join(f"{k} {v}/{c['positives'][k]}" for k, v in c["targets"].items())
            lines.append(f"  {split:5s} {c['images']:6d} images {c['patients']:5d} patients | targets/positives: "
                         f"{per_class}")
        lines += [f"  {key}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                  for key, counts in result.get("archive_summary", {}).items() if isinstance(counts, dict)]
        lines += [f"  reject: {n:6d}  {r}" for r, n in result["reject_reasons"].items()]
        return "\n".join(lines)
    if name == "shards":
        return (f"shards: {result['rows']} images in {len(result['shards'])} shards, {result['rejects']} rejected "
                f"-> {work}/shards/ (rejects.csv says why)")
    if name == "report":  # Table 1, and the overlay ablation where the run has one
        sections = result["table"].split("\n\n### ")
        shown = [sections[0], *("### " + s for s in sections[1:] if s.startswith(SHOWN_SECTIONS))]
        return "\n\n".join(shown) + f"\n\nreport: Table 1 and figures -> {result['results']}/"
    if name == "saliency":
        sections = result["table"].split("\n\n### ")
        shown = ["### " + s for s in sections[1:] if s.startswith(SHOWN_SECTIONS[1:])]
        return "\n\n".join([*shown, f"saliency: {result['images']} test images per arm -> "
                                      f"{work}/results/saliency.md, saliency/"])
    if name in ("probe", "zeroshot", "finetune") and isinstance(result, dict):
        return _arm_table(name, result, work)
    if isinstance(result, dict):
        lines = [f"  {k}: {_fmt(v)}" for k, v in result.items() if not isinstance(v, (dict, list))]
        nested = {k: v for k, v in result.items() if isinstance(v, dict)}
        return "\n".join([f"{name}: done -> {work}", *lines, *(f"  {k}: {json.dumps(v, default=str)[:300]}"
                                                             for k, v in nested.items())])
    return ""


def _arm_table(name: str, result: dict, work) -> str:
    """One aligned table per stage that trains or scores arms: the test accuracy of each arm on each
    test variant (headline reading), and what was chosen on validation (probe C; fine-tune's best
    validation accuracy and epochs), so test and validation numbers are never side by side unnamed."""
    rows = []  # arm, tested on, test accuracy, chosen on validation
    for key, value in result.items():
        if isinstance(value, dict):  # fine-tune: one summary per arm
            chosen = (f"best val accuracy {_fmt(value.get('best_val_accuracy'))} after {value.get('epochs')} "
                      f"epochs" if "best_val_accuracy" in value else "")
            rows += [(key, k[len("test_"):], _fmt(v), chosen) for k, v in value.items() if k.startswith("test_")]
        elif "/" in key and not key.endswith("/C"):
            arm, variant = key.split("/", 1)
            c = result.get(f"{arm}/C")
            rows.append((arm, variant, _fmt(value), "" if c is None else f"C = {c:.3g}"))
    if not rows:
        return f"{name}: done -> {work}"
    head = ("arm", "tested on", "test accuracy", "chosen on validation")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(4)]
    line = lambda r: "  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
    return "\n".join([f"{name}: done -> {work} (test split, headline reading: argmax against the target; "
                      f"Table 1 after `radacx report`)", line(head), *(line(r) for r in rows)])


class _QuietThirdParty(logging.Filter):
    """Without -v only this package's records pass (open_clip logs to the root logger at INFO)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("radacx_cache") or record.levelno >= logging.ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radacx", description="Anatomy-aware chest X-ray shards, feature caches, "
                                     "probes, fine-tuning, saliency and Table 1. Stages in pipeline order:")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, third-party logs too")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, _, text) in STAGES.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", default=None, help="pipeline YAML (default: built-in defaults)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set shards.n_jobs=4")
        if name == "demo-data":
            p.add_argument("--faults", action="store_true", help="plant bad inputs (docs/archives.md)")
            p.add_argument("--no-faults", action="store_true", help="a clean phantom (overrides phantom.faults)")
            p.add_argument("--layout", default=None, metavar="KIND",
                           help="the archive whose file and table layout the phantom takes: an archive.kind "
                                "(default: phantom.layout; checked there, against the archives in sources/)")
            p.add_argument("--full-resolution", action="store_true",
                           help="real MIMIC image sizes (~3000 px; slow, large) instead of phantom.long_side")
        if name == "shards":
            p.add_argument("--rebuild", action="store_true",
                           help="replace finished shards that no longer match the plan (never done otherwise)")
        if name == "finetune":
            p.add_argument("--variant", action="append",
                           help="train only on this image variant (repeatable; default original, masked and "
                                "finetune.variants)")
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p = sub.add_parser("verify", help="re-hash every stage record of a workdir and check each chain",
                       description="re-hash every stage record of a workdir and check each chain")
    p.add_argument("workdir", help="the run's workdir, e.g. runs/demo")
    p = sub.add_parser("inspect", help="summary of a shard or feature file, optional PNG montage",
                       description="summary of a shard or feature file, optional PNG montage")
    p.add_argument("path", help="a shard (.h5), a feature cache (.h5) or a shard folder")
    p.add_argument("--png", default=None, help="write a montage of original vs masked images to this PNG")
    p.add_argument("--n", type=int, default=8, help="images in the montage (default 8)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, _QuietThirdParty) for f in handler.filters):
                handler.addFilter(_QuietThirdParty())
    from .config import ConfigError, load_config
    try:
        if args.stage == "inspect":
            from .stages.inspect import inspect_path
            print(inspect_path(args.path, png=args.png, n=args.n))
            return 0
        if args.stage == "verify":
            from .stages.verify import verify_workdir
            lines, ok = verify_workdir(args.workdir)
            print("\n".join(lines))
            return 0 if ok else 2
        layout = [f"phantom.layout={args.layout}"] if getattr(args, "layout", None) else []
        cfg = load_config(args.config, [*args.set, *layout])
        _require_upstream(args.stage, cfg.workdir)
        text = _summary(args.stage, _stage(args.stage, cfg, args), cfg)
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
