"""The seed README's headline claims, tested on this repo's own study matrices.

    make claims                      # = python -m adamwprune.report.claims
    make claims CLAIMS_ARGS="--results /path/to/results --out docs/claims-table.md"

Each claim names the preset of the study that tests it, the two methods it
compares (or a method and the dense run), the sparsities, and what it measures:
the *test* metric at the best validation step (Welch's t-test over seeds, as in
``make summary``), the training step time (the same test over the seeds' ms/step),
or the counted bytes per parameter (exact, the same for every seed: no test).
The matrices are the newest ``<timestamp>_<preset>`` directories under the results
directory (``RUN_RESULTS_DIR``), as ``MATRIX_TUNED_FROM`` finds a grid. A comparison
whose study is missing or unfinished says so; nothing is filled in.

Verdicts (ALPHA = 0.05, as everywhere): a claim that one method beats another is
*supported* when it wins on the test metric at p < 0.05 at every sparsity the claim
covers, *partly* when at some, *not supported* otherwise; a claim that two methods
are the same is *supported* when no sparsity shows a difference at p < 0.05 (with
n >= 2 seeds each) and the means differ by less than ``SAME_TOLERANCE`` relative.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import stats
from . import summary as S
from ..config.kconfig import ConfigError, resolve_path

SAME_TOLERANCE = 0.01     # "the same": |mean a - mean b| / |mean b| below this (and no p < 0.05)


@dataclass(frozen=True)
class Claim:
    key: str
    seed_says: str
    preset: str
    a: dict                       # row fields that select method A
    b: dict                       # method B (pruning "none": the dense run)
    targets: tuple[float, ...]
    expect: str = "better"        # "better": A beats B; "same": no difference
    measure: str = "test"         # "test", "step_ms" or "bytes" (bpp_total, counted)
    note: str = ""


def _spam(variant: str) -> dict:
    return {"optimizer": "adamwprune", "base": "adamwspam", "pruning": "state", "variant": variant}


AW_MAG = {"optimizer": "adamw", "pruning": "magnitude", "pattern": "unstructured"}
AW_DENSE = {"optimizer": "adamw", "pruning": "none"}
SPAM_MAG = {"optimizer": "adamwspam", "pruning": "magnitude"}
GPT = "gpt2-char-bitter-lesson"
PAT = "gpt2-char-patterns-dst"
LENET_PAT = "lenet5-patterns-dst"

CLAIMS: tuple[Claim, ...] = (
    Claim("bitter1>bitter0", "Simpler pruning (bitter1) outperforms the hybrid bitter0 (GPT-2)", GPT,
          _spam("bitter1"), _spam("bitter0"), (0.5, 0.9)),
    Claim("bitter2>bitter1", "bitter2 trades its 21 % more iterations for better quality (GPT-2)", GPT,
          _spam("bitter2"), _spam("bitter1"), (0.5, 0.9),
          note="bitter2 trains 1.21x the steps of every other cell (its budget factor)"),
    Claim("adamwprune>spam", "AdamWPrune outperforms AdamWSpam at every sparsity (ResNet-50; here the "
          "char-level GPT), bitter0", GPT, _spam("bitter0"), SPAM_MAG, (0.5, 0.9)),
    Claim("adamwprune>spam/b1", "... the same claim with bitter1 (the seed's best GPT-2 variant)", GPT,
          _spam("bitter1"), SPAM_MAG, (0.5, 0.9),
          note="bitter1 over AdamWSpam is AdamWSpam + magnitude by definition (same scores, same steps)"),
    Claim("adamwprune>spam/b2", "... the same claim with bitter2", GPT, _spam("bitter2"), SPAM_MAG,
          (0.5, 0.9), note="bitter2 trains 1.21x the steps"),
    Claim("prune50>dense", "Pruning at 50 % improves accuracy over the dense model (ResNet-50; here the "
          "char-level GPT, AdamW + magnitude)", GPT, AW_MAG, AW_DENSE, (0.5,)),
    Claim("prune50>dense/lenet", "... the same on LeNet-5 (AdamW + magnitude)", "lenet5-compare",
          AW_MAG, AW_DENSE, (0.5,)),
    Claim("dense-same", "Without pruning, AdamW and AdamWPrune perform identically", PAT,
          {"optimizer": "adamwprune", "pruning": "none"}, {"optimizer": "adamw", "pruning": "none"}, (0.0,),
          expect="same"),
    Claim("movement-scratch", "Movement pruning suits fine-tuning, not training from scratch: from "
          "scratch it loses to magnitude (GPT-2, AdamW)", GPT, AW_MAG,
          {"optimizer": "adamw", "pruning": "movement"}, (0.5, 0.9)),
    Claim("movement>state/lenet", "Movement > state > magnitude for accuracy retention (ResNet-18; here "
          "LeNet-5, AdamW base): movement against state", LENET_PAT,
          {"optimizer": "adamw", "pruning": "movement", "pattern": "unstructured"},
          {"optimizer": "adamwprune", "pruning": "state", "pattern": "unstructured"}, (0.9,)),
    Claim("state>magnitude/lenet", "... state against magnitude", LENET_PAT,
          {"optimizer": "adamwprune", "pruning": "state", "pattern": "unstructured"}, AW_MAG, (0.9,)),
    Claim("state=magnitude/lenet", "AdamWPrune (state pruning) matches AdamW + magnitude at every sparsity "
          "(LeNet-5)", "lenet5-compare", {"optimizer": "adamwprune", "pruning": "state"}, AW_MAG,
          (0.5, 0.7, 0.9, 0.95, 0.99), expect="same"),
    Claim("memory", "AdamWPrune needs less training memory than magnitude pruning (\"40 % memory "
          "savings\", 5.03x -> 3.03x the weights)", GPT, _spam("bitter0"), SPAM_MAG, (0.5, 0.9),
          measure="bytes"),
    Claim("memory/movement", "... against movement pruning", GPT, _spam("bitter0"),
          {"optimizer": "adamwspam", "pruning": "movement"}, (0.5, 0.9), measure="bytes"),
    Claim("faster", "AdamWPrune is ~20 % faster per iteration than AdamWSpam + magnitude (GPT-2)", GPT,
          _spam("bitter0"), SPAM_MAG, (0.5, 0.9), measure="step_ms",
          note="ms/step of the study's cells, two cells at a time on two cores: not side by side "
               "(make bench times steps side by side)"),
    # Patterns and dynamic sparse training (ALGORITHMS.md): this project's own questions.
    Claim("2:4 state=magnitude", "AdamWPrune at 2:4 matches AdamW + magnitude at 2:4 (char-level GPT)", PAT,
          {"optimizer": "adamwprune", "pruning": "state", "pattern": "2:4"},
          {"optimizer": "adamw", "pruning": "magnitude", "pattern": "2:4"}, (0.5,), expect="same"),
    Claim("srste>magnitude 2:4", "SR-STE (N:M from scratch) beats gradual magnitude at 2:4 (char-level GPT)",
          PAT, {"optimizer": "adamw", "pruning": "srste"},
          {"optimizer": "adamw", "pruning": "magnitude", "pattern": "2:4"}, (0.5,)),
    Claim("regrow=rigl", "AdamWPrune regrow matches RigL at 90 % (char-level GPT)", PAT,
          {"optimizer": "adamwprune", "pruning": "state_regrow"}, {"optimizer": "adamw", "pruning": "rigl"},
          (0.9,), expect="same"),
    Claim("regrow=rigl/lenet", "... on LeNet-5", LENET_PAT,
          {"optimizer": "adamwprune", "pruning": "state_regrow"}, {"optimizer": "adamw", "pruning": "rigl"},
          (0.9,), expect="same"),
    Claim("rigl>set", "RigL's gradient growth beats SET's random growth at 90 % (char-level GPT)", PAT,
          {"optimizer": "adamw", "pruning": "rigl"}, {"optimizer": "adamw", "pruning": "set"}, (0.9,)),
    Claim("dst>gradual", "Dynamic sparse training (RigL) beats gradual magnitude pruning at 90 % "
          "(char-level GPT)", PAT, {"optimizer": "adamw", "pruning": "rigl"}, AW_MAG, (0.9,)),
)


@dataclass
class Comparison:
    target: float
    a: Optional[dict]
    b: Optional[dict]
    p: Optional[float] = None
    outcome: str = ""             # "a", "b", "none" (no significant difference), "equal bytes", ...
    why: str = ""


@dataclass
class Result:
    claim: Claim
    matrix: Optional[Path]
    comparisons: list[Comparison] = field(default_factory=list)
    verdict: str = ""
    problem: str = ""


def matrix_of(preset: str, results: Path) -> Path:
    """The newest finished-or-not matrix made from `preset` under `results`."""
    from ..run.rundir import latest_matrix

    found = latest_matrix(results, preset)
    if found is None:
        raise ConfigError(f"no `{preset}` matrix under {results}: run it with "
                          f"`make defconfig DEFCONFIG={preset} && make JOBS=2`")
    return found


def _matches(row: dict, sel: dict) -> bool:
    return all(row.get(k) == v for k, v in sel.items())


def select(rows: list[dict], sel: dict, target: float) -> Optional[dict]:
    """The row `sel` picks at `target` (a dense selector, pruning "none", picks the 0 % row)."""
    at = 0.0 if sel.get("pruning") == "none" else target
    found = [r for r in rows if abs((r["target_sparsity"] or 0.0) - at) < 1e-9 and _matches(r, sel)]
    if len(found) > 1:
        raise ValueError(f"selector {sel} picks {len(found)} rows at {target:g}: "
                         f"{', '.join(r['method'] for r in found)}")
    return found[0] if found else None


def _values(row: dict, measure: str) -> list[float]:
    if measure == "test":
        return row["test_values"]
    if measure == "step_ms":
        return [1000.0 * r["step_time_s"] for r in row["records"] if r.get("step_time_s") is not None]
    raise ValueError(measure)


def _mean(row: dict, measure: str) -> Optional[float]:
    if measure == "bytes":
        return row["bpp_total"]
    if measure == "step_ms":
        return row["step_ms"]
    return row["test_mean"]


def compare(claim: Claim, rows: list[dict], target: float) -> Comparison:
    a, b = select(rows, claim.a, target), select(rows, claim.b, target)
    c = Comparison(target, a, b)
    if a is None or b is None or not a["n_seeds"] or not b["n_seeds"]:
        c.outcome, c.why = "missing", "method not in the matrix or no completed seed"
        return c
    if claim.measure == "bytes":
        ma, mb = a["bpp_total"], b["bpp_total"]
        c.outcome = "a" if ma < mb - 1e-9 else ("b" if mb < ma - 1e-9 else "equal")
        c.why = "counted bytes: exact"
        return c
    higher = bool(a["higher_is_better"]) if claim.measure == "test" else False
    va, vb = _values(a, claim.measure), _values(b, claim.measure)
    c.p, why = stats.welch(va, vb)
    ma, mb = _mean(a, claim.measure), _mean(b, claim.measure)
    if claim.measure == "test" and len(va) >= 2 and sorted(va) == sorted(vb) and \
            sorted(a["seeds"]) == sorted(b["seeds"]):
        c.outcome = "identical"     # the same value at every seed
    elif c.p is None:
        same = ma == mb
        c.outcome, c.why = ("identical" if same else "untestable"), why or ""
    elif c.p >= stats.ALPHA:
        c.outcome = "none"
    else:
        c.outcome = "a" if (ma > mb) == higher else "b"
    return c


def verdict(claim: Claim, comps: list[Comparison]) -> str:
    if any(c.outcome in ("missing", "untestable") for c in comps):
        return "not testable here: " + next(c.why for c in comps if c.outcome in ("missing", "untestable"))
    if claim.expect == "same":
        close = all(abs(_mean(c.a, claim.measure) - _mean(c.b, claim.measure))
                    <= SAME_TOLERANCE * abs(_mean(c.b, claim.measure)) for c in comps)
        if not all(c.outcome in ("none", "identical") for c in comps):
            return "not supported"
        return "supported" if close else ("inconclusive: no significant difference, but means more than "
                                          f"{100 * SAME_TOLERANCE:g} % apart")
    wins = sum(c.outcome == "a" for c in comps)
    if wins == len(comps):
        return "supported"
    return "partly supported" if wins else "not supported"


def evaluate(results: Path, claims=CLAIMS) -> list[Result]:
    out: list[Result] = []
    cache: dict[str, tuple[Optional[Path], list[dict], str]] = {}
    for claim in claims:
        if claim.preset not in cache:
            try:
                mdir = matrix_of(claim.preset, results)
                records = S.collect(mdir)
                rows = S.summarize(records)
                groups = S.group_records(r for r in records if r["status"] == S.COMPLETED)
                for row in rows:
                    row["records"] = groups.get(S.config_key(row), [])
                cache[claim.preset] = (mdir, rows, "")
            except ConfigError as e:
                cache[claim.preset] = (None, [], str(e))
        mdir, rows, problem = cache[claim.preset]
        res = Result(claim, mdir, problem=problem)
        if not problem:
            res.comparisons = [compare(claim, rows, t) for t in claim.targets]
            res.verdict = verdict(claim, res.comparisons)
        else:
            res.verdict = "not testable here: " + problem
        out.append(res)
    return out


def _fmt(row: Optional[dict], measure: str) -> str:
    if row is None:
        return "–"
    if measure == "bytes":
        return f"{row['bpp_total']:.2f} B/param"
    vals = _values(row, measure)
    mean, std = S.mean_std(vals)
    return f"{S.fmt_pm(mean, std)} (n={len(vals)})"


def _outcome(c: Comparison, claim: Claim) -> str:
    names = {"a": "A better", "b": "B better", "none": "no significant difference",
             "identical": "identical in every seed", "equal": "equal", "missing": "missing",
             "untestable": "not testable"}
    text = names[c.outcome]
    if c.outcome in ("a", "b") and claim.measure != "bytes":
        text += " (p < 0.05)"
    if claim.measure == "bytes" and c.outcome in ("a", "b"):
        smaller, larger = sorted((c.a["bpp_total"], c.b["bpp_total"]))
        text += f" ({100 * (1 - smaller / larger):.1f} % fewer bytes)"
    return text


def render(results: list[Result]) -> str:
    lines = ["| claim (seed README) | study | sparsity | A | B | measure | A | B | p (Welch) | outcome | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    measures = {"test": "test metric", "step_ms": "ms/step", "bytes": "train bytes/param"}
    for res in results:
        claim = res.claim
        study = f"`{res.matrix.name}`" if res.matrix else f"`{claim.preset}` (missing)"
        text = claim.seed_says + (f" — *{claim.note}*" if claim.note else "")
        if not res.comparisons:
            lines.append(f"| {text} | {study} | – | – | – | – | – | – | – | – | {res.verdict} |")
            continue
        for i, c in enumerate(res.comparisons):
            p = "–" if c.p is None else (f"{c.p:.2g}")
            lines.append("| " + " | ".join([
                text if i == 0 else "″", study if i == 0 else "″", f"{100 * c.target:.0f} %",
                c.a["method"] if c.a else "–", c.b["method"] if c.b else "–", measures[claim.measure],
                _fmt(c.a, claim.measure), _fmt(c.b, claim.measure), p, _outcome(c, claim),
                f"**{res.verdict}**" if i == 0 else "″"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adamwprune.report.claims", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results", help="where the study matrices are (RUN_RESULTS_DIR)")
    ap.add_argument("--out", help="also write the table here (atomically)")
    args = ap.parse_args(argv)
    results = resolve_path(args.results)
    if not results.is_dir():
        print(f"error: {results}: no results directory; run the studies first (docs/claims.md)",
              file=sys.stderr)
        return 2
    table = render(evaluate(results))
    print(table, end="")
    if args.out:
        from ..run.atomic import write_text_atomic

        write_text_atomic(Path(args.out), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
