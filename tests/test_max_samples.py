"""--max-samples N: training reads the N lowest sample ids of the training data, the same
subset under either loader engine; a value below the batch size is refused."""
import numpy as np
import pytest

from abd_fast.cli import pretrain
from abd_fast.cli.common import Run
from abd_fast.data import open_source
from test_data import ENGINES
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)


def _epoch_ids(small_data, tmp_path, engine, n, source):  # noqa: F811
    cfg = dict(pretrain.DEFAULTS, command="pretrain", model="abd-tiny-vit",
               train_data=str(source), max_samples=n, batch_size=7, workers=0,
               loader=engine, output=str(tmp_path))
    loader = Run(cfg).train_loader()
    loader.set_epoch(0)
    ids = [i for batch in loader for i in batch.ids.tolist()]
    return ids, len(loader.manifest)


@pytest.mark.parametrize("kind", ["csv", "shards"])
def test_max_samples_reads_the_lowest_ids_under_every_engine(small_data, tmp_path, kind):  # noqa: F811
    source = small_data.csv if kind == "csv" else small_data.shards
    n = 37  # odd: whole batches of 7 take 35 of the 37 samples in an epoch
    want = sorted(open_source(source).ids.tolist())[:n]
    seen = {}
    for engine in ENGINES:
        ids, size = _epoch_ids(small_data, tmp_path, engine, n, source)
        assert size == n and len(ids) == n // 7 * 7 and len(set(ids)) == len(ids)
        assert set(ids) <= set(want), f"{engine}: ids outside the {n} lowest"
        seen[engine] = np.sort(ids)
    if len(seen) == 2:
        assert np.array_equal(seen["torch"], seen["dali"])
    else:
        print("DALI is not installed: only the torch engine was checked")


def test_max_samples_below_the_batch_size_is_refused(small_data, tmp_path, capsys):  # noqa: F811
    code, err = run_main(["pretrain", "--train-data", small_data.csv, "--batch-size", "16",
                          "--max-samples", "9", "--output", tmp_path], capsys)
    assert code == 2 and "--max-samples must be an integer >= --batch-size (16)" in err
