"""Caption data as open_clip users have it (issue 14): `pretrain` and `pipeline` on a
`filepath,caption` CSV and on a tab-separated `filepath<TAB>title` TSV with quoted captions,
with the columns found from the header and with open_clip's flags (--csv-img-key,
--csv-caption-key, --csv-separator; also from a config file); a table whose columns cannot
be told stops before training with an error that lists them and names the flags."""
import csv
import json

import pytest

from abd_fast.report import weak_model_warnings
from test_pipeline import _run, cache  # noqa: F401 (fixture)
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)

LAYOUTS = {  # name: (file, image column, caption column, separator as a flag gives it)
    "csv": ("pairs.csv", "filepath", "caption", "comma"),
    "tsv": ("cc3m.tsv", "filepath", "title", "tab"),
}


@pytest.fixture(scope="module")
def tables(small_data, tmp_path_factory):  # noqa: F811
    """The small synthetic pairs in both layouts (absolute image paths); the TSV's captions
    carry quotes, a comma and a tab, so its fields are quoted."""
    root = tmp_path_factory.mktemp("tables")
    with open(small_data.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for name, (file, img, cap, sep) in LAYOUTS.items():
        with open(root / file, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if sep == "tab" else ",")
            w.writerow([img, cap])
            for r in rows:
                caption = r["caption"] if name == "csv" else f'{r["caption"]} ("photo",\tok)'
                w.writerow([str(small_data.csv.parent / r["image"]), caption])
        out[name] = root / file
    return out


def _flags(layout):
    _, img, cap, sep = LAYOUTS[layout]
    return ["--csv-img-key", img, "--csv-caption-key", cap, "--csv-separator", sep]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("given", [False, True])
def test_pretrain_on_open_clip_tables(tables, small_data, tmp_path, capsys, layout,  # noqa: F811
                                      given):
    code, err = run_main(["pretrain", "--train-data", tables[layout], "--eval-data",
                          small_data.eval_dir, "--batch-size", "32", "--epochs", "1",
                          "--warmup", "1", "--workers", "0", "--loader", "torch",
                          "--output", tmp_path, *(_flags(layout) if given else [])], capsys)
    assert code == 0, err
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert len(steps) == 160 // 32           # every row was read as a pair
    assert json.loads((tmp_path / "eval.json").read_text())["n_eval"] == 20


def test_unreadable_table_names_the_flags(tables, small_data, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "pairs.tsv"   # two caption candidates: which one is meant?
    lines = tables["tsv"].read_text().splitlines()
    bad.write_text("\n".join(["filepath\ttitle\ttext"] + [f"{r}\tx" for r in lines[1:]]) + "\n")
    argv = ["pretrain", "--train-data", bad, "--eval-data", small_data.eval_dir, "--workers",
            "0", "--loader", "torch", "--epochs", "1", "--output", tmp_path / "out"]
    code, err = run_main(argv, capsys)
    assert code == 2 and f"error: --train-data: {bad}: several possible caption columns " \
        "['title', 'text']" in err and "--csv-caption-key" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    code, err = run_main([*argv, "--csv-caption-key", "text", "--csv-separator", ";;"], capsys)
    assert code == 2 and "--csv-separator: ';;' is not one character" in err
    (tmp_path / "c.yaml").write_text("csv-caption-key: title\nbatch-size: 32\nwarmup: 1\n")
    code, err = run_main([*argv, "--config", tmp_path / "c.yaml"], capsys)  # config key
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("layout,given", [("csv", False), ("tsv", True)])
def test_pipeline_on_open_clip_tables(cache, tables, small_data, tmp_path, capsys,  # noqa: F811
                                      layout, given):
    out = tmp_path / "run"
    _run(["pipeline", "--train-data", tables[layout], "--eval-data", small_data.eval_dir,
          "--target-label", "star", "--attacks", "badnet", "--defenses", "ft",
          "--no-ablations", "--quick", "--workers", "0", "--loader", "torch", "--output", out,
          *(_flags(layout) if given else [])], capsys)
    report = json.loads((out / "report.json").read_text())
    assert report["attacks"]["badnet"]["ft"]["n_eval"] == 20
    # Whatever this tiny run's numbers, its weak-model warnings are the report's and open
    # report.md (the clean result carries the class count they need).
    assert report["clean"]["n_classes"] == 10
    assert report["warnings"] == weak_model_warnings(report)
    md = (out / "report.md").read_text()
    assert all(f"> **Warning:** {w}" in md for w in report["warnings"])
    argv = json.loads((out / "poison-badnet" / "stage.json").read_text())["argv"]
    if given:  # the stages get the flags (the separator as parsed)
        assert argv[argv.index("--csv-caption-key") + 1] == "title"
        assert argv[argv.index("--csv-separator") + 1] == "\t"
    else:
        assert not [a for a in argv if a.startswith("--csv")]
