"""`subllm bench compare`: LLaMA, SUBLLM and Mixture-of-Depths trained side by side on the same code,
data, optimiser and hardware - at equal tokens and at equal training FLOPs, over several seeds.

Every run is a plain `subllm train` in its own process (folder OUT/<arch>_<budget>_s<seed>, log in
train.log); runs already finished (summary.json present) are not run again, so an interrupted
comparison resumes where it stopped. Budgets:
- tokens: every architecture trains `--steps` steps on the same batches (the same seed = the same
  data order);
- flops: SUBLLM and MoD get the steps their FLOP savings buy - steps x F(LLaMA) / F(arch), F the
  forward FLOPs of one training sequence at the keep ratios / capacities (subllm/flops.py); the
  LLaMA's flops run is its tokens run.
The report (compare.json, compare.md and compare.png in OUT) gives per architecture and budget the
mean and sample standard deviation over seeds of the eval-mode validation loss and bits per byte,
training tokens/s (indicative only: runs may share the machine - speed claims come from `subllm
bench train`, interleaved in one process), peak resident memory, and for the routed models the
eval-mode keep and the agreement of the causal inference rule with training's top-k (the lowest
module's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from subllm.bench.common import mean_sd
from subllm.config import ModelConfig, get_preset
from subllm.errors import SubLLMError
from subllm.flops import flops

# the demo's model: 12 layers, d 256 (subllm/cli/demo.py); MoD: every other layer routed at 12.5%
STRUCTURES = {"llama": "TTTTTTTTTTTT", "subllm": "TTT(TT(TT)TTT)TT", "mod": "TMTMTMTMTMTM"}
DEMO_SET = ["dim=256", "n_heads=4", "n_kv_heads=4", "ffn_dim=688"]
BUDGETS = ("tokens", "flops")
RUNNING = "RUNNING"  # in a run folder while a comparison process trains it: the trainer's pid


def add_compare_arguments(sub) -> None:
    p = sub.add_parser("compare", help="LLaMA vs SUBLLM vs MoD trained side by side (equal tokens / FLOPs)")
    p.add_argument("--out", default="runs/compare", help="folder of the runs and the report")
    p.add_argument("--data", default="runs/base/data/tokens", help="packed data (or text) for `subllm train`")
    p.add_argument("--archs", default="llama,subllm,mod", help="comma-separated names of --structure")
    p.add_argument(
        "--structure", action="append", default=[], metavar="ARCH=STRUCTURE",
        help="add or replace an architecture (repeatable), e.g. mod=TMTMTMTMTMTM; "
        "defaults: " + ", ".join(f"{k}={v}" for k, v in STRUCTURES.items()),
    )  # fmt: skip
    p.add_argument(
        "--arch-set", action="append", default=[], metavar="ARCH:KEY=VALUE",
        help="a model override for one architecture's runs (repeatable), e.g. mod_pred:mod_router=predictor",
    )  # fmt: skip
    p.add_argument("--budgets", default="tokens,flops", help="tokens, flops or both")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=275, help="the LLaMA's steps (the demo's budget)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--preset", default="subllm-small")
    p.add_argument(
        "--set", action="append", default=None, metavar="KEY=VALUE",
        help="model overrides for every run (default: the demo's " + " ".join(DEMO_SET) + ")",
    )  # fmt: skip
    p.add_argument("--dtype", default="auto")
    p.add_argument("--lanes", type=int, default=1, help="runs at a time (each on --threads threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, train nothing")
    p.add_argument("--report-only", action="store_true", help="only collect the finished runs")


def arch_sets(args, arch: str) -> list[str]:
    """--set values of every run, then --arch-set values of `arch`'s runs."""
    sets = list(DEMO_SET if args.set is None else args.set)
    for item in args.arch_set:
        name, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise SubLLMError(f"--arch-set takes ARCH:KEY=VALUE, got {item!r}")
        if name.strip() == arch:
            sets.append(kv)
    return sets


def model_of(args, structure: str, arch: str = "") -> ModelConfig:
    from subllm.trainer.config import parse_overrides

    sets = parse_overrides("--set", arch_sets(args, arch))
    return get_preset(args.preset).replace(**{**sets, "structure": structure})


def plan(args) -> list[dict]:
    """One entry per run: name, arch, budget, seed, steps, structure, forward FLOPs per sequence."""
    structures = dict(STRUCTURES)
    for item in args.structure:
        if "=" not in item:
            raise SubLLMError(f"--structure takes ARCH=STRUCTURE, got {item!r}")
        k, v = item.split("=", 1)
        structures[k.strip()] = v.strip()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in structures]
    if unknown or not archs or "llama" not in structures:
        raise SubLLMError(
            f"--archs: unknown {unknown} (known: {', '.join(structures)}; llama is the reference)"
        )
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets or any(b not in BUDGETS for b in budgets):
        raise SubLLMError(f"--budgets: choose from {', '.join(BUDGETS)}, got {args.budgets!r}")
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise SubLLMError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if args.steps < 1 or args.lanes < 1 or not seeds:
        raise SubLLMError("--steps and --lanes must be >= 1 and --seeds non-empty")
    cost = {a: flops(model_of(args, structures[a], a), args.seq_len)["total"] for a in {*archs, "llama"}}
    runs = []
    for seed in seeds:
        for budget in budgets:
            for a in archs:
                if budget == "flops" and a == "llama":
                    continue  # the same run as its tokens budget
                steps = args.steps if budget == "tokens" else round(args.steps * cost["llama"] / cost[a])
                runs.append(
                    dict(name=f"{a}_{budget}_s{seed}", arch=a, budget=budget, seed=seed, steps=steps,
                         structure=structures[a], flops_per_seq=cost[a])
                )  # fmt: skip
    return runs


def command(args, run: dict) -> list[str]:
    sets = arch_sets(args, run["arch"])
    cmd = [sys.executable, "-m", "subllm", "train", "--preset", args.preset, "--data", str(args.data)]
    cmd += ["--structure", run["structure"], *[x for s in sets for x in ("--set", s)]]
    cmd += [
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(run["steps"]),
    ]
    cmd += ["--eval-every", str(max(1, run["steps"] // 4)), "--eval-batches", "6", "--save-every", "0"]
    cmd += ["--dtype", args.dtype, "--schedule-steps", "scale", "--threads", str(args.threads)]
    cmd += [
        "--no-progress",
        "--seed",
        str(run["seed"]),
        "--out",
        str(Path(args.out) / run["name"]),
        "--overwrite",
    ]
    return cmd


def _taken(d: Path) -> bool:
    """A run finished (summary.json) or being trained by another live process (its RUNNING file)."""
    if (d / "summary.json").is_file():
        return True
    try:
        pid = int((d / RUNNING).read_text())
        if pid <= 0:
            return False
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
        return True
    except (OSError, ValueError):
        return False


def execute(args, runs: list[dict], log=print) -> None:
    """Run what is not finished, `--lanes` at a time; a failed run is reported, the others go on.
    Several `bench compare` processes may share OUT: each skips the runs another is training."""
    todo = [r for r in runs if not (Path(args.out) / r["name"] / "summary.json").is_file()]
    log(f"[compare] {len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to train")
    active: list[tuple[dict, subprocess.Popen, float]] = []
    failed = []
    while todo or active:
        while todo and len(active) < args.lanes:
            r = todo.pop(0)
            d = Path(args.out) / r["name"]
            if _taken(d):  # finished or started meanwhile by another comparison process
                continue
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "train.log", "w") as fh:
                proc = subprocess.Popen(command(args, r), stdout=fh, stderr=subprocess.STDOUT)
            (d / RUNNING).write_text(str(proc.pid))
            active.append((r, proc, time.time()))
            log(f"[compare] started {r['name']} ({r['steps']} steps)")
        time.sleep(0.5)
        for item in list(active):
            r, proc, t0 = item
            if proc.poll() is None:
                continue
            active.remove(item)
            (Path(args.out) / r["name"] / RUNNING).unlink(missing_ok=True)
            ok = proc.returncode == 0
            log(f"[compare] {'finished' if ok else 'FAILED'} {r['name']} in {time.time() - t0:.0f} s")
            if not ok:
                failed.append(r["name"])
    if failed:
        raise SubLLMError(f"runs failed (see their train.log): {', '.join(failed)}")


def collect(args, runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        f = Path(args.out) / r["name"] / "summary.json"
        if not f.is_file():
            continue
        s = json.loads(f.read_text())
        agreement = s.get("agreement") or []
        out.append(
            {
                **r,
                "val_loss": s["val_loss"],
                "val_bpb": s.get("val_bpb"),
                "tokens": s["tokens"],
                "train_flops": 3 * r["flops_per_seq"] * s["tokens"] / args.seq_len,
                "tokens_per_s": s["tokens"] / max(s["train_s"] - s.get("eval_s", 0.0), 1e-9),
                "peak_rss_mb": s["peak_rss_mb"],
                "agreement_min": min(agreement) if agreement else None,
                "keep_eval": s.get("keep_fractions_eval") or [],
            }
        )
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per (arch, budget): n seeds, mean and sd of each measure (LLaMA's tokens runs stand in both)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["budget"]), []).append(r)
    out = []
    for (arch, budget), g in groups.items():
        item = {
            "arch": arch,
            "budget": budget,
            "n": len(g),
            "steps": g[0]["steps"],
            "seeds": [r["seed"] for r in g],
        }
        for key in ("val_loss", "val_bpb", "tokens_per_s", "peak_rss_mb", "agreement_min", "train_flops"):
            vals = [r[key] for r in g if r[key] is not None]
            if vals:
                item[key] = mean_sd(vals)
        keeps = [k for r in g for k in r["keep_eval"]]
        if keeps:
            item["keep_eval"] = mean_sd(keeps)
        out.append(item)
    return out


def markdown(summary: list[dict]) -> str:
    """The report table: mean ± sample sd over seeds (LLaMA's equal-FLOP run is its tokens run)."""

    def ms(item, key, fmt, scale=1.0):
        if key not in item:
            return "-"
        m, s = item[key]
        return f"{m / scale:{fmt}} ± {s / scale:{fmt}}"

    cols = ["arch", "budget", "steps", "seeds", "val loss (eval)", "bits/byte", "train PFLOP", "tok/s"]
    cols += ["peak RSS MB", "keep (eval)", "agreement (min)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = {a: i for i, a in enumerate(STRUCTURES)}
    for it in sorted(summary, key=lambda i: (BUDGETS.index(i["budget"]), order.get(i["arch"], 9), i["arch"])):
        cells = [it["arch"], it["budget"], str(it["steps"]), str(it["n"]), ms(it, "val_loss", ".4f")]
        cells += [
            ms(it, "val_bpb", ".4f"),
            ms(it, "train_flops", ".3f", 1e15),
            ms(it, "tokens_per_s", ",.0f"),
        ]
        cells += [ms(it, "peak_rss_mb", ",.0f"), ms(it, "keep_eval", ".3f"), ms(it, "agreement_min", ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"llama": "tab:blue", "subllm": "tab:red", "mod": "tab:green"}
    spare = iter(["tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for r in rows:  # other architectures (--structure) get the next free colour, in the legend too
        if r["arch"] not in colors:
            colors[r["arch"]] = next(spare, "tab:gray")
    colors = {a: c for a, c in colors.items() if any(r["arch"] == a for r in rows)}
    for r in rows:
        c = colors[r["arch"]]
        mk = "o" if r["budget"] == "tokens" else "^"
        axes[0].scatter(r["train_flops"] / 1e15, r["val_loss"], c=c, marker=mk)
        axes[1].scatter(r["tokens"] / 1e6, r["val_loss"], c=c, marker=mk)
    for arch, c in colors.items():
        axes[0].scatter([], [], c=c, label=arch)
    axes[0].scatter([], [], c="k", marker="o", label="equal tokens")
    axes[0].scatter([], [], c="k", marker="^", label="equal FLOPs")
    axes[0].set_xlabel("training FLOPs (PFLOP, from the keep ratios)")
    axes[1].set_xlabel("training tokens (M)")
    for ax in axes:
        ax.set_ylabel("validation loss (eval mode)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("LLaMA vs SUBLLM vs Mixture-of-Depths: each point one seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_compare(args, log=print) -> dict:
    runs = plan(args)
    if args.dry_run:
        for r in runs:
            log(" ".join(command(args, r)))
        return {"runs": runs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        execute(args, runs, log)
    rows = collect(args, runs)
    if not rows:
        raise SubLLMError(f"no finished run in {args.out}")
    summary = summarize(rows)
    out = Path(args.out)
    (out / "compare.md").write_text(markdown(summary) + "\n")
    plot(rows, out / "compare.png")
    report = {"runs": rows, "summary": summary}
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    return report
