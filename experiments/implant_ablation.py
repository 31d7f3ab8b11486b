"""Retention ablation of PersGuard implantation: ``persguard implant`` once per retention formulation, one table.

    python experiments/implant_ablation.py --out runs/ablation [--protect world:dog_00:pattern]
        [--unprotected world:cat_00]
        [--variants none,mirror,grad_suppression,unrolled_o1,unrolled_o1_dispatched,unrolled_o2,unrolled_o2_replay]
        [key=value ...]

Each variant is the shipped ``configs/implant_world.yaml`` with ``implant.retention`` (and, for the unrolled ones,
``implant.retention_order``) set, plus the overrides given (the shipped config has the guidance term on since
d58fac8; the table in docs/results.md was measured without it: add ``implant.guidance_weight=0 implant.steps=400
implant.num_general=32`` to repeat it). Per variant the command's own check reports, for each
protected subject, the protection rate before and after the white-box attacker (the config's DreamBooth recipe,
from the backdoored model) and, for unprotected subjects, identity similarity after the attack on the backdoored
and on the clean model; general colour/shape following of both models; and the cost: seconds per implantation
step (median of the logged rates) and the implantation's wall time. The first variant's attack on the clean
model is lent to the others (``check.clean_from``): it does not depend on the retention. Writes
``<out>/<variant>/`` (each a full implant run), ``<out>/runs.jsonl`` (a line per variant as it finishes) and
``<out>/table.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _tables import finish, fmt, record

VARIANTS = {
    "none": ["implant.retention=none"],
    "mirror": ["implant.retention=mirror"],
    "grad_suppression": ["implant.retention=grad_suppression"],
    "unrolled_o1": ["implant.retention=unrolled", "implant.retention_order=1"],
    # the same first-order term with the K steps as separate programs ahead of each step (train.dispatch)
    "unrolled_o1_dispatched": ["implant.retention=unrolled", "implant.retention_order=1",
                               "implant.retention_dispatch=true"],
    "unrolled_o2": ["implant.retention=unrolled", "implant.retention_order=2", "implant.retention_remat=true"],
    # the same exact gradient with the K steps replayed in the backward pass (memory flat in K); XLA:CPU compiles
    # its step in about 14 minutes on the world model, the stored / rematerialised scan's in over 15
    "unrolled_o2_replay": ["implant.retention=unrolled", "implant.retention_order=2", "implant.retention_replay=true",
                           "implant.retention_remat=false"],
}


def summarise(variant: str, run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    rates = [json.loads(line).get("steps_per_s") for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates[1:] if r]  # the first log interval holds the compilation
    row = {"variant": variant, "s_per_step": 1.0 / statistics.median(rates) if rates else None,
           "implant_s": results.get("implant_s"), "general": results.get("general"), "subjects": {}}
    for name, e in results.get("subjects", {}).items():
        row["subjects"][name] = {"type": e["type"], "before": e.get("protection_rate_before_attack"),
                                 "after": e["backdoored"]["protection_rate"],
                                 "clean_after": e["clean"]["protection_rate"],
                                 "identity": e["backdoored"]["identity_similarity"],
                                 "identity_clean": e["clean"]["identity_similarity"]}
    return row



def table(rows: list[dict]) -> str:
    lines = ["| retention | s / step | implant s | subject (type) | protection before -> after attack (clean model "
             "after) | identity after attack: backdoored / clean | general colour / shape: backdoored (clean) |",
             "|" + "---|" * 7]
    for r in rows:
        g = r.get("general") or {}
        gb, gc = g.get("backdoored", {}), g.get("clean", {})
        general = (f"{fmt(gb.get('colour_accuracy'))} / {fmt(gb.get('shape_accuracy'))} "
                   f"({fmt(gc.get('colour_accuracy'))} / {fmt(gc.get('shape_accuracy'))})")
        for name, s in r["subjects"].items():
            prot = (f"{fmt(s['before'])} -> {fmt(s['after'])} ({fmt(s['clean_after'])})" if s["type"] !=
                    "unprotected" else "")
            lines.append(f"| {r['variant']} | {fmt(r['s_per_step'])} | {fmt(r['implant_s'])} | {name} ({s['type']}) "
                         f"| {prot} | {fmt(s['identity'])} / {fmt(s['identity_clean'])} | {general} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from persguard_jax.cli import main as cli
    from persguard_jax.workflows.world_assets import world_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--protect", action="append", default=None)
    parser.add_argument("--unprotected", action="append", default=None)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant (key=value)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, lender = [], None
    for variant in args.variants:
        run = args.out / variant
        # the attack on the clean model is the same in every variant: the first one's is lent to the rest
        # (check.clean_from; a variant whose attacker or check differs attacks afresh, and says so)
        lend = [f"check.clean_from={lender}"] if lender is not None else []
        if not (run / "results.json").exists():
            argv = ["implant", "--model", str(args.model or world_model()), "--out", str(run)]
            for spec in args.protect or ["world:dog_00:pattern"]:
                argv += ["--protect", spec]
            for spec in args.unprotected or ["world:cat_00"]:
                argv += ["--unprotected", spec]
            if run.exists():
                argv.append("--resume")
            code = cli(argv + VARIANTS[variant] + lend + list(args.overrides))
            if code not in (0, None):
                raise SystemExit(f"{variant}: persguard implant exited {code}")
        record(args.out, rows, summarise(variant, run))
        if lender is None and (run / "check").is_dir():
            lender = run
    finish(args.out, table(rows))


if __name__ == "__main__":
    main()
