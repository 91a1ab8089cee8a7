"""abd_fast.report: schema validation, report.json / report.md / PNG outputs, the PCA and
similarity helpers, and the paper recipes in configs/paper.

Every number in the report dicts below is MADE-UP TEST INPUT (random draws), not a result."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abd_fast import report as rp

ROOT = Path(__file__).resolve().parents[1]


def _result(g: np.random.Generator, asr=True) -> dict:
    """A made-up evaluation result in abd_fast.evaluate's format."""
    return {"ca_top1": float(g.uniform(20, 80)), "ca_top5": float(g.uniform(80, 100)),
            "asr": float(g.uniform(0, 100)) if asr else None, "n_eval": 997, "n_asr": 901,
            "embedding_distance": float(g.uniform(0, 2)) if asr else None}


def synthetic_report(seed: int = 0, recipe=None) -> dict:
    """A complete report dict of made-up numbers (test input only)."""
    g = np.random.default_rng(seed)
    attacks = {a: {m: _result(g) for m in ("victim", "ft", "cleanclip", "roclip", "abd")}
               for a in ("badnet", "blended", "badclip")}
    return {
        "clean": _result(g, asr=False),
        "attacks": attacks,
        "ablations": {
            "table2": {"attack": "badnet",
                       "rows": {k: _result(g) for k in ("ft", "i_adv", "t_eda", "i_adv_t_eda")}},
            "table3": {"attack": "badnet", "rows": {k: _result(g) for k in ("uap", "uap_bd")}},
        },
        "similarity": {"attack": "badnet", "n_images": 37,
                       **{k: float(g.uniform(-30, 40)) for k in rp.SIMILARITY_ROWS}},
        "timing": {"clean": float(g.uniform(1, 99)), "poison/badnet": float(g.uniform(1, 99)),
                   "uap/badnet": float(g.uniform(1, 99))},
        "settings": {"model": "abd-tiny-rn", "image_size": 32, "seed": seed, "recipe": recipe,
                     "train_data": "a|b.csv"},
        "notes": ["test input: every number here is made up",
                  "no reference model: the poisoned encoder stood in"],
    }


def _embeddings(g: torch.Generator):
    # Odd sizes; the triggered features of the "victim" collapse toward one direction.
    clean = torch.randn(37, 13, generator=g)
    return {"victim (badnet)": (clean, 0.2 * clean + torch.randn(13, generator=g) * 3),
            "abd": (clean, clean + 0.1 * torch.randn(37, 13, generator=g))}


def test_write_report_outputs(tmp_path):
    rep = synthetic_report(1)
    paths = rp.write_report(rep, tmp_path / "run", embeddings=_embeddings(torch.Generator()
                                                                            .manual_seed(3)))
    data = json.loads(paths["json"].read_text())
    rp.validate_report(data)  # the written file follows the schema it documents
    assert data["schema_version"] == rp.SCHEMA_VERSION and data["machine"]["cores"] >= 1
    assert data["attacks"]["blended"]["abd"]["asr"] == pytest.approx(
        rep["attacks"]["blended"]["abd"]["asr"])
    assert not list((tmp_path / "run").glob(".*tmp"))  # no temp files left
    md = paths["md"].read_text()
    for title in ("Table I", "Table II", "Table III", "Similarity analysis", "Timing"):
        assert f"## {title}" in md
    # Table I row of blended / CleanCLIP carries that result's numbers.
    r = rep["attacks"]["blended"]["cleanclip"]
    assert f"| blended | CleanCLIP | {r['ca_top1']:.2f} | {r['asr']:.2f} |" in md
    t3 = rep["ablations"]["table3"]["rows"]["uap_bd"]
    assert f"| UAP + L_bd | {t3['ca_top1']:.2f} | {t3['asr']:.2f} |" in md
    assert f"| total | {sum(rep['timing'].values()):.1f} |" in md
    assert "a\\|b.csv" in md  # a '|' in a setting does not break the table
    assert "no reference model" in md
    for key in ("ca_asr", "embedding", "similarity"):
        assert f"]({paths[key].name})" in md
        with Image.open(paths[key]) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_parts_not_run(tmp_path):
    rep = synthetic_report(2)
    rep["ablations"] = {"table2": None, "table3": None}
    rep["similarity"] = None
    rep["clean"] = None
    rep["attacks"]["badnet"]["roclip"] = None
    paths = rp.write_report(rep, tmp_path)
    assert paths["similarity"] is None and paths["embedding"] is None
    assert not (tmp_path / "similarity.png").exists()
    md = paths["md"].read_text()
    assert md.count("Not run.") == 3
    assert "| badnet | RoCLIP | — | — | — |" in md


def test_table1_states_each_defenses_budget(tmp_path):
    """With budgets in the defenses' results (defend's eval.json), Table I gains pairs, steps,
    lr, steps x lr and the ratio to the poisoning's; the victim row shows the poisoning's."""
    from abd_fast.defenses.budget import budget_record
    rep = synthetic_report(5)
    g = np.random.default_rng(5)
    poisoning = {"steps": int(g.integers(100, 900)), "lr": float(g.uniform(1e-5, 1e-3)),
                 "batch_size": 128, "epochs": 3, "pairs": int(g.integers(1000, 9000))}
    poisoning["steps_x_lr"] = poisoning["steps"] * poisoning["lr"]
    steps, lr = int(g.integers(50, 500)), float(g.uniform(1e-5, 1e-3))
    for m in ("ft", "cleanclip", "roclip", "abd"):
        rep["attacks"]["badnet"][m]["budget"] = budget_record(
            "paper", pairs=steps * 32, steps=steps, lr=lr, batch_size=64, epochs=2,
            poisoning=poisoning)
    paths = rp.write_report(rep, tmp_path)
    assert json.loads(paths["json"].read_text())["attacks"]["badnet"]["abd"]["budget"][
        "steps"] == steps
    md = paths["md"].read_text()
    assert "| pairs | steps | lr | steps x lr | / poisoning |" in md
    ratio = steps * lr / poisoning["steps_x_lr"]
    r = rep["attacks"]["badnet"]["abd"]
    assert (f"| badnet | ABD | {r['ca_top1']:.2f} | {r['asr']:.2f} | "
            f"{r['embedding_distance']:.3f} | {rp._capture_cell(r)} | {steps * 32} | {steps} | "
            f"{lr:.3g} | "
            f"{steps * lr:.3g} | {ratio:.2f} |") in md
    assert (f"| {poisoning['pairs']} | {poisoning['steps']} | {poisoning['lr']:.3g} | "
            f"{poisoning['steps_x_lr']:.3g} | 1.00 |") in md  # the badnet victim row
    assert "| blended | FT |" in md and md.count("| - | - | - | - | - |") == 10  # no budgets
    rep["attacks"]["badnet"]["ft"]["budget"]["steps"] = -1
    with pytest.raises(rp.ReportError, match=r"\['budget'\]\['steps'\]"):
        rp.write_report(rep, tmp_path / "bad")


def _break(rep, path, value):
    *parents, last = path
    obj = rep
    for p in parents:
        obj = obj[p]
    if value is KeyError:
        del obj[last]
    else:
        obj[last] = value
    return rep


@pytest.mark.parametrize("path, value, message", [
    (("attacks", "badnet", "abd", "asr"), 140.0, "['abd']['asr']: expected a number in [0, 100]"),
    (("attacks", "badnet", "abd", "asr"), math.nan, "['abd']['asr']"),
    (("attacks", "badnet", "abd", "ca_top1"), None, "['ca_top1']: expected a number"),
    (("attacks", "badnet", "abd", "ca_top1"), KeyError, "missing 'ca_top1'"),
    (("attacks", "badnet", "victim"), KeyError, "expected a dict with 'victim'"),
    (("attacks", "blended", "ft"), [51.0, 3.0], "['ft']: expected an evaluation result"),
    (("attacks", "badnet", "ft", "n_asr"), -3, "['n_asr']: expected a count"),
    (("timing", "uap/badnet"), -1.5, "report['timing']['uap/badnet']"),
    (("clean",), KeyError, "missing keys ['clean']"),
    (("ablations", "table2", "rows", "both"), {"ca_top1": 50.0}, "unknown row 'both'"),
    (("ablations", "table3"), KeyError, "expected {'table2': ..., 'table3': ...}"),
    (("similarity", "adversarial_own_caption"), KeyError, "missing 'adversarial_own_caption'"),
    (("similarity", "clean_own_caption"), 250.0, "['clean_own_caption']"),
    (("settings", "recipe"), 3, "['recipe']: expected a name or null"),
    (("notes",), "a note", "report['notes']: expected a list of strings"),
    (("warnings",), [3], "report['warnings']: expected a list of strings"),
    (("clean", "n_classes"), 0, "['n_classes']: expected a count (int >= 1)"),
    (("settings", "output"), Path("/tmp/x"), "not JSON-serializable"),
    (("extra_field",), 1, "unknown keys ['extra_field']"),
    (("machine",), "2 cores", "report['machine']: expected a dict"),
    (("schema_version",), 7, "writes version 1, got 7"),
])
def test_malformed_report_rejected(tmp_path, path, value, message):
    rep = _break(synthetic_report(3), path, value)
    with pytest.raises(rp.ReportError) as e:
        rp.write_report(rep, tmp_path)
    assert message in str(e.value)
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("n_classes, clean_ca, victim_asr, expected", [
    (10, 19.9, 95.0, ["clean"]),              # under twice chance (20% for 10 classes)
    (10, 20.0, 95.0, []),                     # at twice chance: no warning
    (1000, 0.15, 49.9, ["clean", "badnet"]),  # ImageNet-sized: 0.2%; a victim under 50%
    (None, 1.0, 50.0, []),                    # unknown class count: no CA warning
])
def test_weak_models_are_warned_about(tmp_path, n_classes, clean_ca, victim_asr, expected):
    rep = synthetic_report(4)
    rep["clean"]["ca_top1"] = clean_ca
    if n_classes is not None:
        rep["clean"]["n_classes"] = n_classes
    for attack, models in rep["attacks"].items():   # only badnet's victim may be weak
        models["victim"]["asr"] = victim_asr if attack == "badnet" else 97.0
        models["victim"]["ca_top1"] = clean_ca  # not damaged (the next test)
    paths = rp.write_report(rep, tmp_path)
    warnings = json.loads(paths["json"].read_text())["warnings"]
    assert len(warnings) == len(expected)
    for w, kind in zip(warnings, expected):
        if kind == "clean":
            assert w.startswith(f"The clean model is weak: zero-shot CA top-1 {clean_ca:.2f}% "
                                f"is under twice chance ({200 / n_classes:.2f}% for "
                                f"{n_classes} classes)")
            assert "--pretrained" in w and "--epochs" in w and "caption data" in w
        else:
            assert w.startswith(f"The badnet victim's ASR is {victim_asr:.2f}%, under 50%")
            assert "--poison-rate" in w and "--pretrained" in w
    md = paths["md"].read_text().splitlines()
    shown = [line for line in md if line.startswith("> **Warning:**")]
    assert shown == [f"> **Warning:** {w}" for w in warnings]
    if warnings:   # report.md opens with them, right under its title
        assert md[2] == shown[0]


def test_a_victim_damaged_by_its_poisoning_is_warned_about(tmp_path):
    """A victim more than 10 CA points under the clean model (a pretrained CLIP poisoned at
    the demo's lr) gets a warning with both numbers and the paper's lr; 10 points does not."""
    rep = synthetic_report(4)
    rep["clean"]["ca_top1"] = 59.6
    for attack, ca in zip(rep["attacks"], (12.25, 49.6, 61.0)):
        rep["attacks"][attack]["victim"]["ca_top1"] = ca
    warnings = json.loads(rp.write_report(rep, tmp_path)["json"].read_text())["warnings"]
    damaged = [w for w in warnings if "damaged" in w]
    assert damaged == [w for w in warnings if w.startswith("The badnet victim's CA top-1")]
    assert len(damaged) == 1 and "12.25%, 47.4 points under the clean model's 59.60%" in \
        damaged[0] and "lr 1e-6" in damaged[0]


def test_a_collapsed_defense_is_warned_about(tmp_path):
    """A defense whose CA fell under twice chance (RoCLIP at the demo's lr: docs/METHOD.md)
    gets a warning naming it, the attack and the numbers; one at twice chance does not."""
    rep = synthetic_report(4)
    rep["clean"]["n_classes"] = 10
    models = rep["attacks"]["blended"]
    defenses = [m for m in models if m != "victim"]
    models["victim"]["ca_top1"] = 98.5
    models[defenses[0]]["ca_top1"], models[defenses[1]]["ca_top1"] = 11.3, 20.0
    warnings = json.loads(rp.write_report(rep, tmp_path)["json"].read_text())["warnings"]
    collapsed = [w for w in warnings if "collapsed" in w]
    label = rp.MODEL_LABELS[defenses[0]]
    assert collapsed == [w for w in warnings if w.startswith(f"{label} on the blended")]
    assert len(collapsed) == 1 and "CA top-1 11.30% is under twice chance (20.00%), from the " \
        "victim's 98.50%" in collapsed[0] and "--budget-ratio" in collapsed[0]


def test_report_not_a_dict():
    with pytest.raises(rp.ReportError, match="expected a dict"):
        rp.validate_report([1, 2])


def test_paper_numbers_only_with_paper_recipe(tmp_path):
    badnet_victim = "58.69 | 96.51"
    md_none = rp.write_report(synthetic_report(4), tmp_path / "a")["md"].read_text()
    md_other = rp.write_report(synthetic_report(4, recipe="my-recipe"),
                               tmp_path / "b")["md"].read_text()
    md_paper = rp.write_report(synthetic_report(4, recipe="abd-paper"),
                               tmp_path / "c")["md"].read_text()
    for md in (md_none, md_other):
        assert badnet_victim not in md and "paper CA" not in md
    assert "no paper reference numbers" in md_other
    assert "paper CA" in md_paper and rp.PAPER_REFERENCE["source"] in md_paper
    ref = rp.PAPER_REFERENCE["table1"]
    for attack, models in ref.items():
        for m, (ca, asr) in models.items():
            assert f"| {attack} | {rp.MODEL_LABELS[m]} | " in md_paper
            assert f"| {ca:.2f} | {asr:.2f} |" in md_paper
    assert "| 53.70 | 10.49 |" in md_paper  # Table III, badnet, UAP + L_bd
    assert "| 25.02 |" in md_paper  # Fig. 2, clean image / own caption


@pytest.mark.parametrize("n, d", [(37, 13), (5, 29), (101, 3)])
def test_pca_project_matches_svd(n, d):
    g = np.random.default_rng(n * d)
    x = g.normal(size=(n, d)) * g.uniform(0.5, 3, size=d) + g.normal(size=d)
    got = rp.pca_project(torch.from_numpy(x).float(), 2)
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    want = u[:, :2] * s[:2]
    assert got.shape == (n, 2)
    # Same axes up to sign (float32 input: tolerance of its rounding).
    for k in range(2):
        sign = np.sign(got[:, k] @ want[:, k])
        np.testing.assert_allclose(got[:, k], sign * want[:, k], rtol=1e-4, atol=1e-4)
    # Column variances are the top eigenvalues of the covariance, in decreasing order.
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]
    np.testing.assert_allclose(got.var(0, ddof=1), eig[:2], rtol=1e-4)
    # Deterministic sign: the same data shifted and row-permuted gives the same points.
    perm = g.permutation(n)
    np.testing.assert_allclose(rp.pca_project(x[perm] + 5.0, 2), rp.pca_project(x, 2)[perm],
                               atol=1e-8)


def test_pca_project_bad_input():
    with pytest.raises(ValueError, match=r"k=4 must be in \[1, min\(N, D\) = 3\]"):
        rp.pca_project(np.random.default_rng(0).normal(size=(7, 3)), 4)
    with pytest.raises(ValueError, match="shape"):
        rp.pca_project(np.ones(5), 1)


def test_mean_distance_and_similarity_match_loops():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(23, 9, generator=g), torch.randn(23, 9, generator=g)
    want = sum(2 - 2 * torch.nn.functional.cosine_similarity(a[i], b[i], dim=0).item()
               for i in range(23)) / 23
    assert rp.mean_embedding_distance(a, b) == pytest.approx(want, rel=1e-5)
    assert rp.mean_embedding_distance(a, 3 * a) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="paired"):
        rp.mean_embedding_distance(a, b[:5])

    # abd_fast.evaluate.similarity_analysis's output fits the schema as is
    s = {"clean_own_caption": 25.0, "triggered_backdoor_caption": 28.5,
         "adversarial_own_caption": 19.8, "adversarial_backdoor_caption": 16.0,
         "adversarial_unrelated_caption": 5.0, "n_images": 23, "target": "star"}
    rep = synthetic_report(5)
    rep["similarity"] = dict(s, attack="badnet")
    rp.validate_report(rep)


# ---- configs/paper ---------------------------------------------------------------------------

PAPER_CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def _load(path):
    import yaml
    return yaml.safe_load(path.read_text())


def test_paper_configs_follow_the_recipes():
    names = {p.stem: _load(p) for p in PAPER_CONFIGS}
    assert {"poison-badnet", "poison-blended", "poison-badclip", "uap", "defend-abd",
            "defend-cleanclip", "defend-ft", "defend-roclip", "eval"} <= set(names)
    for stem, cfg in names.items():
        assert cfg["recipe"] in rp.PAPER_RECIPES, stem
        assert all(k == k.lower() and "_" not in k for k in cfg), f"{stem}: keys are kebab-case"
        assert cfg.get("model", "RN50") == "RN50", stem
    for attack in ("badnet", "blended", "badclip"):
        c = names[f"poison-{attack}"]
        assert (c["attack"], c["poison-count"], c["batch-size"], c["lr"], c["warmup"]) == \
            (attack, 1500, 128, 1e-6, 50)
        assert c["epochs"] == (10 if attack == "badclip" else 5)
        assert c["target-label"] == "banana"
    assert (names["uap"]["batch-size"], names["uap"]["epochs"], names["uap"]["mode"],
            names["uap"]["patch-area"]) == (16, 20, "patch", 0.03)
    abd = names["defend-abd"]
    assert (abd["method"], abd["batch-size"], abd["lr"], abd["epochs"]) == ("abd", 64, 3e-6, 10)
    cc = names["defend-cleanclip"]
    assert (cc["method"], cc["batch-size"], cc["lr"], cc["epochs"], cc["warmup"]) == \
        ("cleanclip", 64, 1e-5, 10, 50)
    assert names["eval"]["target-label"] == "banana"


def test_paper_configs_parse_with_the_cli(tmp_path):
    """Every key except `recipe` is a flag of its command in abd_fast.train; the pipeline's
    `stage-flags` are flags of their stage commands."""
    import yaml
    from abd_fast import train
    from abd_fast.cli import common, pipeline
    stages = train.build_parser().stages
    for path in PAPER_CONFIGS:
        command = path.stem.split("-")[0]
        cfg = {k: v for k, v in _load(path).items() if k != "recipe"}
        tmp = tmp_path / path.name
        tmp.write_text(yaml.safe_dump(cfg))
        values = common.yaml_values(str(tmp), stages[command], raw=("stage-flags",))
        if command == "pipeline":
            assert set(pipeline.parse_stage_flags(values["stage_flags"], path.name)) == {
                "poison", "poison:badclip", "uap", "defend", "defend:abd", "defend:roclip"}


def test_paper_pipeline_config_matches_the_stage_configs():
    """configs/paper/pipeline.yaml gives each stage the values of its one-stage file."""
    pipe = _load(ROOT / "configs" / "paper" / "pipeline.yaml")
    sf = pipe["stage-flags"]
    wired = {"output", "pretrained", "checkpoint", "reference-model", "uap", "attack",
             "trigger-file", "method", "recipe"}  # the pipeline connects these itself
    for path in PAPER_CONFIGS:
        if path.stem in ("pipeline", "eval"):
            continue
        command, _, variant = path.stem.partition("-")
        merged = {k: v for k, v in pipe.items() if k != "stage-flags"}
        merged.update(sf.get(command, {}))
        merged.update(sf.get(f"{command}:{variant}", {}))
        for key, value in _load(path).items():
            if key not in wired:
                assert merged.get(key) == value, f"{path.name}: {key}"


def test_floors_in_table1(tmp_path):
    """The floor rows (clean model under the trigger, the victim's UAP alone) and the
    target-free captured column; a malformed floor is refused. Numbers are made up."""
    rep = synthetic_report(4)
    g = np.random.default_rng(9)
    rep["floors"] = {a: {"clean": _result(g), "uap": dict(_result(g), capture_class="ring",
                                                          capture_rate=73.0)}
                     for a in rep["attacks"]}
    rep["attacks"]["badnet"]["victim"].update(capture_class="star", capture_rate=99.5)
    paths = rp.write_report(rep, tmp_path / "run")
    md = paths["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| badnet |")]
    labels = [line.split("|")[2].strip() for line in rows]
    assert labels[:3] == ["clean model (floor)", "victim", "UAP alone"]
    clean_floor = rep["floors"]["badnet"]["clean"]
    assert rp.format_number(clean_floor["asr"]) in rows[0]
    assert rows[1].rstrip().endswith("| star 99.5% |") and "| ring 73.0% |" in rows[2]
    assert "Floors:" in md
    assert json.loads(paths["json"].read_text())["floors"] == rep["floors"]
    bad = dict(rep, floors={"badnet": {"victim": _result(g)}})
    with pytest.raises(rp.ReportError, match=r"report\['floors'\]"):
        rp.validate_report(bad)
    bad = dict(rep, floors={"badnet": {"uap": dict(_result(g), capture_rate=140.0)}})
    with pytest.raises(rp.ReportError, match="capture_rate"):
        rp.validate_report(bad)


def test_aggregate_seeds_mean_and_std(tmp_path):
    """Table I (with floors), II, III and the similarities over seeds: means and sample stds
    equal NumPy's on the per-seed values; report.md shows mean ± std. Numbers are made up."""
    reps = {}
    for k in (0, 1, 2):
        rep = synthetic_report(10 + k)
        g = np.random.default_rng(k)
        rep["floors"] = {a: {"clean": _result(g), "uap": dict(
            _result(g), capture_class=["ring", "ring", "star"][k], capture_rate=float(10 * k))}
            for a in rep["attacks"]}
        reps[k] = rep
    agg = rp.aggregate_seeds(reps, timing={"clean": 3.0}, notes=["shared clean model"])
    rp.validate_report(agg)
    asr = [reps[k]["attacks"]["blended"]["abd"]["asr"] for k in reps]
    r = agg["attacks"]["blended"]["abd"]
    assert r["asr"] == pytest.approx(np.mean(asr)) and r["n_seeds"] == 3
    assert r["asr_std"] == pytest.approx(np.std(asr, ddof=1)) and r["asr_seeds"] == asr
    t2 = [reps[k]["ablations"]["table2"]["rows"]["t_eda"]["ca_top1"] for k in reps]
    assert agg["ablations"]["table2"]["rows"]["t_eda"]["ca_top1"] == pytest.approx(np.mean(t2))
    uap = agg["floors"]["badnet"]["uap"]
    assert uap["capture_class"] == "ring/ring/star" and uap["capture_rate"] == pytest.approx(10)
    sim = [reps[k]["similarity"]["clean_own_caption"] for k in reps]
    assert agg["similarity"]["clean_own_caption"] == pytest.approx(np.mean(sim))
    assert agg["settings"]["seeds"] == [0, 1, 2] and "shared clean model" in agg["notes"]
    md = rp.write_report(agg, tmp_path)["md"].read_text()
    assert f"{np.mean(asr):.2f} ± {np.std(asr, ddof=1):.2f}" in md
    assert f"{np.mean(t2):.2f} ± {np.std(t2, ddof=1):.2f}" in md
    # A stage missing in one seed leaves its cell empty rather than a mean of fewer seeds.
    reps[1]["attacks"]["badnet"]["ft"] = None
    assert rp.aggregate_seeds(reps)["attacks"]["badnet"]["ft"] is None


def test_multi_seed_report_pairs_abd_with_each_baseline_by_seed(tmp_path):
    """report.md of several seeds: ABD − baseline ASR per seed from the same seeds' rows, its
    mean and sign counts, the exact sign-flip p; a one-seed report has no such section."""
    reps = {k: synthetic_report(40 + k) for k in (0, 1, 2)}
    agg = rp.aggregate_seeds(reps)
    md = rp.write_report(agg, tmp_path)["md"].read_text()
    assert "## ABD against each baseline, paired by seed" in md
    gaps = [reps[k]["attacks"]["blended"]["abd"]["asr"] -
            reps[k]["attacks"]["blended"]["cleanclip"]["asr"] for k in reps]
    row = next(line for line in md.splitlines() if line.startswith("| blended | ABD − CleanCLIP"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == " ; ".join(f"{x:+.2f}" for x in gaps)
    assert cells[3] == f"{np.mean(gaps):+.2f}"
    assert cells[4] == f"{sum(x < 0 for x in gaps)} / 0 / {sum(x > 0 for x in gaps)}"
    assert cells[5] == f"{rp.sign_flip_p(gaps):.3f}"
    assert "smallest possible p is 0.25" in md
    assert "paired by seed" not in rp.render_markdown(reps[0])
    with pytest.raises(ValueError, match="21 gaps"):
        rp.sign_flip_p(np.ones(21))


def test_seed_tables_aggregates_report_files(tmp_path):
    """bench/seed_tables.py: per-seed report.json files of separate runs -> the same mean ± std
    as aggregate_seeds; a seed given twice is refused, naming the file."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    files = []
    for k in (0, 1):
        rep = synthetic_report(20 + k)
        rep["settings"]["seed"] = k
        files.append(tmp_path / f"seed{k}.json")
        files[-1].write_text(json.dumps(rep))
    cmd = [sys.executable, str(root / "bench" / "seed_tables.py")]
    done = subprocess.run([*cmd, *map(str, files), "--output", str(tmp_path / "agg")],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    agg = json.loads((tmp_path / "agg" / "report.json").read_text())
    asr = [json.loads(f.read_text())["attacks"]["badclip"]["cleanclip"]["asr"] for f in files]
    r = agg["attacks"]["badclip"]["cleanclip"]
    assert r["asr"] == pytest.approx(np.mean(asr)) and r["asr_seeds"] == asr
    assert agg["settings"]["seeds"] == [0, 1]
    done = subprocess.run([*cmd, str(files[0]), str(files[0]), "--output", str(tmp_path / "b")],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode != 0 and f"{files[0]}: its settings.seed is 0" in done.stderr


def test_paired_gaps_pairs_defenses_by_run(tmp_path, capsys):
    """bench/paired_gaps.py: ABD − X per run from each report's own rows, the exact sign-flip
    p-value, and a run (data, seed) given twice refused, naming the file."""
    import re
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.paired_gaps import main
    sign_flip_p = rp.sign_flip_p
    assert sign_flip_p([-1.0, -2.0, -3.0]) == pytest.approx(2 / 8)   # only all-minus, all-plus
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert sign_flip_p([-3.0, -1.0]) == pytest.approx(2 / 4)          # |±3 ± 1| is 4 or 2
    files = []
    for k in (0, 1, 2):
        rep = synthetic_report(30 + k)
        rep["settings"]["seed"] = k
        files.append(tmp_path / f"seed{k}.json")
        files[-1].write_text(json.dumps(rep))
    main([*map(str, files), "--out", str(tmp_path / "gaps.json")])
    out = json.loads((tmp_path / "gaps.json").read_text())
    row = out["gaps"]["badclip"]["cleanclip"]
    reps = [json.loads(f.read_text())["attacks"]["badclip"] for f in files]
    gaps = [r["abd"]["asr"] - r["cleanclip"]["asr"] for r in reps]
    assert [g["asr"] for g in row["runs"].values()] == pytest.approx(gaps, abs=1e-4)
    assert row["asr"]["mean"] == pytest.approx(np.mean(gaps), abs=1e-4)
    assert (row["asr"]["below"], row["asr"]["above"]) == (sum(g < 0 for g in gaps),
                                                         sum(g > 0 for g in gaps))
    assert row["asr"]["p_sign_flip"] == pytest.approx(sign_flip_p(gaps), abs=1e-6)
    assert "badclip" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=re.escape(f"{files[0]}: a|b.csv seed 0 was given")):
        main([str(files[0]), str(files[0])])
