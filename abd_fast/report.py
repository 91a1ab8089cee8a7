"""The run's report: report.json (schema in docs/REPORT.md), report.md and PNG plots.

    paths = write_report(report, "runs/demo", embeddings={"victim": (clean, triggered), ...})

write_report validates the report dict (ReportError names the bad field), writes report.json
atomically (temp file + fsync + rename) and report.md, and draws:
  ca_asr.png      CA top-1 / ASR bars per attack, one bar per model (victim and defenses)
  embedding.png   clean vs triggered image embeddings, 2-D PCA per model state, with the
                  mean distance d = mean_i (2 - 2 cos(clean_i, triggered_i)) (CleanCLIP Fig. 1)
  similarity.png  ABD Fig. 2's five mean image-caption similarities (cosine x 100)
Accuracies and rates are percentages (0-100). Nothing here trains or evaluates a model.
"""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np

from abd_fast.engine import atomic_write_text

SCHEMA_VERSION = 1

# ---- the paper's numbers ---------------------------------------------------------------------

PAPER_RECIPES = ("abd-paper",)  # `recipe:` of configs/paper/*.yaml
# (CA top-1, ASR) in %, and Fig. 2 similarities (cosine x 100): RN50 CLIP poisoned on a 500K
# CC3M subset (0.3% poisoned), defended on 250K pairs, evaluated on ImageNet-1K val, target
# "banana". Table II's numbers are not legible in our copy of the paper, so none are printed.
PAPER_REFERENCE = {
    "source": "ABD: Adversarial Backdoor Defense for CLIP (shared/papers/"
              "abd-adversarial-backdoor-defense.txt), Table I, Table III and Fig. 2",
    "table1": {
        "badnet": {"victim": (58.69, 96.51), "roclip": (46.6, 80.75),
                   "cleanclip": (55.85, 14.02), "abd": (53.47, 5.36)},
        "blended": {"victim": (58.48, 50.28), "roclip": (44.55, 26.96),
                    "cleanclip": (55.53, 18.25), "abd": (53.29, 7.73)},
        "badclip": {"victim": (58.62, 98.98), "roclip": (46.47, 89.97),
                    "cleanclip": (53.98, 89.6), "abd": (53.4, 35.96)},
    },
    "table3": {
        "badnet": {"uap": (53.29, 18.39), "uap_bd": (53.7, 10.49)},
        "blended": {"uap": (54.05, 30.48), "uap_bd": (53.68, 18.15)},
        "badclip": {"uap": (53.27, 48.3), "uap_bd": (53.7, 46.03)},
    },
    "similarity": {"clean_own_caption": 25.02, "triggered_backdoor_caption": 28.49,
                   "adversarial_own_caption": 19.82, "adversarial_backdoor_caption": 16.04,
                   "adversarial_unrelated_caption": 5.04},
}

# ---- names shown in the tables ---------------------------------------------------------------

DEFENSES = ("ft", "cleanclip", "roclip", "abd")  # Table I's order; other names follow
MODEL_LABELS = {"victim": "victim", "ft": "FT", "cleanclip": "CleanCLIP", "roclip": "RoCLIP",
                "abd": "ABD"}
TABLE2_ROWS = {"ft": "FT", "i_adv": "FT + I_adv", "t_eda": "FT + T_eda",
               "i_adv_t_eda": "FT + I_adv + T_eda"}
TABLE3_ROWS = {"uap": "UAP", "uap_bd": "UAP + L_bd"}
SIMILARITY_ROWS = {
    "clean_own_caption": "clean image / its own caption",
    "triggered_backdoor_caption": "triggered image / backdoor (poison) captions",
    "adversarial_own_caption": "adversarial image / its own caption",
    "adversarial_backdoor_caption": "adversarial image / backdoor captions",
    "adversarial_unrelated_caption": "adversarial image / unrelated captions",
}
TOP_KEYS = ("clean", "attacks", "ablations", "similarity", "timing", "settings", "notes")
OPTIONAL_TOP_KEYS = ("machine", "schema_version", "warnings", "scan", "floors")
FLOOR_ROWS = {"clean": "clean model (floor)", "uap": "UAP alone"}  # report["floors"][attack]
# Below these the numbers of a run mean little (weak_model_warnings): a clean model under
# twice chance has barely learned the classes; a victim under this ASR was not backdoored.
WEAK_CA_TIMES_CHANCE = 2.0
WEAK_VICTIM_ASR = 50.0
# A victim this many CA points under its clean model was damaged by the poisoning fine-tune
# (the paper's victims lose about 1 point; the demo's gain up to 1).
VICTIM_CA_DROP = 10.0


class ReportError(ValueError):
    """A report dict that does not follow the schema of docs/REPORT.md."""


# ---- validation ------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_number(v, where: str, lo: float, hi: float, nullable: bool):
    if v is None and nullable:
        return
    if not _is_number(v) or not lo <= v <= hi:
        kind = f"a number in [{lo:g}, {hi:g}]" + (" or null" if nullable else "")
        raise ReportError(f"{where}: expected {kind}, got {v!r}")


def _check_result(r, where: str):
    """An evaluation result (abd_fast.evaluate.evaluate's dict) or null (stage not run)."""
    if r is None:
        return
    if not isinstance(r, dict):
        raise ReportError(f"{where}: expected an evaluation result dict (ca_top1, asr, ...) "
                          f"or null, got {type(r).__name__}")
    if "ca_top1" not in r:
        raise ReportError(f"{where}: missing 'ca_top1' (clean accuracy top-1, percent)")
    _check_number(r["ca_top1"], f"{where}['ca_top1']", 0, 100, nullable=False)
    for key in ("ca_top5", "asr"):
        _check_number(r.get(key), f"{where}[{key!r}]", 0, 100, nullable=True)
    _check_number(r.get("embedding_distance"), f"{where}['embedding_distance']", 0, 4,
                  nullable=True)
    _check_number(r.get("capture_rate"), f"{where}['capture_rate']", 0, 100, nullable=True)
    if not isinstance(r.get("capture_class"), (str, type(None))):
        raise ReportError(f"{where}['capture_class']: expected a class name or null, got "
                          f"{r['capture_class']!r}")
    _check_budget(r.get("budget"), f"{where}['budget']")
    for key, least in (("n_eval", 0), ("n_asr", 0), ("n_classes", 1)):
        v = r.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
            raise ReportError(f"{where}[{key!r}]: expected a count (int >= {least}), "
                              f"got {v!r}")


BUDGET_KEYS = ("pairs", "steps", "lr", "steps_x_lr")  # abd_fast.defenses.budget's record


def _check_budget(b, where: str):
    """A defense's training budget (defend's eval.json) or null."""
    if b is None:
        return
    if not isinstance(b, dict):
        raise ReportError(f"{where}: expected null or a budget dict ({', '.join(BUDGET_KEYS)}, "
                          "ratio, poisoning)")
    for key in BUDGET_KEYS:
        _check_number(b.get(key), f"{where}[{key!r}]", 0, math.inf, nullable=False)
    _check_number(b.get("ratio"), f"{where}['ratio']", 0, math.inf, nullable=True)
    p = b.get("poisoning")
    if p is not None:
        if not isinstance(p, dict):
            raise ReportError(f"{where}['poisoning']: expected null or a dict")
        for key in BUDGET_KEYS:
            _check_number(p.get(key), f"{where}['poisoning'][{key!r}]", 0, math.inf,
                          nullable=False)


def _check_rows(table, where: str, rows: dict):
    if table is None:
        return
    if not isinstance(table, dict) or not isinstance(table.get("attack"), str) \
            or not isinstance(table.get("rows"), dict):
        raise ReportError(f"{where}: expected null or {{'attack': str, 'rows': {{...}}}}")
    for key, r in table["rows"].items():
        if key not in rows:
            raise ReportError(f"{where}['rows']: unknown row {key!r}; rows are {list(rows)}")
        _check_result(r, f"{where}['rows'][{key!r}]")


def validate_report(report) -> None:
    """Raises ReportError naming the first field that breaks the schema of docs/REPORT.md."""
    if not isinstance(report, dict):
        raise ReportError(f"report: expected a dict, got {type(report).__name__}")
    missing = [k for k in TOP_KEYS if k not in report]
    if missing:
        raise ReportError(f"report: missing keys {missing} (null where a part was not run)")
    unknown = [k for k in report if k not in TOP_KEYS + OPTIONAL_TOP_KEYS]
    if unknown:
        raise ReportError(f"report: unknown keys {unknown}; keys are "
                          f"{list(TOP_KEYS + OPTIONAL_TOP_KEYS)}")
    _check_result(report["clean"], "report['clean']")
    attacks = report["attacks"]
    if not isinstance(attacks, dict):
        raise ReportError("report['attacks']: expected {attack: {'victim': ..., defense: ...}}")
    for attack, models in attacks.items():
        where = f"report['attacks'][{attack!r}]"
        if not isinstance(models, dict) or "victim" not in models:
            raise ReportError(f"{where}: expected a dict with 'victim' and one result per "
                              "defense")
        for name, r in models.items():
            _check_result(r, f"{where}[{name!r}]")
    floors = report.get("floors", {})
    if not isinstance(floors, dict) or not all(
            isinstance(f, dict) and set(f) <= set(FLOOR_ROWS) for f in floors.values()):
        raise ReportError(f"report['floors']: expected {{attack: {{{', '.join(FLOOR_ROWS)}: "
                          "Result or null}}")
    for attack, rows in floors.items():
        for name, r in rows.items():
            _check_result(r, f"report['floors'][{attack!r}][{name!r}]")
    ablations = report["ablations"]
    if not isinstance(ablations, dict) or set(ablations) != {"table2", "table3"}:
        raise ReportError("report['ablations']: expected {'table2': ..., 'table3': ...} "
                          "(null where not run)")
    _check_rows(ablations["table2"], "report['ablations']['table2']", TABLE2_ROWS)
    _check_rows(ablations["table3"], "report['ablations']['table3']", TABLE3_ROWS)
    sim = report["similarity"]
    if sim is not None:
        if not isinstance(sim, dict):
            raise ReportError("report['similarity']: expected null or a dict of the five "
                              f"similarities {list(SIMILARITY_ROWS)}")
        for key in SIMILARITY_ROWS:
            if key not in sim:
                raise ReportError(f"report['similarity']: missing {key!r}")
            _check_number(sim[key], f"report['similarity'][{key!r}]", -100, 100,
                          nullable=False)
        extra = set(sim) - set(SIMILARITY_ROWS) - {"attack", "n_images", "target"}
        if extra:
            raise ReportError(f"report['similarity']: unknown keys {sorted(extra)}")
    timing = report["timing"]
    if not isinstance(timing, dict):
        raise ReportError("report['timing']: expected {stage: seconds}")
    for stage, s in timing.items():
        _check_number(s, f"report['timing'][{stage!r}]", 0, math.inf, nullable=False)
    settings = report["settings"]
    if not isinstance(settings, dict):
        raise ReportError("report['settings']: expected a dict of the run's settings")
    recipe = settings.get("recipe")
    if recipe is not None and not isinstance(recipe, str):
        raise ReportError(f"report['settings']['recipe']: expected a name or null, got "
                          f"{recipe!r}")
    for key in ("notes", "warnings"):
        v = report.get(key, [])
        if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
            raise ReportError(f"report[{key!r}]: expected a list of strings")
    if not isinstance(report.get("scan", {}), dict):
        raise ReportError("report['scan']: expected {'clean': <scan.json>, attack: {'model': "
                          "<scan.json>, 'data': {...}}} (docs/SCAN.md)")
    if not isinstance(report.get("machine", {}), dict):
        raise ReportError("report['machine']: expected a dict (see machine_info())")
    if report.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ReportError(f"report['schema_version']: this code writes version "
                          f"{SCHEMA_VERSION}, got {report['schema_version']!r}")
    try:
        json.dumps(report, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ReportError(f"report: not JSON-serializable ({e}); store plain numbers, "
                          "strings, lists and dicts") from e


# ---- math for the plots ----------------------------------------------------------------------

def _as_2d(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected features of shape [N, D] with N >= 1, got "
                         f"{x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def pca_project(x, k: int = 2) -> np.ndarray:
    """[N, D] features -> [N, k] coordinates on the top-k principal axes.

    X_c = X - mean(X); X_c = U S V^T (thin SVD); returns X_c V[:, :k] = U[:, :k] S[:k].
    Each axis' sign is fixed so that its largest-magnitude loading is positive
    (deterministic plots). Needs k <= min(N, D)."""
    x = _as_2d(x, "pca_project")
    if not 1 <= k <= min(x.shape):
        raise ValueError(f"pca_project: k={k} must be in [1, min(N, D) = {min(x.shape)}]")
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    axes = vt[:k]
    sign = np.sign(axes[np.arange(k), np.abs(axes).argmax(1)])
    return xc @ (axes * sign[:, None]).T


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_embedding_distance(clean, triggered) -> float:
    """d = mean_i (2 - 2 cos(clean_i, triggered_i)) over paired rows [N, D] (CleanCLIP's
    measure, as abd_fast.evaluate: 0 = identical directions, 2 = orthogonal)."""
    a, b = _as_2d(clean, "clean features"), _as_2d(triggered, "triggered features")
    if a.shape != b.shape:
        raise ValueError(f"clean {a.shape} and triggered {b.shape} features must be paired "
                         "rows of the same shape")
    return float(np.mean(2 - 2 * (_unit(a) * _unit(b)).sum(1)))


# ---- plots -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _model_order(models) -> list[str]:
    """victim, the four paper defenses in Table I's order, then any other defense."""
    order = ["victim"] + [d for d in DEFENSES if d in models]
    return order + sorted(m for m in models if m not in order)


def ca_asr_figure(report: dict, path) -> Path:
    """Grouped bars: CA top-1 (left) and ASR (right) per attack, one bar per model."""
    plt = _pyplot()
    attacks = list(report["attacks"])
    models = _model_order({m for ms in report["attacks"].values() for m in ms})
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 2.2 * len(attacks) + 4), 3.6))
    width = 0.8 / len(models)
    for ax, metric, title in ((axes[0], "ca_top1", "clean accuracy top-1 (%)"),
                              (axes[1], "asr", "attack success rate (%)")):
        for j, m in enumerate(models):
            xs, ys = [], []
            for i, a in enumerate(attacks):
                r = report["attacks"][a].get(m)
                if r is not None and r.get(metric) is not None:
                    xs.append(i + (j - (len(models) - 1) / 2) * width)
                    ys.append(r[metric])
            ax.bar(xs, ys, width, label=MODEL_LABELS.get(m, m))
        clean = report["clean"]
        if metric == "ca_top1" and clean is not None:
            ax.axhline(clean["ca_top1"], color="k", ls="--", lw=1, label="clean model")
        ax.set_xticks(range(len(attacks)), attacks)
        ax.set_ylim(0, 100)
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
               bbox_to_anchor=(0.5, -0.06), frameon=False)
    return _save(fig, Path(path))


def embedding_figure(panels: dict, path, *, max_points: int = 500) -> Path:
    """One panel per model state: {title: (clean [N, D], triggered [N, D])} paired features.

    Each panel: 2-D PCA fit on the union of its clean and triggered rows (features L2-
    normalized first, as the model's cosine geometry), a scatter of both, and
    d = mean(2 - 2 cos) in the title (CleanCLIP Fig. 1). At most max_points pairs are drawn
    (the first ones); d uses all rows."""
    if not panels:
        raise ValueError("embedding_figure: no panels given")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, pair) in zip(axes[0], panels.items()):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"embedding panel {title!r}: expected (clean, triggered) features")
        d = mean_embedding_distance(*pair)
        clean = _unit(_as_2d(pair[0], f"{title}: clean"))[:max_points]
        trig = _unit(_as_2d(pair[1], f"{title}: triggered"))[:max_points]
        xy = pca_project(np.concatenate([clean, trig]), 2)
        n = len(clean)
        ax.scatter(*xy[:n].T, s=6, alpha=0.6, label="clean")
        ax.scatter(*xy[n:].T, s=6, alpha=0.6, label="triggered")
        ax.set_title(f"{title}\nd = {d:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8)
    return _save(fig, Path(path))


def similarity_figure(similarity: dict, path) -> Path:
    """Horizontal bars of ABD Fig. 2's five similarities (cosine x 100)."""
    plt = _pyplot()
    keys = list(SIMILARITY_ROWS)
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    bars = ax.barh(range(len(keys)), [similarity[k] for k in keys], color="tab:purple")
    ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_yticks(range(len(keys)), [SIMILARITY_ROWS[k] for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("mean cosine similarity x 100")
    attack = similarity.get("attack")
    ax.set_title("similarity analysis" + (f" ({attack} victim)" if attack else ""))
    return _save(fig, Path(path))


# ---- markdown --------------------------------------------------------------------------------

def format_number(v, digits: int = 2) -> str:
    """A table cell's number: `digits` decimals, an em dash for None (not run)."""
    return "—" if v is None else f"{v:.{digits}f}"


def _stat(r: dict, key: str, digits: int = 2) -> str:
    """r[key], with ' ± std' when r holds the std over seeds (aggregate_seeds)."""
    std = r.get(f"{key}_std")
    return format_number(r.get(key), digits) + ("" if std is None or r.get(key) is None
                                                else f" ± {std:.{digits}f}")


# ---- several seeds -------------------------------------------------------------------------

SEED_STATS = ("ca_top1", "ca_top5", "asr", "embedding_distance", "capture_rate")


def aggregate_results(results: list) -> dict | None:
    """One Result from the same stage's Results over seeds: each SEED_STATS number is the
    mean, `<key>_std` the sample standard deviation (ddof 1; 0 for one seed) and
    `<key>_seeds` the per-seed values; capture_class joins the per-seed classes when they
    differ ("star/ring"); the counts (and a stage's budget, the same for every seed) are the
    first seed's. None when a seed has none."""
    if not results or any(r is None for r in results):
        return None
    out = {k: results[0][k] for k in ("n_eval", "n_asr", "n_classes", "attack",
                                      "target_label", "budget") if k in results[0]}
    out["n_seeds"] = len(results)
    for key in SEED_STATS:
        values = [r.get(key) for r in results]
        if any(v is None for v in values):
            out[key] = None
            continue
        out[key] = float(np.mean(values))
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out[f"{key}_seeds"] = [float(v) for v in values]
    classes = [r.get("capture_class") for r in results]
    out["capture_class"] = None if None in classes else (
        classes[0] if len(set(classes)) == 1 else "/".join(classes))
    chosen = [(r.get("chosen") or {}).get("name") for r in results]  # a UAP floor's choice
    if None not in chosen:
        out["chosen"] = {"name": chosen[0] if len(set(chosen)) == 1 else "/".join(chosen)}
    return out


def aggregate_seeds(reports: dict, *, clean=None, timing=None, settings=None,
                    notes=()) -> dict:
    """The report of a multi-seed run from the per-seed reports {seed: report}: Table I
    (attacks, floors), Table II/III and the similarity analysis as mean ± std over seeds
    (aggregate_results); `clean`: the shared clean model's Result (default: the first
    seed's); timing/settings/notes: the run's. Per-seed scans stay in the per-seed reports."""
    seeds = list(reports)
    reps = [reports[k] for k in seeds]
    first = reps[0]

    def over(get):
        return aggregate_results([get(r) for r in reps])
    attacks = {a: {m: over(lambda r, a=a, m=m: r["attacks"].get(a, {}).get(m))
                   for m in models} for a, models in first["attacks"].items()}
    floors = {a: {n: over(lambda r, a=a, n=n: (r.get("floors") or {}).get(a, {}).get(n))
                  for n in rows} for a, rows in (first.get("floors") or {}).items()}
    ablations = {}
    for key, table in first["ablations"].items():
        ablations[key] = None if table is None else {
            "attack": table["attack"],
            "rows": {row: over(lambda r, key=key, row=row: (r["ablations"][key] or {})
                               .get("rows", {}).get(row)) for row in table["rows"]}}
    similarity = None
    if all(r["similarity"] is not None for r in reps):
        similarity = {k: float(np.mean([r["similarity"][k] for r in reps]))
                      for k in SIMILARITY_ROWS}
        similarity.update({k: first["similarity"][k] for k in ("attack", "target")
                           if k in first["similarity"]})
    return {"clean": first["clean"] if clean is None else clean, "attacks": attacks,
            "floors": floors, "ablations": ablations, "similarity": similarity,
            "timing": dict(timing or {}), "settings": {**first["settings"], **(settings or {}),
                                                     "seeds": seeds},
            "notes": [f"Mean ± sample standard deviation (ddof 1) over seeds "
                      f"{', '.join(map(str, seeds))}; each seed's own report is "
                      "seed<k>/report.md.", *notes]}


MAX_SIGN_FLIP_RUNS = 20  # exact enumeration of 2^n sign assignments


def sign_flip_p(gaps) -> float:
    """Exact two-sided sign-flip test of "mean paired gap = 0": the share of the 2^n ±
    assignments of the gaps whose |sum| is at least the observed |sum|. No distribution is
    assumed; with n gaps the smallest possible p is 2 / 2^n (0.25 for three seeds)."""
    g = np.asarray(gaps, dtype=np.float64)
    if not 1 <= g.size <= MAX_SIGN_FLIP_RUNS:
        raise ValueError(f"sign_flip_p: {g.size} gaps; expected 1 to {MAX_SIGN_FLIP_RUNS}")
    bits = (np.arange(2 ** g.size)[:, None] >> np.arange(g.size)) & 1
    sums = np.abs((1 - 2 * bits) @ g)
    return float(np.mean(sums >= abs(g.sum()) - 1e-9))


def paired_gaps(gaps) -> dict:
    """Summary of paired gaps (one per seed or run): n, mean, sample std (None for one),
    how many are below / level with / above 0, and sign_flip_p."""
    g = [float(x) for x in gaps]
    return {"n": len(g), "mean": float(np.mean(g)),
            "std": float(np.std(g, ddof=1)) if len(g) > 1 else None,
            "below": sum(x < 0 for x in g), "level": sum(x == 0 for x in g),
            "above": sum(x > 0 for x in g), "p_sign_flip": sign_flip_p(g), "gaps": g}


def _cell(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table (and a blank line after it)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows] + [""]


def machine_info() -> dict:
    """Where the run ran: OS, Python, torch, CPU model and cores, GPUs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def weak_model_warnings(report: dict) -> list[str]:
    """Warnings for numbers that mean little: the clean model's zero-shot CA top-1 under
    twice chance (100 / n_classes; needs the clean result's n_classes), a victim's ASR under
    50%, a victim more than VICTIM_CA_DROP CA points under the clean model (damaged), a
    defense whose CA fell under twice chance from a victim above it (collapsed). Each says
    what it means and what to try."""
    out = []
    clean = report.get("clean") or {}
    n_classes = clean.get("n_classes")
    weak_ca = WEAK_CA_TIMES_CHANCE * 100 / n_classes if n_classes else None  # twice chance
    if weak_ca is not None and clean["ca_top1"] < weak_ca:
        out.append(
            f"The clean model is weak: zero-shot CA top-1 {clean['ca_top1']:.2f}% is under "
            f"twice chance ({weak_ca:.2f}% for {n_classes} "
            "classes). It has barely learned to tell the classes apart, so the CA and ASR "
            "differences between its victims and defenses below mean little. Try pretrained "
            "weights (--pretrained), more epochs (--epochs), or more and more varied caption "
            "data (captions that name the classes).")
    for attack, models in report.get("attacks", {}).items():
        asr = (models.get("victim") or {}).get("asr")
        if asr is not None and asr < WEAK_VICTIM_ASR:
            out.append(
                f"The {attack} victim's ASR is {asr:.2f}%, under {WEAK_VICTIM_ASR:g}%: the "
                "backdoor did not take hold, so a defense's low ASR on it shows little about "
                "removing a backdoor. Try more poisoned samples (--poison-rate / "
                "--poison-count), more poisoning epochs or a higher poisoning lr "
                "(stage-flags `poison: {epochs: ..., lr: ...}`), or a stronger clean model "
                "(--pretrained, more epochs, more data).")
        victim_ca = (models.get("victim") or {}).get("ca_top1")
        clean_ca = clean.get("ca_top1")
        if victim_ca is not None and clean_ca is not None and \
                clean_ca - victim_ca > VICTIM_CA_DROP:
            out.append(
                f"The {attack} victim's CA top-1 is {victim_ca:.2f}%, "
                f"{clean_ca - victim_ca:.1f} points under the clean model's {clean_ca:.2f}%: "
                "the poisoning fine-tune damaged the model besides planting the backdoor, and "
                "every defense starts from that damage. Poison with a smaller lr or fewer "
                "epochs (stage-flags `poison: {lr: ...}`); the paper poisons pretrained CLIP "
                "at lr 1e-6, batch 128 (configs/paper/pipeline.yaml).")
        if weak_ca is None or victim_ca is None or victim_ca < weak_ca:
            continue  # a defense can only collapse from a victim that knew the classes
        for name, r in models.items():
            ca = (r or {}).get("ca_top1")
            if name == "victim" or ca is None or ca >= weak_ca:
                continue
            out.append(
                f"{MODEL_LABELS.get(name, name)} on the {attack} victim collapsed: CA top-1 "
                f"{ca:.2f}% is under twice chance ({weak_ca:.2f}%), from the victim's "
                f"{victim_ca:.2f}%. Its ASR is then the share of images it puts in the target "
                "class anyway, not a backdoor: its row says nothing about removing one. Try "
                "that defense with a smaller budget (defend --budget-ratio, or --budget fixed "
                "--lr; docs/METHOD.md).")
    return out


def paper_recipe(report: dict) -> bool:
    """True when the run followed one of the paper's recipes (its numbers are printed)."""
    return report["settings"].get("recipe") in PAPER_RECIPES


ABLATION_TITLES = {"table2": ("Table II: ABD's views (FT, +I_adv, +T_eda, both)", TABLE2_ROWS),
                   "table3": ("Table III: UAP vs UAP + backdoor loss L_bd", TABLE3_ROWS)}
PLOT_CAPTIONS = {"ca_asr": "CA and ASR per attack and defense",
                 "embedding": "clean vs triggered image embeddings (PCA)",
                 "similarity": "similarity analysis"}


def render_markdown(report: dict, plots: dict | None = None) -> str:
    """report.md: warnings, settings and machine, Table I, Table II, Table III, similarity,
    timing, plots (file names relative to report.md) and notes. With a paper recipe, the
    paper's numbers (PAPER_REFERENCE) stand beside ours."""
    paper = paper_recipe(report)
    sections = [
        ["# abd_fast report", ""],
        [line for w in report.get("warnings", []) for line in (f"> **Warning:** {w}", "")],
        _run_section(report, paper),
        _clean_section(report["clean"]),
        _table1_section(report["attacks"], paper, report.get("floors") or {}),
        _paired_section(report["attacks"]),
        *(_ablation_section(key, report["ablations"][key], paper) for key in ABLATION_TITLES),
        _similarity_section(report["similarity"], paper),
        _scan_section(report.get("scan"), report["settings"].get("scan_calibration")),
        _timing_section(report["timing"]),
        _plots_section(plots),
        _notes_section(report["notes"]),
    ]
    return "\n".join(line for section in sections for line in section)


def _run_section(report: dict, paper: bool) -> list[str]:
    """The run's settings and the machine it ran on."""
    settings = report["settings"]
    out = ["## Run", ""]
    out += markdown_table(["setting", "value"],
                          [[_cell(k), _cell(v)] for k, v in settings.items()])
    if settings.get("recipe") and not paper:
        out += [f"Recipe `{settings['recipe']}` has no paper reference numbers "
                f"(paper recipes: {', '.join(PAPER_RECIPES)}).", ""]
    machine = report.get("machine") or {}
    if machine:
        shown = {k: (", ".join(map(str, v)) or "none") if isinstance(v, list) else v
                 for k, v in machine.items()}
        out += ["Machine: " + "; ".join(f"{k} {_cell(v)}" for k, v in shown.items()), ""]
    return out


def _clean_section(clean: dict | None) -> list[str]:
    out = ["## Clean model", ""]
    if clean is None:
        return out + ["Not evaluated.", ""]
    return out + [f"Zero-shot CA top-1 {format_number(clean['ca_top1'])}%, top-5 "
                  f"{format_number(clean.get('ca_top5'))}% ({clean.get('n_eval', '?')} images).",
                  ""]


def _capture_cell(r: dict) -> str:
    """'star 99.1%': the class the trigger (or UAP) sends most images to, target-free."""
    if r.get("capture_class") is None:
        return "—"
    return f"{_cell(r['capture_class'])} {_stat(r, 'capture_rate', 1)}%"


def _table1_section(attacks: dict, paper: bool, floors: dict) -> list[str]:
    """Table I: CA, ASR and embedding distance of each victim and its defenses, with the
    floors (the clean model under the attack's trigger; the victim's UAP alone)."""
    ref = PAPER_REFERENCE
    out = ["## Table I: clean accuracy and attack success rate (%)", "",
           "ASR = share of non-target-class images classified as the target once triggered "
           "(target-class images excluded); d = mean 2 - 2cos between clean and triggered "
           "image embeddings; captured = the class the trigger sends the largest share of the "
           "other classes' images to, and that share (target-free).", ""]
    if floors:
        out += ["Floors: *clean model (floor)* = the clean model under the attack's trigger "
                "(the ASR a model without the backdoor has); *UAP alone* = the victim with its "
                "UAP instead of the trigger (ASR = the UAP's rate to the target, which the "
                "defender does not know; captured = where it sends images, target-free; in "
                "brackets, when there were candidates, the one `uap-select` chose on the "
                "validation split).", ""]
    header = ["attack", "model", "CA top-1", "ASR", "d", "captured"]
    budgets = any((r or {}).get("budget") for models in attacks.values()
                  for r in models.values())
    if budgets:
        header += ["pairs", "steps", "lr", "steps x lr", "/ poisoning"]
    if paper:
        header += ["paper CA", "paper ASR"]
    rows = []
    for attack, models in attacks.items():
        floor = floors.get(attack, {})
        poisoning = next((r["budget"]["poisoning"] for r in models.values()
                          if (r or {}).get("budget") and r["budget"].get("poisoning")), None)
        named = [(None, FLOOR_ROWS["clean"], floor["clean"])] if "clean" in floor else []
        for m in _model_order(models):
            named.append((m, MODEL_LABELS.get(m, m), models.get(m)))
            if m == "victim" and "uap" in floor:
                chosen = (floor["uap"] or {}).get("chosen")
                named.append((None, FLOOR_ROWS["uap"] + (f" ({chosen['name']})" if chosen
                                                         else ""), floor["uap"]))
        for m, label, r in named:
            r = r or {}
            row = [attack, label, _stat(r, "ca_top1"), _stat(r, "asr"),
                   _stat(r, "embedding_distance", 3), _capture_cell(r)]
            if budgets:
                row += _budget_cells(poisoning if m == "victim" else r.get("budget"),
                                     victim=m == "victim")
            if paper:
                p = ref["table1"].get(attack, {}).get(m, (None, None))
                row += [format_number(p[0]), format_number(p[1])]
            rows.append(row)
    out += markdown_table(header, rows) if rows else ["No attack was run.", ""]
    if budgets:
        out += ["Budget: the clean pairs a defense fine-tunes on, its optimizer steps, peak lr, "
                "steps x lr and that over the poisoning's (the victim rows: the poisoning's own "
                "pairs per epoch, steps and lr).", ""]
    if paper:
        out += [f"Paper numbers (RN50 CLIP, CC3M subsets, ImageNet-1K val; comparable only at "
                f"the recipe's full scale): {ref['source']}.", ""]
    return out


def _paired_section(attacks: dict, method: str = "abd") -> list[str]:
    """With several seeds: ABD's ASR against each other defense's, paired by seed (the same
    victim and evaluation images), as paired_gaps."""
    rows, n = [], 0
    for attack, models in attacks.items():
        mine = (models.get(method) or {}).get("asr_seeds")
        for m in _model_order(models):
            theirs = (models.get(m) or {}).get("asr_seeds")
            if m in ("victim", method) or not mine or not theirs or len(mine) < 2:
                continue
            s, n = paired_gaps(np.subtract(mine, theirs)), len(mine)
            rows.append([attack, f"{MODEL_LABELS.get(method, method)} − "
                                 f"{MODEL_LABELS.get(m, m)}",
                         " ; ".join(f"{x:+.2f}" for x in s["gaps"]), f"{s['mean']:+.2f}",
                         f"{s['below']} / {s['level']} / {s['above']}",
                         f"{s['p_sign_flip']:.3f}"])
    if not rows:
        return []
    return ["## ABD against each baseline, paired by seed", "",
            "ASR gap per seed in points (negative: ABD lower), its mean, how many seeds are "
            "below / level / above, and the exact two-sided sign-flip p of \"mean gap = 0\" "
            f"(with {n} seeds the smallest possible p is {2 / 2 ** n:.3g}).", ""] + \
        markdown_table(["attack", "ASR gap", "per seed", "mean", "below / level / above",
                        "p (sign flip)"], rows)


def _budget_cells(b: dict | None, victim: bool) -> list[str]:
    """pairs, steps, lr, steps x lr, ratio to the poisoning's ("-" where unknown)."""
    if not b:
        return ["-"] * 5
    ratio = 1.0 if victim else b.get("ratio")
    return [str(b["pairs"]), str(b["steps"]), f"{b['lr']:.3g}", f"{b['steps_x_lr']:.3g}",
            "-" if ratio is None else f"{ratio:.2f}"]


def _ablation_section(key: str, table: dict | None, paper: bool) -> list[str]:
    """Table II or III (key "table2" / "table3"); the paper's numbers exist for Table III."""
    title, names = ABLATION_TITLES[key]
    out = [f"## {title}", ""]
    if table is None:
        return out + ["Not run.", ""]
    attack = table["attack"]
    with_paper = paper and key == "table3"
    header = ["setting", "CA top-1", "ASR"] + (["paper CA", "paper ASR"] if with_paper else [])
    rows = []
    for row_key, label in names.items():
        if row_key not in table["rows"]:
            continue
        r = table["rows"][row_key] or {}
        row = [label, _stat(r, "ca_top1"), _stat(r, "asr")]
        if with_paper:
            p = PAPER_REFERENCE["table3"].get(attack, {}).get(row_key, (None, None))
            row += [format_number(p[0]), format_number(p[1])]
        rows.append(row)
    return out + [f"Attack: {attack}.", ""] + markdown_table(header, rows)


def _similarity_section(sim: dict | None, paper: bool) -> list[str]:
    """ABD Fig. 2's five similarities."""
    out = ["## Similarity analysis (ABD Fig. 2): mean cosine x 100", ""]
    if sim is None:
        return out + ["Not run.", ""]
    if sim.get("attack"):
        out += [f"On the {sim['attack']} victim"
                + (f", {sim['n_images']} images." if sim.get("n_images") else "."), ""]
    header = ["image / caption", "ours"] + (["paper"] if paper else [])
    rows = [[label, format_number(sim[k])]
            + ([format_number(PAPER_REFERENCE["similarity"][k])] if paper else [])
            for k, label in SIMILARITY_ROWS.items()]
    return out + markdown_table(header, rows)


def _scan_section(scans: dict | None, calibration: dict | None = None) -> list[str]:
    """The backdoor scans (docs/SCAN.md): each model's verdict, score and suspected target;
    how well the data scan found each victim's poisoned training pairs; the threshold's
    calibration in the run (`pipeline --scan-threshold calibrate`), when made."""
    if not scans:
        return []
    out = ["## Backdoor scan (no target, no trigger given; docs/SCAN.md)", ""]
    if calibration:
        scores = ", ".join(f"{name} {format_number(v)}" for name, v in
                           calibration["scores"].items())
        out += [f"The victims' threshold, {format_number(calibration['threshold'])}, was "
                f"calibrated in this run: the largest reference-mode score of clean fine-tunes "
                f"of the clean model (the victims' poisoning without poisons), scanned on "
                f"{calibration['split']} ({scores}), + {format_number(calibration['margin'])}.",
                ""]
    rows = []
    for name, entry in scans.items():
        model = entry if name == "clean" else entry.get("model", {})
        data = {} if name == "clean" else entry.get("data", {})
        rows.append([_cell(name if name == "clean" else f"{name} victim"),
                     "backdoored" if model.get("backdoored") else "clean",
                     f"{format_number(model.get('score'))} / "
                     f"{format_number(model.get('threshold'))}",
                     _cell(model.get("suspected_target") or "-"), _cell(model.get("mode", "")),
                     format_number(data.get("auroc"), 3) if data else "-",
                     format_number(data.get("precision_at_poison_count"), 3) if data else "-"])
    out += markdown_table(["model", "verdict", "score / threshold", "suspected target", "mode",
                           "data AUROC", "precision at poison count"], rows)
    return out


def _timing_section(timing: dict) -> list[str]:
    """Seconds per stage and their total."""
    rows = [[_cell(stage), f"{s:.1f}"] for stage, s in timing.items()]
    if "total" not in timing and timing:
        rows.append(["total", f"{sum(timing.values()):.1f}"])
    return ["## Timing", ""] + (markdown_table(["stage", "seconds"], rows) if rows
                                else ["No timing recorded.", ""])


def _plots_section(plots: dict | None) -> list[str]:
    if not plots:
        return []
    return ["## Plots", ""] + [f"![{PLOT_CAPTIONS.get(k, k)}]({name})"
                               for k, name in plots.items()] + [""]


def _notes_section(notes: list[str]) -> list[str]:
    return ["## Notes", ""] + [f"- {n}" for n in notes] + [""] if notes else []


# ---- writing ---------------------------------------------------------------------------------

def write_report(report: dict, out_dir, *, embeddings: dict | None = None) -> dict:
    """Validates `report` (ReportError on a malformed dict) and writes into out_dir:
    report.json, report.md, ca_asr.png (when an attack was run), embedding.png (when
    `embeddings` = {panel title: (clean [N, D], triggered [N, D])} is given) and
    similarity.png (when report["similarity"] is set). report.json is the input plus
    "schema_version" and, unless given, "machine" (machine_info()) and "warnings"
    (weak_model_warnings(); report.md opens with them).

    Returns {"json", "md", "ca_asr", "embedding", "similarity"}: Paths, None for plots not
    drawn."""
    validate_report(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(report, schema_version=SCHEMA_VERSION)
    data.setdefault("machine", machine_info())
    data.setdefault("warnings", weak_model_warnings(report))
    paths = {"json": out / "report.json", "md": out / "report.md", "ca_asr": None,
             "embedding": None, "similarity": None}
    if any(any(r is not None for r in ms.values()) for ms in report["attacks"].values()):
        paths["ca_asr"] = ca_asr_figure(report, out / "ca_asr.png")
    if embeddings:
        paths["embedding"] = embedding_figure(embeddings, out / "embedding.png")
    if report["similarity"] is not None:
        paths["similarity"] = similarity_figure(report["similarity"], out / "similarity.png")
    plots = {k: paths[k].name for k in ("ca_asr", "embedding", "similarity") if paths[k]}
    atomic_write_text(render_markdown(data, plots), paths["md"])
    atomic_write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", paths["json"])
    return paths
