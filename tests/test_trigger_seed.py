"""A victim's trigger belongs to the victim: its checkpoint records the trigger's seed, and
eval, uap and defend build the trigger from that record whatever --seed they run with
(--trigger-seed overrides it); older checkpoints (no record) fall back to their run's seed."""
import json

import torch

from abd_fast.cli.common import trigger_seed_of
from test_defense_cli import victim  # noqa: F401 (fixture)
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)


def _eval(args, out, capsys):
    code, err = run_main(["eval", *args, "--output", out], capsys)
    assert code == 0, err
    return json.loads((out / "eval.json").read_text())


def test_the_victims_trigger_whatever_the_seed(victim, tmp_path, capsys):  # noqa: F811
    out, common = victim
    poisoned = out / "poisoned" / "checkpoint.pt"
    assert torch.load(poisoned, weights_only=True)["config"]["trigger_seed"] == 0
    data = common[common.index("--eval-data"):common.index("--eval-data") + 2]
    base = ["--checkpoint", poisoned, *data, "--workers", "0", "--loader", "torch"]
    seed0 = _eval(base, tmp_path / "e0", capsys)
    seed1 = _eval([*base, "--seed", "1"], tmp_path / "e1", capsys)
    assert seed0["attack"] == "blended" and seed0["trigger_seed"] == seed1["trigger_seed"] == 0
    assert (seed1["asr"], seed1["embedding_distance"]) == (seed0["asr"],
                                                          seed0["embedding_distance"])
    other = _eval([*base, "--seed", "1", "--trigger-seed", "1"], tmp_path / "t1", capsys)
    assert other["trigger_seed"] == 1    # another blend pattern: the embeddings move otherwise
    assert other["embedding_distance"] != seed0["embedding_distance"]

    code, err = run_main(["uap", *common, "--checkpoint", poisoned, "--seed", "1",
                          "--output", tmp_path / "uap"], capsys)
    assert code == 0, err
    # (its eval measures the UAP, not the trigger; the record goes on with its config)
    uap_ckpt = torch.load(tmp_path / "uap" / "checkpoint.pt", weights_only=True)
    assert uap_ckpt["config"]["seed"] == 1 and uap_ckpt["config"]["trigger_seed"] == 0
    code, err = run_main(["defend", *common, "--method", "ft", "--checkpoint", poisoned,
                          "--seed", "1", "--output", tmp_path / "ft"], capsys)
    assert code == 0, err
    defended = json.loads((tmp_path / "ft" / "eval.json").read_text())
    assert defended["trigger_seed"] == 0
    # The defended model carries the record on: evaluating it again (any seed) agrees.
    ft_ckpt = tmp_path / "ft" / "checkpoint.pt"
    assert torch.load(ft_ckpt, weights_only=True)["config"]["trigger_seed"] == 0
    again = _eval(["--checkpoint", ft_ckpt, *data, "--workers", "0", "--loader", "torch",
                   "--seed", "5"], tmp_path / "e2", capsys)
    assert (again["trigger_seed"], again["asr"]) == (0, defended["asr"])


def test_trigger_seed_of_older_checkpoints():
    assert trigger_seed_of({"attack": "badnet", "seed": 3, "trigger_seed": 0}) == 0
    assert trigger_seed_of({"attack": "badnet", "seed": 3}) == 3   # recorded before the key
    assert trigger_seed_of({"seed": 3}) is None                    # no attack: no trigger
